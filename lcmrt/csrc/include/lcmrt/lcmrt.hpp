// lcmrt's native runtime, C++ API: a thin RAII layer over the C API (lcmrt.h), header-only, so a product's
// compiler and standard library never meet lcmrt's. Errors are thrown as lcmrt::Error (status + message).
//
//   lcmrt::Pipeline pipe("engine/");
//   lcmrt::Images images = pipe.generate(lcmrt::Request("a watercolor fox in the snow").seed(7));
//   images.save_png(0, "fox.png");
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lcmrt/error.hpp"
#include "lcmrt/lcmrt.h"

namespace lcmrt {

inline void check(lcmrt_status status) {
  if (status != LCMRT_OK) throw Error(status, lcmrt_last_error());
}

// A generation's settings; the prompt strings are copied.
class Request {
 public:
  explicit Request(std::string prompt) : prompt_(std::move(prompt)) { lcmrt_request_init(&request_); }
  Request& negative_prompt(std::string text) {
    negative_ = std::move(text);
    has_negative_ = true;
    return *this;
  }
  Request& steps(int n) { return request_.steps = n, *this; }
  Request& guidance_scale(double g) { return request_.guidance_scale = g, *this; }
  Request& seed(uint64_t s) { return request_.seed = s, *this; }
  Request& num_images(int n) { return request_.num_images = n, *this; }
  Request& size(int height, int width) { return request_.height = height, request_.width = width, *this; }
  // explicit noise (see lcmrt_request); the arrays must outlive generate()
  Request& noise(const float* latents, const float* step_noise) {
    return request_.latents = latents, request_.step_noise = step_noise, *this;
  }
  const lcmrt_request* c_request() {
    request_.prompt = prompt_.c_str();
    request_.negative_prompt = has_negative_ ? negative_.c_str() : nullptr;
    return &request_;
  }

 private:
  std::string prompt_, negative_;
  bool has_negative_ = false;
  lcmrt_request request_{};
};

class Images {
 public:
  explicit Images(lcmrt_images* images) : images_(images, lcmrt_images_free) {}
  int count() const { return lcmrt_images_count(images_.get()); }
  int height() const { return lcmrt_images_height(images_.get()); }
  int width() const { return lcmrt_images_width(images_.get()); }
  // [height, width, 3] floats in [0, 1]
  const float* pixels(int index) const { return lcmrt_images_pixels(images_.get(), index); }
  void save_png(int index, const std::string& path) const {
    check(lcmrt_images_save_png(images_.get(), index, path.c_str()));
  }
  std::string warnings() const { return lcmrt_images_warnings(images_.get()); }
  struct Timings {
    double text_encoder, unet, vae_decode, total;
  };
  Timings timings() const {
    Timings t{};
    check(lcmrt_images_timings(images_.get(), &t.text_encoder, &t.unet, &t.vae_decode, &t.total));
    return t;
  }

 private:
  std::unique_ptr<lcmrt_images, void (*)(lcmrt_images*)> images_;
};

struct Adapter {
  std::string name;
  double weight;
  bool refittable;
};

// A loaded engine folder; share one between threads (see lcmrt.h).
class Pipeline {
 public:
  explicit Pipeline(const std::string& folder, int threads = 0) : pipeline_(nullptr, lcmrt_pipeline_free) {
    lcmrt_load_options options{threads};
    lcmrt_pipeline* loaded = nullptr;
    check(lcmrt_pipeline_load(folder.c_str(), &options, &loaded));
    pipeline_.reset(loaded);
  }
  Images generate(Request request) const {
    lcmrt_images* images = nullptr;
    check(lcmrt_generate(pipeline_.get(), request.c_request(), &images));
    return Images(images);
  }
  // {name, weight} of the refittable adapters to switch on; the others go to 0
  void set_adapters(const std::vector<std::pair<std::string, double>>& adapters) {
    std::vector<const char*> names;
    std::vector<double> weights;
    for (const auto& [name, weight] : adapters) {
      names.push_back(name.c_str());
      weights.push_back(weight);
    }
    check(lcmrt_set_adapters(pipeline_.get(), names.data(), weights.data(), names.size()));
  }
  std::vector<Adapter> adapters() const {
    std::vector<Adapter> out;
    for (size_t i = 0; i < lcmrt_adapter_count(pipeline_.get()); ++i) {
      const char* name = nullptr;
      double weight = 0;
      int refittable = 0;
      check(lcmrt_adapter_at(pipeline_.get(), i, &name, &weight, &refittable));
      out.push_back({name, weight, refittable != 0});
    }
    return out;
  }

 private:
  std::unique_ptr<lcmrt_pipeline, void (*)(lcmrt_pipeline*)> pipeline_;
};

}  // namespace lcmrt
