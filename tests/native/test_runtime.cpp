// The native runtime through its public C++ API (lcmrt.hpp over the C API), on the tiny folders that
// make_tiny_folders.sh builds: determinism, several images, adapter swaps (A -> B -> A exact, refused swaps keep
// the set), errors as status codes, one pipeline shared by threads, PNG output. Run under ASan/UBSan in CI.
//   test_runtime CFG_FOLDER REFIT_FOLDER OUT_DIR
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "lcmrt/lcmrt.hpp"

namespace {

const char* kPrompt = "a watercolor fox in the snow";

std::vector<float> image_of(const lcmrt::Images& images, int index) {
  const float* pixels = images.pixels(index);
  return std::vector<float>(pixels, pixels + size_t(images.height()) * images.width() * 3);
}

std::vector<float> generate(const lcmrt::Pipeline& pipe, uint64_t seed, int steps = 2, double guidance = 1.0) {
  return image_of(pipe.generate(lcmrt::Request(kPrompt).seed(seed).steps(steps).guidance_scale(guidance)), 0);
}

float max_difference(const std::vector<float>& a, const std::vector<float>& b) {
  float most = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) most = std::fmax(most, std::fabs(a[i] - b[i]));
  return a.size() == b.size() ? most : INFINITY;
}

lcmrt_status status_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const lcmrt::Error& e) {
    CHECK(std::strlen(e.what()) > 20);  // a message that names the problem and the fix
    return e.status();
  }
  return LCMRT_OK;
}

void determinism_and_images(const std::string& folder) {
  const lcmrt::Pipeline pipe(folder);
  const auto a = generate(pipe, 0), b = generate(pipe, 0), c = generate(pipe, 1);
  CHECK_EQ(max_difference(a, b), 0.0f);
  CHECK(max_difference(a, c) > 0.05f);
  const auto guided = generate(pipe, 0, 2, 1.8);
  CHECK(max_difference(a, guided) > 1e-3f);
  const lcmrt::Images three = pipe.generate(lcmrt::Request(kPrompt).seed(0).steps(2).num_images(3));
  CHECK_EQ(three.count(), 3);
  CHECK_EQ(three.height(), 128);
  CHECK_EQ(max_difference(image_of(three, 0), a), 0.0f);  // image 0 of a seed, however many are drawn
  CHECK(three.pixels(3) == nullptr);
  for (float v : image_of(three, 2)) CHECK(v >= 0.0f && v <= 1.0f);
}

void adapters(const std::string& folder) {
  lcmrt::Pipeline pipe(folder);
  const auto listed = pipe.adapters();
  CHECK_EQ(listed.size(), size_t(3));
  const auto a = generate(pipe, 3);
  pipe.set_adapters({{"lcm2", 0.5}});
  const auto b = generate(pipe, 3);
  pipe.set_adapters({});
  const auto none = generate(pipe, 3);
  pipe.set_adapters({{"style-lora", 0.8}});
  CHECK_EQ(max_difference(generate(pipe, 3), a), 0.0f);  // A -> B -> none -> A: A bit for bit
  CHECK(max_difference(a, b) > 1e-3f && max_difference(a, none) > 1e-3f);
  CHECK_EQ(status_of([&] { pipe.set_adapters({{"nope", 1.0}}); }), LCMRT_ERROR_ADAPTER);
  CHECK_EQ(status_of([&] { pipe.set_adapters({{"lcm", 0.3}}); }), LCMRT_ERROR_ADAPTER);
  CHECK_EQ(status_of([&] { pipe.set_adapters({{"style-lora", NAN}}); }), LCMRT_ERROR_ADAPTER);
  CHECK_EQ(max_difference(generate(pipe, 3), a), 0.0f);  // the refused swaps left A active
}

