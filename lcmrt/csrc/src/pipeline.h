// Prompt to images with one engine folder (lcmrt/pipeline.py Pipeline, text to image): tokenizers, text encoders
// (the family's conditioning), LCM sampler loop over the UNet with guidance none or classifier-free, VAE decode;
// adapters by refit inputs.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "adapters.h"
#include "manifest.h"
#include "session.h"
#include "tokenizer.h"

namespace lcmrt {

constexpr int kMaxSteps = 50;   // lcmrt/pipeline.py MAX_STEPS
constexpr int kMaxImages = 64;  // lcmrt/pipeline.py MAX_NUM_IMAGES
constexpr const char* kBackendName = "onnxruntime-cpu";
constexpr const char* kVersion = "0.1.0";  // lcmrt/__init__.py __version__

struct Request {
  std::string prompt;
  std::optional<std::string> negative_prompt;
  int steps = 4;
  double guidance_scale = 1.0;
  uint64_t seed = 0;
  int num_images = 1;
  int height = 0, width = 0;  // 0: the folder's default size
  const float* latents = nullptr;
  const float* step_noise = nullptr;
};

struct Images {
  int count = 0, height = 0, width = 0;
  std::vector<float> pixels;  // [count, height, width, 3] in [0, 1]
  double text_encoder_seconds = 0, unet_seconds = 0, vae_decode_seconds = 0, total_seconds = 0;
  std::vector<std::string> warnings;
  nlohmann::ordered_json metadata;  // what `lcmrt generate` writes into its PNGs
};

struct AdapterState {
  const char* name;  // valid as long as the pipeline
  double weight;
  bool refittable;
};

class Pipeline {
 public:
  Pipeline(const std::string& folder, int threads);

  Images generate(const Request& request) const;
  // Transactional: every new weight is computed before any is swapped in.
  void set_adapters(const AdapterSet& requested);
  std::vector<AdapterState> adapters() const;

 private:
  struct Conditioning {
    std::vector<float> hidden;  // [1, text length, width]: encoder_hidden_states
    std::vector<float> pooled;  // [1, P]: text_embeds (SDXL families), else empty
  };
  Conditioning encode(const std::string& prompt, std::vector<std::string>& warnings) const;
  const WeightFeeds& feeds_of(const std::string& component) const;
  nlohmann::ordered_json active_adapters() const;

  Manifest manifest_;
  std::vector<std::string> components_;  // what a generation runs: the text encoders, unet, vae_decoder
  std::map<std::string, std::unique_ptr<ClipTokenizer>> tokenizers_;  // by text encoder
  std::map<std::string, std::unique_ptr<Session>> sessions_;
  AdapterBank bank_;
  AdapterSet active_;
  std::vector<std::string> adapter_names_;  // fused ones, then refittable ones: what adapters() lists
  std::map<std::string, WeightFeeds> feeds_;  // by component
  bool per_sample_timesteps_ = true;
  mutable std::shared_mutex lock_;  // generations share it; set_adapters holds it alone
};

}  // namespace lcmrt
