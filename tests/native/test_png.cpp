// lcmrt/csrc/src/png.cpp: a written PNG read back chunk by chunk (CRCs, IHDR, iTXt, the pixels in IDAT), the
// metadata refusals of lcmrt/images.py save_png, and python_json against Python's json.dumps output.
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <zlib.h>

#include "check.h"
#include "errors.h"
#include "png.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

struct Chunk {
  std::string type;
  std::string data;
};

uint32_t read_u32(const std::string& bytes, size_t at) {
  uint32_t value = 0;
  for (size_t i = 0; i < 4; ++i) value = value << 8 | static_cast<uint8_t>(bytes[at + i]);
  return value;
}

// The chunks after the signature, each CRC checked.
std::vector<Chunk> read_chunks(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK_EQ(bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  std::vector<Chunk> chunks;
  for (size_t at = 8; at + 12 <= bytes.size();) {
    const uint32_t length = read_u32(bytes, at);
    const std::string type_and_data = bytes.substr(at + 4, 4 + length);
    const auto crc = crc32(0, reinterpret_cast<const Bytef*>(type_and_data.data()), type_and_data.size());
    CHECK_EQ(read_u32(bytes, at + 8 + length), static_cast<uint32_t>(crc));
    chunks.push_back({type_and_data.substr(0, 4), type_and_data.substr(4)});
    at += 12 + length;
  }
  return chunks;
}

template <class Call>
std::string input_error_of(Call call) {
  try {
    call();
  } catch (const lcmrt::Error& e) {
    CHECK_EQ(static_cast<int>(e.status()), static_cast<int>(LCMRT_ERROR_INVALID_ARGUMENT));
    return e.what();
  }
  return "";
}

void test_save_png(const fs::path& dir) {
  constexpr int kHeight = 3, kWidth = 4;
  std::vector<uint8_t> pixels(kHeight * kWidth * 3);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 7);
  const ordered_json metadata = {{"prompt", "a cat, é"}, {"seed", 42}, {"guidance", 1.5}, {"size", {512, 512}}};
  const fs::path path = dir / "new" / "folder" / "out.png";
  lcmrt::save_png(path.string(), pixels.data(), kHeight, kWidth, metadata);

  const auto chunks = read_chunks(path);
  CHECK_EQ(chunks.size(), size_t{8});  // IHDR, "lcmrt" and 4 fields, IDAT, IEND
  if (chunks.size() != 8) return;
  CHECK_EQ(chunks[0].type, "IHDR");
  CHECK_EQ(chunks[0].data, std::string("\0\0\0\x04\0\0\0\x03\x08\x02\0\0\0", 13));
  const auto itxt = [](const std::string& key, const std::string& text) {
    return key + std::string(5, '\0') + text;
  };
  CHECK_EQ(chunks[1].type, "iTXt");
  CHECK_EQ(chunks[1].data, itxt("lcmrt", "{\"prompt\": \"a cat, é\", \"seed\": 42, \"guidance\": 1.5, \"size\": [512, "
                                         "512]}"));
  CHECK_EQ(chunks[2].data, itxt("prompt", "a cat, é"));
  CHECK_EQ(chunks[3].data, itxt("seed", "42"));
  CHECK_EQ(chunks[4].data, itxt("guidance", "1.5"));
  CHECK_EQ(chunks[5].data, itxt("size", "[512, 512]"));
  CHECK_EQ(chunks[6].type, "IDAT");
  std::vector<uint8_t> rows(kHeight * (kWidth * 3 + 1));
  uLongf size = rows.size();
  CHECK_EQ(uncompress(rows.data(), &size, reinterpret_cast<const Bytef*>(chunks[6].data.data()), chunks[6].data.size()),
           Z_OK);
  CHECK_EQ(size, rows.size());
  for (int y = 0; y < kHeight; ++y) {
    CHECK_EQ(static_cast<int>(rows[y * (kWidth * 3 + 1)]), 0);
    CHECK(std::equal(pixels.begin() + y * kWidth * 3, pixels.begin() + (y + 1) * kWidth * 3,
                     rows.begin() + y * (kWidth * 3 + 1) + 1));
  }
  CHECK_EQ(chunks[7].type, "IEND");
  CHECK_EQ(chunks[7].data, "");
  for (const auto& entry : fs::directory_iterator(path.parent_path())) {
    CHECK_EQ(entry.path().filename().string(), "out.png");  // no temporary file left behind
  }
}

