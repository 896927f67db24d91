// Read-only access to a .safetensors file (8-byte little-endian header length, JSON header, raw data), memory
// mapped: adapter packs.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "files.h"

namespace lcmrt {

struct TensorView {
  std::string dtype;  // safetensors dtype name: "F32", "F16", ...
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapped file
  size_t bytes = 0;
};

class SafetensorsFile {
 public:
  // Maps and checks the file: header length and JSON, each tensor's dtype/shape/data_offsets consistent and inside
  // the data section. A malformed file throws std::runtime_error describing the problem (callers wrap it).
  explicit SafetensorsFile(const std::string& path);
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorView> tensors_;
};

}  // namespace lcmrt
