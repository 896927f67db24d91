// Engine folder files, as lcmrt/manifest.py handles them (folder_file, verify_files, _matches): the same
// messages, and the same verified-files cache, so a file hashed by either runtime is only stat'ed by the other.
#include "files.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "errors.h"

namespace lcmrt {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMaxNameBytes = 255;  // one part of a file name (lcmrt/manifest.py MAX_NAME_BYTES)
constexpr size_t kHashChunk = 1 << 20;

std::string system_error_text() { return std::strerror(errno); }

// The path as Python's PurePosixPath prints it: no empty or "." parts, no trailing "/", "." when nothing is left.
std::string python_path(const std::string& path) {
  std::string out = path.size() > 0 && path[0] == '/' ? "/" : "";
  std::istringstream parts(path);
  for (std::string part; std::getline(parts, part, '/');) {
    if (part.empty() || part == ".") continue;
    if (!out.empty() && out.back() != '/') out += '/';
    out += part;
  }
  return out.empty() ? "." : out;
}

// json.dumps(name)[:80]: ASCII-only JSON, which nlohmann escapes as Python does.
std::string quoted_name(const std::string& name) {
  return nlohmann::json(name).dump(-1, ' ', true, nlohmann::json::error_handler_t::replace).substr(0, 80);
}

// lcmrt/manifest.py _inside: a relative name with no empty, "." or ".." parts, each part at most 255 bytes.
void check_inside(const std::string& name) {
  bool plain = !name.empty() && name.find('\\') == std::string::npos && name.find('\0') == std::string::npos &&
               name[0] != '/';
  std::istringstream parts(name + "/");  // the extra "/" makes a trailing "/" show up as an empty last part
  for (std::string part; plain && std::getline(parts, part, '/');) {
    plain = !part.empty() && part != "." && part != ".." && part.size() <= kMaxNameBytes;
  }
  if (!plain) {
    throw folder_error("manifest.json: a file name is " + quoted_name(name) +
                       ", not a plain file name inside the engine folder. " + kRebuild);
  }
}

// Python's Path.resolve(): symlinks resolved as far as the path exists, the rest appended.
fs::path resolved(const std::string& path) {
  std::error_code error;
  fs::path out = fs::weakly_canonical(fs::absolute(path), error);
  if (error) throw folder_error("Cannot resolve " + path + ": " + error.message() + ". " + kRebuild);
  return out;
}

bool is_relative_to(const fs::path& path, const fs::path& base) {
  auto p = path.begin();
  for (auto b = base.begin(); b != base.end(); ++b, ++p) {
    if (p == path.end() || *p != *b) return false;
  }
  return true;
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// lcmrt/manifest.py _stat_key: f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".
std::string stat_key(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw io_error("Cannot stat " + path + ": " + system_error_text() + ".");
  const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return std::to_string(static_cast<unsigned long long>(st.st_dev)) + ":" +
         std::to_string(static_cast<unsigned long long>(st.st_ino)) + ":" + std::to_string(st.st_size) + ":" +
         std::to_string(mtime_ns);
}

// lcmrt/manifest.py VERIFIED_CACHE; empty when there is no home folder to hold it.
std::string cache_path() {
  if (const char* dir = std::getenv("LCMRT_CACHE_DIR")) return std::string(dir) + "/verified.json";
  const char* home = std::getenv("HOME");
  if (!home) {
    const passwd* user = getpwuid(getuid());
    home = user ? user->pw_dir : nullptr;
  }
  return home ? std::string(home) + "/.cache/lcmrt/verified.json" : "";
}

nlohmann::json read_cache(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const auto cache = nlohmann::json::parse(in, nullptr, false);
  return cache.is_object() ? cache : nlohmann::json::object();
}

// Replace the cache in one rename, so a concurrent reader sees the old or the new file, never half of one. The
// temporary name is unique per thread (Python's is per process and has no thread part, so they never collide).
void write_cache(const std::string& path, const nlohmann::json& cache) {
  const fs::path file(path);
  const std::string tmp_path = (file.parent_path() / ("." + file.filename().string() + "." +
                                                      std::to_string(getpid()) + "." + std::to_string(gettid())))
                                   .string();
  std::error_code error;
  fs::create_directories(file.parent_path(), error);
  const std::string text = cache.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  const int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) return;
  const bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  if (::close(fd) != 0 || !written || ::rename(tmp_path.c_str(), path.c_str()) != 0) ::unlink(tmp_path.c_str());
}

// lcmrt/manifest.py _matches: does the file hash to `expected`? Answered from the cache when it is unchanged.
bool matches(const std::string& path, const std::string& expected) {
  const std::string cache_file = cache_path();
  const std::string key = resolved(path).string();
  const nlohmann::json stamp = {stat_key(path), expected};
  if (!cache_file.empty()) {
    const auto cache = read_cache(cache_file);
    if (cache.contains(key) && cache[key] == stamp) return true;
  }
  if (file_sha256(path) != expected) return false;
  if (cache_file.empty()) return true;
  // read again: hashing a large file takes seconds, in which another process may have added entries
  const auto cache = read_cache(cache_file);
  nlohmann::json kept = nlohmann::json::object();
  for (const auto& [file, entry] : cache.items()) {
    if (exists(file)) kept[file] = entry;
  }
  kept[key] = stamp;
  write_cache(cache_file, kept);  // a cache that cannot be written only costs the next load a re-hash
  return true;
}

}  // namespace

