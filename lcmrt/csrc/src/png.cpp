// PNG files as lcmrt/images.py writes them (check_png_path, save_png), encoded here with zlib: IHDR (8-bit RGB),
// the metadata's iTXt chunks, one IDAT (every row with filter 0, "None"), IEND. PNG spec: www.w3.org/TR/png-3.
#include "png.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include <zlib.h>

#include "errors.h"

namespace lcmrt {
namespace {

constexpr const char* kMetadataKey = "lcmrt";  // lcmrt/images.py METADATA_KEY: the whole metadata as JSON
constexpr size_t kMaxKey = 79;                 // PNG keywords are 1-79 Latin-1 characters (PNG spec, 11.3.4)
constexpr uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
// lcmrt/manifest.py SHAPE_LIMITS' height and width; it also keeps the one IDAT chunk under PNG's 2^31 - 1 bytes
constexpr int kMaxSide = 8192;

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Python's Path.parent: "." for a name without a folder, and "/" and "." are their own parents.
std::filesystem::path python_parent(const std::filesystem::path& path) {
  const auto parent = path.parent_path();
  return parent.empty() ? "." : parent;
}

// Python's repr() of a str, for the ASCII characters it escapes (non-ASCII text is shown as it is).
std::string python_repr(const std::string& text) {
  const bool double_quotes = text.find('\'') != std::string::npos && text.find('"') == std::string::npos;
  const char quote = double_quotes ? '"' : '\'';
  std::string out(1, quote);
  for (const unsigned char c : text) {
    if (c == quote || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7f) {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + quote;
}

// Python's json string escaping with ensure_ascii=False: the control characters, '"' and '\\'; nothing else.
void append_json_string(std::string& out, const std::string& text) {
  // nlohmann's serializer rejects a string that is not UTF-8, as Python would fail to encode it
  (void)nlohmann::json(text).dump();
  out += '"';
  for (const unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char escaped[7];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
          out += escaped;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Python's float.__repr__ (and json's names for the non-finite values): the shortest digits that read back as the
// same double, in exponent form when the decimal exponent is below -4 or above 15, else as fixed with at least ".0".
void append_python_float(std::string& out, double value) {
  if (std::isnan(value)) {
    out += "NaN";
    return;
  }
  if (std::isinf(value)) {
    out += value > 0 ? "Infinity" : "-Infinity";
    return;
  }
  char buffer[64];
  // the shortest round-trip digits as d.ddde[+-]XX, which is also exactly how Python writes the exponent form
  const auto end = std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::scientific).ptr;
  const std::string scientific(buffer, end);
  const size_t e = scientific.find('e');
  const int exponent = std::stoi(scientific.substr(e + 1));
  const int point = exponent + 1;  // digits d1 d2 ... mean 0.d1d2... x 10^point
  if (point <= -4 || point > 16) {
    out += scientific;
    return;
  }
  const bool negative = scientific[0] == '-';
  if (negative) out += '-';
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e; ++i) {
    if (scientific[i] != '.') digits += scientific[i];
  }
  const int count = static_cast<int>(digits.size());
  if (point <= 0) {
    out += "0." + std::string(static_cast<size_t>(-point), '0') + digits;
  } else if (point >= count) {
    out += digits + std::string(static_cast<size_t>(point - count), '0') + ".0";
  } else {
    out += digits.substr(0, static_cast<size_t>(point)) + "." + digits.substr(static_cast<size_t>(point));
  }
}

void append_python_json(std::string& out, const nlohmann::ordered_json& value) {
  using Type = nlohmann::ordered_json::value_t;
  switch (value.type()) {
    case Type::null: out += "null"; break;
    case Type::boolean: out += value.get<bool>() ? "true" : "false"; break;
    case Type::number_integer: out += std::to_string(value.get<int64_t>()); break;
    case Type::number_unsigned: out += std::to_string(value.get<uint64_t>()); break;
    case Type::number_float: append_python_float(out, value.get<double>()); break;
    case Type::string: append_json_string(out, value.get_ref<const std::string&>()); break;
    case Type::array: {
      out += '[';
      for (size_t i = 0; i < value.size(); ++i) {
        if (i) out += ", ";
        append_python_json(out, value[i]);
      }
      out += ']';
      break;
    }
    case Type::object: {
      out += '{';
      bool first = true;
      for (const auto& [key, item] : value.items()) {
        if (!first) out += ", ";
        first = false;
        append_json_string(out, key);
        out += ": ";
        append_python_json(out, item);
      }
      out += '}';
      break;
    }
    case Type::binary:
    case Type::discarded: throw std::invalid_argument("binary data is not a JSON value");
  }
}

void append_u32(std::vector<uint8_t>& out, uint32_t value) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(value >> shift));
}

// A PNG chunk: length, type, data, CRC-32 of type and data.
void append_chunk(std::vector<uint8_t>& out, const char type[4], const std::string& data) {
  append_u32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  append_u32(out, static_cast<uint32_t>(crc32(0, out.data() + start, static_cast<uInt>(out.size() - start))));
}

// iTXt as PIL's PngInfo.add_itxt writes it: keyword, uncompressed, no language tag or translated keyword.
std::string itxt(const std::string& key, const std::string& text) {
  return key + std::string("\0\0\0\0\0", 5) + text;
}

std::string ihdr(int height, int width) {
  std::vector<uint8_t> data;
  append_u32(data, static_cast<uint32_t>(width));
  append_u32(data, static_cast<uint32_t>(height));
  data.insert(data.end(), {8, 2, 0, 0, 0});  // bit depth 8, RGB, deflate, adaptive filtering, no interlace
  return std::string(data.begin(), data.end());
}

std::string idat(const uint8_t* pixels, int height, int width) {
  const size_t row = static_cast<size_t>(width) * 3;
  std::vector<uint8_t> rows;
  rows.reserve((row + 1) * static_cast<size_t>(height));
  for (int y = 0; y < height; ++y) {
    rows.push_back(0);  // filter type None
    rows.insert(rows.end(), pixels + y * row, pixels + (y + 1) * row);
  }
  uLongf size = compressBound(static_cast<uLong>(rows.size()));
  std::string compressed(size, '\0');
  if (compress2(reinterpret_cast<Bytef*>(compressed.data()), &size, rows.data(), static_cast<uLong>(rows.size()),
                Z_DEFAULT_COMPRESSION) != Z_OK) {
    throw std::bad_alloc();  // compress2 fails only when out of memory, given a buffer of compressBound bytes
  }
  compressed.resize(size);
  return compressed;
}

std::vector<uint8_t> encode_png(const uint8_t* pixels, int height, int width,
                                const std::vector<std::pair<std::string, std::string>>& texts) {
  std::vector<uint8_t> png(std::begin(kSignature), std::end(kSignature));
  append_chunk(png, "IHDR", ihdr(height, width));
  for (const auto& [key, text] : texts) append_chunk(png, "iTXt", itxt(key, text));
  append_chunk(png, "IDAT", idat(pixels, height, width));
  append_chunk(png, "IEND", "");
  return png;
}

// The metadata's text chunks, checked as lcmrt/images.py save_png checks them.
std::vector<std::pair<std::string, std::string>> text_chunks(const nlohmann::ordered_json& metadata) {
  if (!metadata.is_object()) {
    throw input_error("PNG metadata must be a JSON object of fields, got " + metadata.dump().substr(0, 80) + ".");
  }
  if (metadata.contains(kMetadataKey)) {
    throw input_error("metadata may not have a field named 'lcmrt': that key holds the whole dict.");
  }
  std::vector<std::pair<std::string, std::string>> texts;
  try {
    texts.emplace_back(kMetadataKey, python_json(metadata));
  } catch (const std::invalid_argument& e) {
    throw input_error(std::string("PNG metadata must be JSON values (str, int, float, bool, None, list, dict): ") +
                      e.what());
  }
  for (const auto& [key, value] : metadata.items()) {
    bool ascii = true;
    for (const unsigned char c : key) ascii = ascii && c < 0x80 && c != 0;  // a NUL would end the keyword early
    if (key.empty() || key.size() > kMaxKey || !ascii) {
      throw input_error("metadata key " + python_repr(key) + " cannot be a PNG text key: use 1-" +
                        std::to_string(kMaxKey) + " ASCII characters.");
    }
    texts.emplace_back(key, value.is_string() ? value.get<std::string>() : python_json(value));
  }
  return texts;
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  const std::filesystem::path target(path);
  const std::string tmp = (target.parent_path() / ("." + target.filename().string() + "." +
                                                   std::to_string(getpid()) + "." + std::to_string(gettid())))
                              .string();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw io_error("Cannot write " + path + ": " + std::strerror(errno) + ".");
  std::string failure;
  for (size_t done = 0; done < bytes.size() && failure.empty();) {
    const ssize_t wrote = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (wrote > 0) done += static_cast<size_t>(wrote);
    else if (errno != EINTR) failure = std::strerror(errno);
  }
  if (::close(fd) != 0 && failure.empty()) failure = std::strerror(errno);
  if (failure.empty() && ::rename(tmp.c_str(), path.c_str()) != 0) failure = std::strerror(errno);
  if (!failure.empty()) {
    ::unlink(tmp.c_str());
    throw io_error("Cannot write " + path + ": " + failure + ".");
  }
}

}  // namespace

