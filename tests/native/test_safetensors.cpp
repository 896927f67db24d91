// lcmrt/csrc/src/safetensors.cpp: a file written by hand read back, and malformed files refused (the cases the
// safetensors library refuses too).
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

#include "check.h"
#include "safetensors.h"

namespace {

namespace fs = std::filesystem;

std::string le_u64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i));
  return bytes;
}

// A safetensors file: header length, header (padded with spaces to 8 bytes, as the library writes it), data.
std::string safetensors(std::string header, const std::string& data) {
  header.resize((header.size() + 7) / 8 * 8, ' ');
  return le_u64(header.size()) + header + data;
}

void write(const fs::path& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

void test_valid(const fs::path& dir) {
  const float weights[4] = {1.0f, -2.0f, 0.5f, 3.0f};
  const int64_t ids[1] = {-7};
  std::string data(reinterpret_cast<const char*>(weights), sizeof(weights));
  data += std::string(reinterpret_cast<const char*>(ids), sizeof(ids));
  const fs::path path = dir / "valid.safetensors";
  write(path, safetensors(R"({"__metadata__": {"format": "pt"},)"
                          R"( "ids": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},)"
                          R"( "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},)"
                          R"( "empty": {"dtype": "F16", "shape": [0, 3], "data_offsets": [24, 24]}})",
                          data));
  const lcmrt::SafetensorsFile file(path.string());
  const auto& tensors = file.tensors();
  CHECK_EQ(tensors.size(), size_t{3});
  const auto& w = tensors.at("w");
  CHECK_EQ(w.dtype, "F32");
  CHECK(w.shape == (std::vector<int64_t>{2, 2}));
  CHECK_EQ(w.bytes, size_t{16});
  float read[4];
  std::memcpy(read, w.data, sizeof(read));
  CHECK(std::equal(read, read + 4, weights));
  const auto& id = tensors.at("ids");
  CHECK_EQ(id.dtype, "I64");
  CHECK(id.shape == (std::vector<int64_t>{1}));
  int64_t value = 0;
  std::memcpy(&value, id.data, sizeof(value));
  CHECK_EQ(value, int64_t{-7});
  CHECK_EQ(tensors.at("empty").bytes, size_t{0});
}

void test_malformed(const fs::path& dir) {
  const std::string f32_2 = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})";
  const std::string eight(8, 'x');
  const std::pair<const char*, std::string> cases[] = {
      {"shorter than its header length field", "abcd"},
      {"header length past the end", le_u64(100) + "{}"},
      {"header length near 2^64", le_u64(~uint64_t{0}) + "{}      "},
      {"header not JSON", safetensors("{\"a\": ", eight)},
      {"header a list", safetensors("[1, 2]", "")},
      {"entry not an object", safetensors(R"({"a": 1})", "")},
      {"no dtype", safetensors(R"({"a": {"shape": [2], "data_offsets": [0, 8]}})", eight)},
      {"unknown dtype", safetensors(R"({"a": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 2]}})", "ab")},
      {"negative dimension", safetensors(R"({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}})", "ab")},
      {"float dimension", safetensors(R"({"a": {"dtype": "U8", "shape": [2.0], "data_offsets": [0, 2]}})", "ab")},
      {"shape overflowing", safetensors(R"({"a": {"dtype": "F64", "shape": [4294967296, 4294967296], )"
                                        R"("data_offsets": [0, 0]}})", "")},
      {"no data_offsets", safetensors(R"({"a": {"dtype": "F32", "shape": [2]}})", eight)},
      {"one offset", safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", eight)},
      {"offsets reversed", safetensors(R"({"a": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}})", eight)},
      {"size not shape x dtype",
       safetensors(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", eight)},
      {"data truncated", safetensors(f32_2, "xxxx")},
      {"data left over", safetensors(f32_2, eight + "x")},
      {"gap", safetensors(R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, )"
                          R"("b": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]}})", "abc")},
      {"overlap", safetensors(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, )"
                              R"("b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}})", "abc")},
      {"metadata not strings", safetensors(R"({"__metadata__": {"x": 1}})", "")},
  };
  const fs::path path = dir / "bad.safetensors";
  for (const auto& [what, bytes] : cases) {
    write(path, bytes);
    std::string message;
    try {
      lcmrt::SafetensorsFile file(path.string());
    } catch (const std::runtime_error& e) {
      message = e.what();
    }
    if (message.find(path.string() + " is not a valid safetensors file") != 0) {
      std::cerr << "not refused as expected: " << what << " (" << message << ")\n";
      CHECK(false);
    }
  }
}

}  // namespace

int main() {
  char pattern[] = "/tmp/lcmrt-test-safetensors-XXXXXX";
  const fs::path dir = fs::canonical(mkdtemp(pattern));
  test_valid(dir);
  test_malformed(dir);
  fs::remove_all(dir);
  return check_exit();
}