std::string folder_file(const std::string& folder, const std::string& name) {
  check_inside(name);
  const std::string path = python_path(folder.empty() ? name : folder + "/" + name);
  const fs::path target = resolved(path);
  if (!is_relative_to(target, resolved(python_path(folder)))) {
    throw folder_error(path + " is a link to " + target.string() +
                       ", outside the engine folder: lcmrt reads only files inside it. Replace the link with the "
                       "file itself. " + kRebuild);
  }
  return path;
}

std::string file_sha256(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw io_error("Cannot read " + path + ": " + system_error_text() + ".");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> digest(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!digest || EVP_DigestInit_ex(digest.get(), EVP_sha256(), nullptr) != 1) {
    ::close(fd);
    throw io_error("OpenSSL could not start a sha256 digest (out of memory?).");
  }
  std::vector<char> chunk(kHashChunk);
  ssize_t got = 0;
  while ((got = ::read(fd, chunk.data(), chunk.size())) > 0 || (got < 0 && errno == EINTR)) {
    if (got > 0) EVP_DigestUpdate(digest.get(), chunk.data(), static_cast<size_t>(got));
  }
  const std::string reason = got < 0 ? system_error_text() : "";
  ::close(fd);
  if (got < 0) throw io_error("Cannot read " + path + ": " + reason + ".");
  unsigned char hash[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(digest.get(), hash, &size);
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < size; ++i) {
    hex += kHex[hash[i] >> 4];
    hex += kHex[hash[i] & 15];
  }
  return hex;
}

void verify_files(const std::string& folder, const std::map<std::string, std::string>& hashes, const std::string& fix) {
  for (const auto& [name, expected] : hashes) {
    const std::string path = folder_file(folder, name);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      throw folder_error(path + " is missing from the engine folder. " + fix);
    }
    if (!matches(path, expected)) {
      throw folder_error(path +
                         " does not match the hash recorded at build time: the file was modified or truncated. " + fix);
    }
  }
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw io_error("Cannot open " + path + ": " + system_error_text() + ".");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string reason = system_error_text();
    ::close(fd);
    throw io_error("Cannot stat " + path + ": " + reason + ".");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* data = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data == MAP_FAILED) {
      const std::string reason = system_error_text();
      ::close(fd);
      throw io_error("Cannot map " + path + " into memory: " + reason + ".");
    }
    data_ = static_cast<const uint8_t*>(data);
  }
  ::close(fd);  // the mapping keeps the file open
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace lcmrt
