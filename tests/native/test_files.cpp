// lcmrt/csrc/src/files.cpp: folder_file's refusals, file_sha256, verify_files and its verified-files cache (shared
// with lcmrt/manifest.py, so its keys must be Python's), MappedFile.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "check.h"
#include "errors.h"
#include "files.h"

namespace {

namespace fs = std::filesystem;

const std::string kAbcSha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const std::string kEmptySha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

void write(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in, nullptr, false);
}

// The message of the lcmrt::Error that `call` throws with `status`, or "" when it throws none.
template <class Call>
std::string error_of(Call call, lcmrt_status status) {
  try {
    call();
  } catch (const lcmrt::Error& e) {
    CHECK_EQ(static_cast<int>(e.status()), static_cast<int>(status));
    return e.what();
  }
  return "";
}

// Python's _stat_key, written out here so that a change to the C++ side's format shows up as a failure.
std::string python_stat_key(const fs::path& path) {
  struct stat st;
  stat(path.c_str(), &st);
  return std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" + std::to_string(st.st_size) + ":" +
         std::to_string(st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
}

void test_sha256(const fs::path& dir) {
  write(dir / "abc.txt", "abc");
  write(dir / "empty.txt", "");
  CHECK_EQ(lcmrt::file_sha256((dir / "abc.txt").string()), kAbcSha256);
  CHECK_EQ(lcmrt::file_sha256((dir / "empty.txt").string()), kEmptySha256);
  CHECK(!error_of([&] { lcmrt::file_sha256((dir / "none.txt").string()); }, LCMRT_ERROR_IO).empty());
}

void test_folder_file(const fs::path& dir) {
  const fs::path folder = dir / "engine";
  const fs::path outside = dir / "outside.txt";
  fs::create_directories(folder / "sub");
  write(outside, "abc");
  write(folder / "sub" / "inside.txt", "abc");
  fs::create_symlink(outside, folder / "link.txt");
  fs::create_symlink(folder / "sub" / "inside.txt", folder / "inner-link.txt");

  CHECK_EQ(lcmrt::folder_file(folder.string(), "sub/inside.txt"), (folder / "sub" / "inside.txt").string());
  CHECK_EQ(lcmrt::folder_file(folder.string() + "/", "inner-link.txt"), (folder / "inner-link.txt").string());
  CHECK_EQ(lcmrt::folder_file(folder.string(), "not-yet.txt"), (folder / "not-yet.txt").string());
  CHECK_EQ(error_of([&] { lcmrt::folder_file(folder.string(), "../x"); }, LCMRT_ERROR_ENGINE_FOLDER),
           std::string("manifest.json: a file name is \"../x\", not a plain file name inside the engine folder. ") +
               lcmrt::kRebuild);
  const std::vector<std::string> refused = {"/etc/passwd", "a//b", "./a", "a/", "", "a\\b", std::string(256, 'x')};
  for (const auto& name : refused) {
    CHECK(!error_of([&] { lcmrt::folder_file(folder.string(), name); }, LCMRT_ERROR_ENGINE_FOLDER).empty());
  }
  CHECK_EQ(error_of([&] { lcmrt::folder_file(folder.string(), "link.txt"); }, LCMRT_ERROR_ENGINE_FOLDER),
           (folder / "link.txt").string() + " is a link to " + outside.string() +
               ", outside the engine folder: lcmrt reads only files inside it. Replace the link with the file "
               "itself. " + lcmrt::kRebuild);
}

void test_verify_files(const fs::path& dir) {
  const fs::path folder = dir / "verify";
  const fs::path cache = dir / "cache" / "verified.json";
  fs::create_directories(folder);
  write(folder / "abc.txt", "abc");
  const std::string fix = "Fix it.";

  lcmrt::verify_files(folder.string(), {{"abc.txt", kAbcSha256}}, fix);
  const std::string key = fs::canonical(folder / "abc.txt").string();
  const nlohmann::json stamp = {python_stat_key(folder / "abc.txt"), kAbcSha256};
  CHECK(read_json(cache) == nlohmann::json({{key, stamp}}));

  // an unchanged file is answered from the cache: a recorded stamp is believed without hashing the file again
  const std::string recorded = std::string(64, 'f');
  write(cache, nlohmann::json({{key, {python_stat_key(folder / "abc.txt"), recorded}}}).dump());
  CHECK_EQ(error_of([&] { lcmrt::verify_files(folder.string(), {{"abc.txt", recorded}}, fix); },
                    LCMRT_ERROR_ENGINE_FOLDER),
           "");

  CHECK_EQ(error_of([&] { lcmrt::verify_files(folder.string(), {{"abc.txt", kEmptySha256}}, fix); },
                    LCMRT_ERROR_ENGINE_FOLDER),
           (folder / "abc.txt").string() +
               " does not match the hash recorded at build time: the file was modified or truncated. Fix it.");
  CHECK_EQ(error_of([&] { lcmrt::verify_files(folder.string(), {{"gone.txt", kAbcSha256}}, fix); },
                    LCMRT_ERROR_ENGINE_FOLDER),
           (folder / "gone.txt").string() + " is missing from the engine folder. Fix it.");
  fs::create_directories(folder / "a-folder");
  CHECK(!error_of([&] { lcmrt::verify_files(folder.string(), {{"a-folder", kAbcSha256}}, fix); },
                  LCMRT_ERROR_ENGINE_FOLDER)
             .empty());

  // a fresh match rewrites the cache without the entries of files that no longer exist, as Python's does
  write(cache, nlohmann::json({{(dir / "deleted.txt").string(), {"1:2:3:4", kAbcSha256}}}).dump());
  lcmrt::verify_files(folder.string(), {{"abc.txt", kAbcSha256}}, fix);
  CHECK(read_json(cache) == nlohmann::json({{key, stamp}}));

  // a corrupt cache is ignored and replaced
  write(cache, "{not json");
  lcmrt::verify_files(folder.string(), {{"abc.txt", kAbcSha256}}, fix);
  CHECK(read_json(cache) == nlohmann::json({{key, stamp}}));
}

// Threads verifying at once may lose each other's entries, but the cache must stay one whole JSON document.
void test_concurrent_verify(const fs::path& dir) {
  const fs::path folder = dir / "concurrent";
  fs::create_directories(folder);
  constexpr int kThreads = 4, kFiles = 8;
  for (int i = 0; i < kThreads * kFiles; ++i) write(folder / (std::to_string(i) + ".txt"), "abc");
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&folder, t] {
      for (int i = 0; i < kFiles; ++i) {
        lcmrt::verify_files(folder.string(), {{std::to_string(t * kFiles + i) + ".txt", kAbcSha256}}, "");
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const auto cache = read_json(dir / "cache" / "verified.json");
  CHECK(cache.is_object() && !cache.empty());
  for (const auto& entry : fs::directory_iterator(dir / "cache")) {
    CHECK_EQ(entry.path().filename().string(), "verified.json");  // no temporary file left behind
  }
}

void test_mapped_file(const fs::path& dir) {
  write(dir / "map.bin", "hello");
  lcmrt::MappedFile mapped((dir / "map.bin").string());
  CHECK_EQ(mapped.size(), size_t{5});
  CHECK_EQ(std::string(reinterpret_cast<const char*>(mapped.data()), mapped.size()), "hello");
  lcmrt::MappedFile empty((dir / "empty.txt").string());
  CHECK_EQ(empty.size(), size_t{0});
  CHECK(!error_of([&] { lcmrt::MappedFile missing((dir / "none.bin").string()); }, LCMRT_ERROR_IO).empty());
}

}  // namespace

int main() {
  char pattern[] = "/tmp/lcmrt-test-files-XXXXXX";
  const fs::path dir = fs::canonical(mkdtemp(pattern));
  setenv("LCMRT_CACHE_DIR", (dir / "cache").c_str(), 1);
  test_sha256(dir);
  test_folder_file(dir);
  test_verify_files(dir);
  test_concurrent_verify(dir);
  test_mapped_file(dir);
  fs::remove_all(dir);
  return check_exit();
}