void test_refusals(const fs::path& dir) {
  const uint8_t pixel[3] = {0, 0, 0};
  const std::string path = (dir / "refused.png").string();
  const auto save = [&](const std::string& to, const ordered_json& metadata) {
    return input_error_of([&] { lcmrt::save_png(to, pixel, 1, 1, metadata); });
  };
  CHECK_EQ(save(path, {{"lcmrt", 1}}),
           "metadata may not have a field named 'lcmrt': that key holds the whole dict.");
  CHECK_EQ(save(path, {{std::string(80, 'k'), 1}}),
           "metadata key '" + std::string(80, 'k') + "' cannot be a PNG text key: use 1-79 ASCII characters.");
  CHECK_EQ(save(path, {{"", 1}}), "metadata key '' cannot be a PNG text key: use 1-79 ASCII characters.");
  CHECK_EQ(save(path, {{"clé", 1}}), "metadata key 'clé' cannot be a PNG text key: use 1-79 ASCII characters.");
  CHECK(save(path, ordered_json::array()).find("JSON object") != std::string::npos);
  CHECK(save(path, {{"bad", std::string("\xff")}}).find("PNG metadata must be JSON values") == 0);
  const std::string not_png = ": lcmrt writes PNG files (the settings go in PNG text chunks), so name it *.png.";
  CHECK_EQ(save((dir / "x.jpg").string(), ordered_json::object()), (dir / "x.jpg").string() + not_png);
  CHECK_EQ(save((dir / ".png").string(), ordered_json::object()), (dir / ".png").string() + not_png);
  fs::create_directories(dir / "folder.png");
  CHECK_EQ(save((dir / "folder.png").string(), ordered_json::object()),
           (dir / "folder.png").string() + " is a folder; give a file name ending in .png.");
  std::ofstream(dir / "a-file") << "x";
  CHECK_EQ(save((dir / "a-file" / "sub" / "x.png").string(), ordered_json::object()),
           "Cannot write " + (dir / "a-file" / "sub" / "x.png").string() + ": " + (dir / "a-file").string() +
               " is a file, not a folder.");
  CHECK(!fs::exists(path));
  CHECK_EQ(save((dir / "UPPER.PNG").string(), ordered_json::object()), "");
}

void test_python_json() {
  CHECK_EQ(lcmrt::python_json(nullptr), "null");
  CHECK_EQ(lcmrt::python_json(true), "true");
  CHECK_EQ(lcmrt::python_json(false), "false");
  CHECK_EQ(lcmrt::python_json(-5), "-5");
  CHECK_EQ(lcmrt::python_json(std::numeric_limits<uint64_t>::max()), "18446744073709551615");
  CHECK_EQ(lcmrt::python_json(std::numeric_limits<int64_t>::min()), "-9223372036854775808");
  const std::pair<double, const char*> floats[] = {
      {0.1, "0.1"},           {1.0, "1.0"},
      {-0.0, "-0.0"},         {1e-7, "1e-07"},
      {1.5e-7, "1.5e-07"},    {0.0001, "0.0001"},
      {0.00001, "1e-05"},     {123456789.0, "123456789.0"},
      {1e15, "1000000000000000.0"}, {9999999999999998.0, "9999999999999998.0"},
      {1e16, "1e+16"},        {1.2345678901234568e+17, "1.2345678901234568e+17"},
      {1e22, "1e+22"},        {5e-324, "5e-324"},
      {1.7976931348623157e308, "1.7976931348623157e+308"}, {-2.5, "-2.5"},
      {0.3333333333333333, "0.3333333333333333"}, {std::numeric_limits<double>::infinity(), "Infinity"},
      {-std::numeric_limits<double>::infinity(), "-Infinity"}, {std::nan(""), "NaN"},
  };
  for (const auto& [value, text] : floats) CHECK_EQ(lcmrt::python_json(value), text);
  CHECK_EQ(lcmrt::python_json("a\"b\\c\n\r\t\b\f\x01\x1f\x7f é 猫 😀/"),
           "\"a\\\"b\\\\c\\n\\r\\t\\b\\f\\u0001\\u001f\x7f é 猫 😀/\"");
  CHECK_EQ(lcmrt::python_json(ordered_json::object()), "{}");
  CHECK_EQ(lcmrt::python_json(ordered_json::array()), "[]");
  const auto nested = ordered_json::parse(R"({"z": [1, {"b": null, "a": [true, 2.0]}], "a": {"\n": "x"}})");
  CHECK_EQ(lcmrt::python_json(nested), "{\"z\": [1, {\"b\": null, \"a\": [true, 2.0]}], \"a\": {\"\\n\": \"x\"}}");
  bool refused = false;
  try {
    lcmrt::python_json(std::string("\xc3("));
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused);
}

}  // namespace

int main() {
  char pattern[] = "/tmp/lcmrt-test-png-XXXXXX";
  const fs::path dir = fs::canonical(mkdtemp(pattern));
  test_save_png(dir);
  test_refusals(dir);
  test_python_json();
  fs::remove_all(dir);
  return check_exit();
}
