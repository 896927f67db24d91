// Engine folder files: paths that stay inside the folder, sha256 checks against the manifest (sharing the
// Python runtime's cache of verified files), and read-only memory maps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace lcmrt {

// lcmrt/manifest.py folder_file: FOLDER/NAME, refusing a name that leads out of the folder (".." parts, an absolute
// path, or a symlink resolving outside it) with an engine-folder error naming the fix.
std::string folder_file(const std::string& folder, const std::string& name);

// Lowercase hex sha256 of a whole file (io_error if unreadable).
std::string file_sha256(const std::string& path);

// lcmrt/manifest.py verify_files: each NAME exists inside FOLDER and hashes to its recorded sha256, answered from
// the verified-files cache (LCMRT_CACHE_DIR or ~/.cache/lcmrt, verified.json: {resolved path: ["dev:ino:size:
// mtime_ns", sha256]}) when the file is unchanged; a fresh match is added to the cache (written atomically,
// failures to write ignored). Errors are engine-folder errors with the Python runtime's messages and `fix`.
void verify_files(const std::string& folder, const std::map<std::string, std::string>& hashes, const std::string& fix);

// A read-only memory map of a whole file (io_error if it cannot be mapped); empty files map to size 0.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace lcmrt
