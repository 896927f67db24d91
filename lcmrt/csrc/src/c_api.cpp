// The C API (lcmrt/lcmrt.h) over lcmrt::Pipeline: every exception becomes a status and a thread-local message.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <string>

#include "errors.h"
#include "lcmrt/lcmrt.h"
#include "pipeline.h"
#include "png.h"

struct lcmrt_pipeline {
  lcmrt::Pipeline pipeline;
};

struct lcmrt_images {
  lcmrt::Images images;
  std::string warnings;
};

namespace {

thread_local std::string last_error;

template <typename Body>
lcmrt_status guarded(Body&& body) {
  try {
    body();
    last_error.clear();
    return LCMRT_OK;
  } catch (const lcmrt::Error& e) {
    last_error = e.what();
    return e.status();
  } catch (const std::bad_alloc&) {
    last_error = "Out of memory.";
    return LCMRT_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error = std::string("Internal error: ") + e.what() + ". Please report it.";
    return LCMRT_ERROR_INTERNAL;
  } catch (...) {
    last_error = "Internal error of an unknown kind. Please report it.";
    return LCMRT_ERROR_INTERNAL;
  }
}

void require(const void* pointer, const char* what) {
  if (!pointer) throw lcmrt::input_error(std::string(what) + " is NULL.");
}

}  // namespace