void check_png_path(const std::string& path) {
  const std::filesystem::path file(path);
  if (is_dir(path)) throw input_error(path + " is a folder; give a file name ending in .png.");
  // Python's Path.suffix: from the name's last ".", unless that is its first or last character
  const std::string name = file.filename().string();
  const size_t dot = name.rfind('.');
  std::string suffix = dot != std::string::npos && dot > 0 && dot + 1 < name.size() ? name.substr(dot) : "";
  for (char& c : suffix) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (suffix != ".png") {
    throw input_error(path + ": lcmrt writes PNG files (the settings go in PNG text chunks), so name it *.png.");
  }
  std::filesystem::path parent = python_parent(file);
  while (!exists(parent.string()) && python_parent(parent) != parent) parent = python_parent(parent);
  if (!is_dir(parent.string())) {
    throw input_error("Cannot write " + path + ": " + parent.string() + " is a file, not a folder.");
  }
  if (::access(parent.c_str(), W_OK | X_OK) != 0) {
    throw input_error("Cannot write " + path + ": " + parent.string() + " is not writable.");
  }
}

void save_png(const std::string& path, const uint8_t* pixels, int height, int width,
              const nlohmann::ordered_json& metadata) {
  check_png_path(path);
  if (height < 1 || width < 1 || height > kMaxSide || width > kMaxSide) {
    throw input_error("Cannot write a " + std::to_string(height) + "x" + std::to_string(width) +
                      " PNG: height and width must be 1.." + std::to_string(kMaxSide) + " pixels.");
  }
  const auto png = encode_png(pixels, height, width, text_chunks(metadata));
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code error;
  if (!parent.empty() && !std::filesystem::create_directories(parent, error) && error) {
    throw io_error("Cannot create the folder " + parent.string() + " for " + path + ": " + error.message() + ".");
  }
  write_file(path, png);
}

std::string python_json(const nlohmann::ordered_json& value) {
  std::string out;
  try {
    append_python_json(out, value);
  } catch (const nlohmann::json::type_error& e) {
    throw std::invalid_argument(std::string("a string is not valid UTF-8 (") + e.what() + ")");
  }
  return out;
}

}  // namespace lcmrt
