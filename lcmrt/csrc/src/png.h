// PNG output with the Python runtime's metadata (lcmrt/images.py save_png): an iTXt chunk "lcmrt" holding the
// whole metadata object as JSON, and one iTXt chunk per field (strings as they are, other values as JSON).
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace lcmrt {

// Check, before any work, that `path` can be written as lcmrt_png (lcmrt/images.py check_png_path's rules and
// messages: named *.png, not a folder, nearest existing parent a writable folder); input_error otherwise.
void check_png_path(const std::string& path);

// Write 8-bit RGB `pixels` ([height, width, 3], row-major) as a PNG at `path` (parent folders created), with
// `metadata` (a JSON object, its fields in the caller's order) in iTXt chunks; written to a temporary file in the
// same folder, then renamed. Metadata that is no JSON object, has a field "lcmrt", a key that is no PNG text key or
// a string that is not UTF-8 is an input_error.
void save_png(const std::string& path, const uint8_t* pixels, int height, int width,
              const nlohmann::ordered_json& metadata);

// Python's json.dumps(value, ensure_ascii=False): ", " and ": " separators, objects in their order, floats as
// repr() writes them (inf and nan as Infinity and NaN). Throws std::invalid_argument for a string that is not
// UTF-8 and for binary values, which Python's JSON has no text for.
std::string python_json(const nlohmann::ordered_json& value);

}  // namespace lcmrt
