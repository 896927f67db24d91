// lcmrt-probe: the native runtime's internals as a command-line tool, for the pytest parity tests against the
// Python runtime (tests/native/test_*.py).
//   lcmrt-probe noise SEED STREAM IMAGES PER_IMAGE   -> float32 values, raw little-endian, on stdout
//   lcmrt-probe tokenize TOKENIZER_JSON MAX_LENGTH PAD_ID   JSON array of prompts on stdin
//                                                   -> JSON array of {"ids": [...], "dropped": N} on stdout
//   lcmrt-probe sampler STEPS   scheduler config JSON on stdin -> JSON {"timesteps", "alphas_cumprod",
//                               "coefficients": [[x0_from_sample, ..., sqrt_beta_next, final], ...]}, floats exact
//   lcmrt-probe png OUT.png HEIGHT WIDTH   JSON metadata object on stdin -> OUT.png, pixel (y, x) = (x % 256,
//                                          y % 256, (x + 2y) % 256)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "noise.h"
#include "png.h"
#include "sampler.h"
#include "tokenizer.h"

namespace {

int noise(int argc, char** argv) {
  if (argc != 6) return 2;
  const auto values = lcmrt::standard_normal(std::stoull(argv[2]), static_cast<uint32_t>(std::stoul(argv[3])),
                                             std::stoll(argv[4]), std::stoll(argv[5]));
  std::fwrite(values.data(), sizeof(float), values.size(), stdout);
  return 0;
}

int tokenize(int argc, char** argv) {
  if (argc != 5) return 2;
  const lcmrt::ClipTokenizer tokenizer(argv[2], std::stoi(argv[3]), std::stoll(argv[4]));
  auto results = nlohmann::json::array();
  for (const auto& prompt : nlohmann::json::parse(std::cin)) {
    size_t dropped = 0;
    const auto ids = tokenizer.encode(prompt.get<std::string>(), &dropped);
    results.push_back({{"ids", ids}, {"dropped", dropped}});
  }
  std::cout << results.dump() << "\n";
  return 0;
}

int sampler(int argc, char** argv) {
  if (argc != 3) return 2;
  lcmrt::LcmSampler lcm(nlohmann::json::parse(std::cin));
  lcm.set_timesteps(std::stoi(argv[2]));
  auto coefficients = nlohmann::json::array();
  for (size_t i = 0; i < lcm.timesteps().size(); ++i) {
    const lcmrt::StepCoefficients& c = lcm.coefficients(i);
    const float values[] = {c.x0_from_sample, c.x0_from_output, c.x0_divisor, c.clip_range,     c.c_skip,
                            c.c_out,          c.sqrt_alpha_next, c.sqrt_beta_next};
    auto row = nlohmann::json::array();
    for (float v : values) row.push_back(std::isinf(v) ? nlohmann::json("inf") : nlohmann::json(double(v)));
    row.push_back(c.final);
    coefficients.push_back(row);
  }
  std::vector<double> alphas(lcm.alphas_cumprod().begin(), lcm.alphas_cumprod().end());
  std::cout << nlohmann::json{{"timesteps", lcm.timesteps()}, {"alphas_cumprod", alphas}, {"coefficients", coefficients}}
            << "\n";
  return 0;
}

int png(int argc, char** argv) {
  if (argc != 5) return 2;
  const int height = std::stoi(argv[3]), width = std::stoi(argv[4]);
  std::vector<uint8_t> pixels;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      pixels.insert(pixels.end(), {uint8_t(x % 256), uint8_t(y % 256), uint8_t((x + 2 * y) % 256)});
    }
  }
  lcmrt::save_png(argv[2], pixels.data(), height, width, nlohmann::ordered_json::parse(std::cin));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  int status = 2;
  try {
    if (command == "noise") status = noise(argc, argv);
    if (command == "tokenize") status = tokenize(argc, argv);
    if (command == "png") status = png(argc, argv);
    if (command == "sampler") status = sampler(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "lcmrt-probe " << command << ": " << e.what() << "\n";
    return 1;
  }
  if (status == 2)
    std::cerr << "usage: lcmrt-probe noise SEED STREAM IMAGES PER_IMAGE\n"
                 "       lcmrt-probe tokenize TOKENIZER_JSON MAX_LENGTH PAD_ID < prompts.json\n"
                 "       lcmrt-probe png OUT.png HEIGHT WIDTH < metadata.json\n"
                 "       lcmrt-probe sampler STEPS < scheduler_config.json\n";
  return status;
}