void errors(const std::string& folder, const std::string& out) {
  CHECK_EQ(status_of([] { lcmrt::Pipeline{"/nonexistent/folder"}; }), LCMRT_ERROR_ENGINE_FOLDER);
  CHECK_EQ(status_of([&] { lcmrt::Pipeline{out}; }), LCMRT_ERROR_ENGINE_FOLDER);  // a folder without a manifest
  const lcmrt::Pipeline pipe(folder);
  CHECK_EQ(status_of([&] { pipe.generate(lcmrt::Request(kPrompt).steps(0)); }), LCMRT_ERROR_GENERATION);
  CHECK_EQ(status_of([&] { pipe.generate(lcmrt::Request(kPrompt).steps(51)); }), LCMRT_ERROR_GENERATION);
  CHECK_EQ(status_of([&] { pipe.generate(lcmrt::Request(kPrompt).num_images(0)); }), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK_EQ(status_of([&] { pipe.generate(lcmrt::Request(kPrompt).size(100, 100)); }), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK_EQ(status_of([&] { pipe.generate(lcmrt::Request("a \xff fox")); }), LCMRT_ERROR_INVALID_ARGUMENT);
  const lcmrt::Images images = pipe.generate(lcmrt::Request(kPrompt).steps(1));
  CHECK_EQ(status_of([&] { images.save_png(0, out + "/not-a-png.jpg"); }), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK_EQ(status_of([&] { images.save_png(5, out + "/x.png"); }), LCMRT_ERROR_INVALID_ARGUMENT);
  // the C API takes NULL anywhere without crashing
  lcmrt_pipeline* none = nullptr;
  CHECK_EQ(lcmrt_pipeline_load(nullptr, nullptr, &none), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK_EQ(lcmrt_pipeline_load(folder.c_str(), nullptr, nullptr), LCMRT_ERROR_INVALID_ARGUMENT);
  lcmrt_images* no_images = nullptr;
  CHECK_EQ(lcmrt_generate(nullptr, nullptr, &no_images), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK(std::strlen(lcmrt_last_error()) > 0);
  CHECK_EQ(lcmrt_set_adapters(nullptr, nullptr, nullptr, 0), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK_EQ(lcmrt_images_save_png(nullptr, 0, "x.png"), LCMRT_ERROR_INVALID_ARGUMENT);
  CHECK_EQ(lcmrt_images_count(nullptr), 0);
  lcmrt_images_free(nullptr);
  lcmrt_pipeline_free(nullptr);
  lcmrt_request_init(nullptr);
}

void threads(const std::string& folder) {
  lcmrt::Pipeline pipe(folder);
  const std::vector<std::pair<std::string, double>> sets[2] = {{{"style-lora", 0.8}}, {{"lcm2", 0.6}}};
  std::vector<float> expected[2][3];
  for (int s = 0; s < 2; ++s) {
    pipe.set_adapters(sets[s]);
    for (int seed = 0; seed < 3; ++seed) expected[s][seed] = generate(pipe, seed);
  }
  std::atomic<int> mixed{0}, failures{0};
  std::vector<std::thread> workers;
  for (int seed = 0; seed < 3; ++seed)
    workers.emplace_back([&, seed] {
      for (int round = 0; round < 3; ++round) {
        try {
          const auto image = generate(pipe, seed);
          if (max_difference(image, expected[0][seed]) != 0 && max_difference(image, expected[1][seed]) != 0) ++mixed;
        } catch (const lcmrt::Error&) {
          ++failures;
        }
      }
    });
  workers.emplace_back([&] {
    for (int k = 0; k < 12; ++k) pipe.set_adapters(sets[k % 2]);
  });
  for (auto& w : workers) w.join();
  CHECK_EQ(mixed.load(), 0);  // every image is its seed's under one adapter set
  CHECK_EQ(failures.load(), 0);
}

void png(const std::string& folder, const std::string& out) {
  const lcmrt::Pipeline pipe(folder);
  const std::string path = out + "/sub/fox.png";
  pipe.generate(lcmrt::Request(kPrompt).steps(2).seed(7)).save_png(0, path);
  std::ifstream in(path, std::ios::binary);
  char signature[8] = {};
  in.read(signature, 8);
  CHECK(in && std::memcmp(signature, "\x89PNG\r\n\x1a\n", 8) == 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: test_runtime CFG_FOLDER REFIT_FOLDER OUT_DIR\n";
    return 2;
  }
  const std::string cfg = argv[1], refit = argv[2], out = argv[3];
  std::filesystem::create_directories(out);
  CHECK(std::string(lcmrt_version()) == "0.1.0");
  determinism_and_images(cfg);
  adapters(refit);
  errors(cfg, out);
  threads(refit);
  png(cfg, out);
  return check_exit();
}
