// The safetensors format (github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
// JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {string: string}}, then the data.
// Checked as strictly as the safetensors library that the Python runtime reads packs with: the tensors' byte ranges
// follow one another without gaps or overlaps and fill the data section exactly.
#include "safetensors.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <tuple>

#include <nlohmann/json.hpp>

namespace lcmrt {
namespace {

constexpr const char* kMetadataKey = "__metadata__";
constexpr uint64_t kMaxHeader = 100 << 20;  // the safetensors library's limit (MAX_HEADER_SIZE)

// Bytes per element of the safetensors dtypes (its sub-byte F4 and F6 types are refused: no pack uses them).
const std::map<std::string, uint64_t>& dtype_sizes() {
  static const std::map<std::string, uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}, {"F8_E4M3FNUZ", 1},
      {"F8_E5M2FNUZ", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},
      {"F64", 8}, {"I64", 8}, {"U64", 8}, {"C64", 8}};
  return sizes;
}

bool is_size(const nlohmann::json& value) {
  return value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0);
}

std::string dtype_names() {
  std::string names;
  for (const auto& [name, size] : dtype_sizes()) names += (names.empty() ? "" : ", ") + name;
  return names;
}

struct Entry {
  std::string name;
  TensorView view;
  uint64_t begin = 0, end = 0;
};

// One tensor's header entry, checked on its own: dtype known, shape of sizes, offsets matching shape x dtype.
// `where` names the file and the tensor.
Entry parse_entry(const std::string& name, const nlohmann::json& header, const std::string& where) {
  const auto fail = [&](const std::string& problem) { throw std::runtime_error(where + " " + problem + "."); };
  if (!header.is_object()) fail("its header entry is " + header.dump().substr(0, 80) + ", not an object");
  Entry entry{name, {}, 0, 0};
  const auto dtype = header.find("dtype");
  if (dtype == header.end() || !dtype->is_string()) fail("has no string \"dtype\"");
  entry.view.dtype = dtype->get<std::string>();
  const auto size = dtype_sizes().find(entry.view.dtype);
  if (size == dtype_sizes().end()) fail("has dtype " + entry.view.dtype + ", not one of " + dtype_names());
  const auto shape = header.find("shape");
  if (shape == header.end() || !shape->is_array()) fail("has no \"shape\" list");
  uint64_t bytes = size->second;
  for (const auto& dim : *shape) {
    if (!is_size(dim) || dim.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      fail("has shape " + shape->dump() + ", not a list of sizes");
    }
    entry.view.shape.push_back(dim.get<int64_t>());
    if (__builtin_mul_overflow(bytes, dim.get<uint64_t>(), &bytes)) fail("has shape " + shape->dump() + ", too large");
  }
  const auto offsets = header.find("data_offsets");
  if (offsets == header.end() || !offsets->is_array() || offsets->size() != 2 || !is_size((*offsets)[0]) ||
      !is_size((*offsets)[1])) {
    fail("has no \"data_offsets\" [begin, end]");
  }
  entry.begin = (*offsets)[0].get<uint64_t>();
  entry.end = (*offsets)[1].get<uint64_t>();
  if (entry.begin > entry.end || entry.end - entry.begin != bytes) {
    fail("has data_offsets " + offsets->dump() + ", but " + entry.view.dtype + " " + shape->dump() + " takes " +
         std::to_string(bytes) + " bytes");
  }
  entry.view.bytes = static_cast<size_t>(bytes);
  return entry;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  const auto fail = [&](const std::string& problem) {
    throw std::runtime_error(path + " is not a valid safetensors file: " + problem + ".");
  };
  const uint8_t* bytes = file_->data();
  const uint64_t size = file_->size();
  if (size < 8) fail("it has " + std::to_string(size) + " bytes, fewer than the 8 of its header length");
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | bytes[i];
  if (header_size > size - 8) {
    fail("its header length is " + std::to_string(header_size) + " bytes, but only " + std::to_string(size - 8) +
         " follow: the file is truncated");
  }
  if (header_size > kMaxHeader) {
    fail("its header length is " + std::to_string(header_size) + " bytes, more than the format's limit of " +
         std::to_string(kMaxHeader));
  }
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + header_size);
  } catch (const nlohmann::json::parse_error& e) {
    fail(std::string("its header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) fail("its header is " + header.dump().substr(0, 80) + ", not a JSON object");

  std::vector<Entry> entries;
  for (const auto& [name, entry] : header.items()) {
    if (name != kMetadataKey) {
      entries.push_back(
          parse_entry(name, entry, path + " is not a valid safetensors file: tensor " + nlohmann::json(name).dump()));
      continue;
    }
    const bool strings = entry.is_object() &&
                         std::all_of(entry.begin(), entry.end(), [](const auto& value) { return value.is_string(); });
    if (!strings) fail("its __metadata__ is not an object of strings");
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return std::tie(a.begin, a.end) < std::tie(b.begin, b.end); });
  const uint8_t* data = bytes + 8 + header_size;
  const uint64_t data_size = size - 8 - header_size;
  uint64_t next = 0;
  for (auto& entry : entries) {
    if (entry.begin != next) {
      fail("tensor " + nlohmann::json(entry.name).dump() + " starts at byte " + std::to_string(entry.begin) +
           " of the data, where " + std::to_string(next) + " was expected (tensors overlap or leave a gap)");
    }
    if (entry.end > data_size) {
      fail("tensor " + nlohmann::json(entry.name).dump() + " ends at byte " + std::to_string(entry.end) +
           ", past the end of the data (" + std::to_string(data_size) + " bytes): the file is truncated");
    }
    next = entry.end;
    entry.view.data = data + entry.begin;
    tensors_[entry.name] = entry.view;
  }
  if (next != data_size) {
    fail("its tensors take " + std::to_string(next) + " bytes, but the data section has " +
         std::to_string(data_size));
  }
}

}  // namespace lcmrt