extern "C" {

const char* lcmrt_last_error(void) { return last_error.c_str(); }

const char* lcmrt_status_name(lcmrt_status status) {
  switch (status) {
    case LCMRT_OK: return "ok";
    case LCMRT_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case LCMRT_ERROR_ENGINE_FOLDER: return "engine folder error";
    case LCMRT_ERROR_ADAPTER: return "adapter error";
    case LCMRT_ERROR_GENERATION: return "generation error";
    case LCMRT_ERROR_BACKEND: return "backend error";
    case LCMRT_ERROR_IO: return "I/O error";
    case LCMRT_ERROR_OUT_OF_MEMORY: return "out of memory";
    case LCMRT_ERROR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char* lcmrt_version(void) { return lcmrt::kVersion; }

lcmrt_status lcmrt_pipeline_load(const char* folder, const lcmrt_load_options* options, lcmrt_pipeline** pipeline) {
  return guarded([&] {
    require(pipeline, "pipeline (the output pointer)");
    *pipeline = nullptr;
    require(folder, "folder");
    const int threads = options ? options->threads : 0;
    if (threads < 0) throw lcmrt::input_error("threads=" + std::to_string(threads) + " must be 0 (the default) or positive.");
    *pipeline = new lcmrt_pipeline{lcmrt::Pipeline(folder, threads)};
  });
}

void lcmrt_pipeline_free(lcmrt_pipeline* pipeline) { delete pipeline; }

void lcmrt_request_init(lcmrt_request* request) {
  if (!request) return;
  std::memset(request, 0, sizeof *request);
  request->steps = 4;
  request->guidance_scale = 1.0;
  request->num_images = 1;
}

lcmrt_status lcmrt_generate(lcmrt_pipeline* pipeline, const lcmrt_request* request, lcmrt_images** images) {
  return guarded([&] {
    require(images, "images (the output pointer)");
    *images = nullptr;
    require(pipeline, "pipeline");
    require(request, "request");
    require(request->prompt, "request->prompt");
    lcmrt::Request r;
    r.prompt = request->prompt;
    if (request->negative_prompt) r.negative_prompt = request->negative_prompt;
    r.steps = request->steps;
    r.guidance_scale = request->guidance_scale;
    r.seed = request->seed;
    r.num_images = request->num_images;
    r.height = request->height;
    r.width = request->width;
    r.latents = request->latents;
    r.step_noise = request->step_noise;
    if (r.height < 0 || r.width < 0) throw lcmrt::input_error("height and width must be 0 (the default size) or positive.");
    if (r.step_noise && !r.latents)
      throw lcmrt::input_error("step_noise without latents: pass both, or neither to draw them from the seed.");
    auto out = std::make_unique<lcmrt_images>();
    out->images = pipeline->pipeline.generate(r);
    for (const std::string& w : out->images.warnings) out->warnings += w + "\n";
    *images = out.release();
  });
}

int lcmrt_images_count(const lcmrt_images* images) { return images ? images->images.count : 0; }
int lcmrt_images_height(const lcmrt_images* images) { return images ? images->images.height : 0; }
int lcmrt_images_width(const lcmrt_images* images) { return images ? images->images.width : 0; }

const float* lcmrt_images_pixels(const lcmrt_images* images, int index) {
  if (!images || index < 0 || index >= images->images.count) return nullptr;
  return images->images.pixels.data() + static_cast<size_t>(index) * images->images.height * images->images.width * 3;
}

const char* lcmrt_images_warnings(const lcmrt_images* images) { return images ? images->warnings.c_str() : ""; }

lcmrt_status lcmrt_images_save_png(const lcmrt_images* images, int index, const char* path) {
  return guarded([&] {
    require(images, "images");
    require(path, "path");
    const float* pixels = lcmrt_images_pixels(images, index);
    if (!pixels)
      throw lcmrt::input_error("image index " + std::to_string(index) + " is outside 0.." +
                               std::to_string(images->images.count - 1) + ".");
    lcmrt::check_png_path(path);
    const size_t count = static_cast<size_t>(images->images.height) * images->images.width * 3;
    std::vector<uint8_t> bytes(count);
    for (size_t i = 0; i < count; ++i)  // as Python's to_pil: clip, * 255, round half to even
      bytes[i] = static_cast<uint8_t>(std::nearbyint(std::clamp(pixels[i], 0.0f, 1.0f) * 255.0f));
    lcmrt::save_png(path, bytes.data(), images->images.height, images->images.width, images->images.metadata);
  });
}

lcmrt_status lcmrt_images_timings(const lcmrt_images* images, double* text_encoder, double* unet, double* vae_decode,
                                  double* total) {
  return guarded([&] {
    require(images, "images");
    if (text_encoder) *text_encoder = images->images.text_encoder_seconds;
    if (unet) *unet = images->images.unet_seconds;
    if (vae_decode) *vae_decode = images->images.vae_decode_seconds;
    if (total) *total = images->images.total_seconds;
  });
}

void lcmrt_images_free(lcmrt_images* images) { delete images; }

lcmrt_status lcmrt_set_adapters(lcmrt_pipeline* pipeline, const char* const* names, const double* weights,
                                size_t count) {
  return guarded([&] {
    require(pipeline, "pipeline");
    if (count) {
      require(names, "names");
      require(weights, "weights");
    }
    lcmrt::AdapterSet requested;
    for (size_t i = 0; i < count; ++i) {
      require(names[i], "an adapter name");
      if (!requested.emplace(names[i], weights[i]).second)
        throw lcmrt::adapter_error(std::string("Adapter '") + names[i] + "' is named twice; name each adapter once.");
    }
    pipeline->pipeline.set_adapters(requested);
  });
}

size_t lcmrt_adapter_count(const lcmrt_pipeline* pipeline) {
  return pipeline ? pipeline->pipeline.adapters().size() : 0;
}

lcmrt_status lcmrt_adapter_at(const lcmrt_pipeline* pipeline, size_t index, const char** name, double* weight,
                              int* refittable) {
  return guarded([&] {
    require(pipeline, "pipeline");
    const auto adapters = pipeline->pipeline.adapters();
    if (index >= adapters.size())
      throw lcmrt::input_error("adapter index " + std::to_string(index) + " is outside the folder's " +
                               std::to_string(adapters.size()) + " adapters.");
    if (name) *name = adapters[index].name;
    if (weight) *weight = adapters[index].weight;
    if (refittable) *refittable = adapters[index].refittable;
  });
}

}  // extern "C"
