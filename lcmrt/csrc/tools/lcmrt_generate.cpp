// lcmrt-generate: the native runtime's command line, like `lcmrt generate` (same folder, same seed, same image).
//   lcmrt-generate FOLDER "prompt" -o out.png [--steps 4] [--seed N] [--guidance G] [--negative-prompt TEXT]
//                  [--num-images N] [--size WIDTHxHEIGHT] [--adapter NAME:WEIGHT ...] [--threads N] [--repeat N]
// --repeat N generates N times in one process (a timing line each; the last images are written): warm timings.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "lcmrt/lcmrt.hpp"

namespace {

const char* kUsage =
    "usage: lcmrt-generate FOLDER PROMPT [-o OUT.png] [--steps N] [--seed N] [--guidance G]\n"
    "                      [--negative-prompt TEXT] [--num-images N] [--size WIDTHxHEIGHT]\n"
    "                      [--adapter NAME:WEIGHT ...] [--threads N] [--repeat N]\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// `text` read whole by `convert` (std::stoll, std::stoull, std::stod), or a usage error naming the option
template <typename Convert>
auto parsed(const std::string& option, const std::string& text, Convert convert, const char* kind) {
  size_t used = 0;
  decltype(convert(text, &used)) value{};
  try {
    value = convert(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty()) throw UsageError(option + " takes " + kind + ", got '" + text + "'");
  return value;
}

long long integer(const std::string& option, const std::string& text) {
  return parsed(option, text, [](const std::string& t, size_t* used) { return std::stoll(t, used); }, "an integer");
}

double number(const std::string& option, const std::string& text) {
  return parsed(option, text, [](const std::string& t, size_t* used) { return std::stod(t, used); }, "a number");
}

std::string numbered(const std::string& path, int index) {  // out.png -> out-0.png, as `lcmrt generate`
  const size_t dot = path.rfind('.');
  return path.substr(0, dot) + "-" + std::to_string(index) + path.substr(dot);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::vector<std::string> positional;
  std::string out = "out.png";
  int steps = 4, num_images = 1, threads = 0, height = 0, width = 0, repeat = 1;
  double guidance = 1.0;
  bool has_seed = false, has_negative = false;
  unsigned long long seed = 0;
  std::string negative;
  std::vector<std::pair<std::string, double>> adapters;
  bool adapters_given = false;
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      }
      if (a.size() > 1 && a[0] == '-') {
        if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
        const std::string value = args[++i];
        if (a == "-o" || a == "--output") out = value;
        else if (a == "--steps") steps = static_cast<int>(integer(a, value));
        else if (a == "--num-images") num_images = static_cast<int>(integer(a, value));
        else if (a == "--threads") threads = static_cast<int>(integer(a, value));
        else if (a == "--repeat") repeat = static_cast<int>(integer(a, value));
        else if (a == "--guidance") guidance = number(a, value);
        else if (a == "--negative-prompt") negative = value, has_negative = true;
        else if (a == "--seed") {
          const char* kind = "an integer in [0, 2^64)";
          if (!value.empty() && value[0] == '-') throw UsageError("--seed takes " + std::string(kind) + ", got '" + value + "'");
          seed = parsed(a, value, [](const std::string& t, size_t* used) { return std::stoull(t, used); }, kind);
          has_seed = true;
        } else if (a == "--size") {
          const size_t x = value.find('x');
          if (x == std::string::npos) throw UsageError("--size takes WIDTHxHEIGHT, e.g. 512x512, got '" + value + "'");
          width = static_cast<int>(integer(a, value.substr(0, x)));
          height = static_cast<int>(integer(a, value.substr(x + 1)));
        } else if (a == "--adapter") {
          const size_t colon = value.rfind(':');
          if (colon == std::string::npos || colon == 0)
            throw UsageError("--adapter takes NAME:WEIGHT, e.g. papercut:0.8, got '" + value + "'");
          adapters.emplace_back(value.substr(0, colon), number(a, value.substr(colon + 1)));
          adapters_given = true;
        } else {
          throw UsageError("unknown option " + a);
        }
      } else {
        positional.push_back(a);
      }
    }
    if (positional.size() != 2) throw UsageError("give the engine folder and the prompt");
    if (repeat < 1) throw UsageError("--repeat takes a positive integer");
    const std::string suffix = out.size() >= 4 ? out.substr(out.size() - 4) : "";
    if (suffix != ".png" && suffix != ".PNG")  // checked before the load, not after a generation
      throw UsageError(out + ": lcmrt writes PNG files (the settings go in PNG text chunks), so name it *.png");
  } catch (const UsageError& e) {
    std::cerr << kUsage << "error: " << e.what() << "\n";
    return 2;
  }
  if (!has_seed) seed = std::random_device{}();
  try {
    const auto load_start = std::chrono::steady_clock::now();
    lcmrt::Pipeline pipe(positional[0], threads);
    if (adapters_given) pipe.set_adapters(adapters);
    const double load = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    lcmrt::Request request(positional[1]);
    request.steps(steps).guidance_scale(guidance).seed(seed).num_images(num_images).size(height, width);
    if (has_negative) request.negative_prompt(negative);
    std::unique_ptr<lcmrt::Images> images;
    for (int round = 0; round < repeat; ++round) {
      images = std::make_unique<lcmrt::Images>(pipe.generate(request));
      const auto t = images->timings();
      std::fprintf(stderr, "load %.2f s | text encoder %.3f s | UNet %.3f s/step x %d | VAE decode %.3f s | total %.2f s "
                   "(seed %llu)\n", load, t.text_encoder, t.unet / steps, steps, t.vae_decode, t.total, seed);
    }
    std::cerr << images->warnings();
    std::vector<std::string> paths;
    for (int i = 0; i < images->count(); ++i) {
      paths.push_back(images->count() == 1 ? out : numbered(out, i));
      images->save_png(i, paths.back());
    }
    for (const std::string& path : paths) std::cout << path << "\n";
  } catch (const lcmrt::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
