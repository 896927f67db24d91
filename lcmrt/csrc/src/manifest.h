// The engine folder's manifest.json (lcmrt/manifest.py and DESIGN.md "The engine folder"): the parts the native
// runtime reads, each checked where it is read, with the Python runtime's messages and fixes.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace lcmrt {

constexpr int kFormatVersion = 2;  // lcmrt/manifest.py FORMAT_VERSION: the newest format this runtime reads
constexpr const char* kPreOptimized = "ort-cpu";      // ONNX Runtime's CPU optimizations applied at build time
constexpr const char* kRefitInputs = "refit-inputs";  // refittable weights declared as graph inputs

struct GraphFile {  // a component's fp32 graph or one of its variants
  std::string file;
  std::map<std::string, std::string> sha256;  // the graph and the files it reads
  std::vector<std::string> weight_inputs;      // refit-inputs: the graph weights declared as inputs
  nlohmann::json key;                          // ort-cpu: the ONNX Runtime version and CPU it was optimized for
};

struct Component {
  GraphFile graph;                           // fp32
  std::map<std::string, GraphFile> variants;  // by variant name
  std::map<std::string, std::vector<nlohmann::json>> input_shapes;  // input -> shape (sizes or dimension names)
};

struct Shapes {
  int batch, height, width, latent_channels, latent_height, latent_width, text_length;
  std::vector<int> unet_batch_sizes;
  std::vector<std::pair<int, int>> sizes;  // (height, width), the first the default
};

struct TokenizerInfo {
  std::string file;  // tokenizer/tokenizer.json
  std::string sha256;
  int max_length;
  int64_t pad_token_id;
};

struct AdapterInfo {
  std::string name;
  double weight;
  bool fused;
  std::string pack, pack_sha256;  // refittable adapters: adapters/NAME.safetensors
};

struct RefitEntry {  // where a LoRA module's weight lives in a graph (lcmrt/manifest.py RefitEntry)
  std::string module, component, weight;
  bool transpose;
  std::vector<int64_t> shape;  // the module's weight shape, before any transpose
  std::string file, dtype, file_sha256;
  int64_t offset, length;
};

// How a model family conditions its UNet (lcmrt/families.py): SD1.5 has one text encoder whose last hidden state is
// the UNet's encoder_hidden_states; SDXL and SSD-1B have two (their penultimate hidden states side by side), the
// second's pooled projection as text_embeds, and time_ids (original size, crop top-left, target size).
struct Family {
  std::string name;
  std::vector<std::string> text_encoders;  // each reads the tokenizer diffusers names after it (text_encoder_2 -> tokenizer_2)
  std::string hidden_state;                // the text encoders' output that conditions the UNet
  std::string pooled_text_encoder;         // its text_embeds output is the UNet's text_embeds input ("" if none)
  bool time_ids;
};

// The family called `name`, or an engine-folder error naming the families this runtime knows.
Family family_of(const std::string& name);

struct Manifest {
  std::string folder;
  int format_version;
  Family family;
  std::string guidance_mode;
  Shapes shapes;
  nlohmann::json scheduler_config;
  std::map<std::string, TokenizerInfo> tokenizers;  // by text encoder component
  bool force_zeros_for_empty_prompt;  // SDXL: with guidance and no negative prompt, the negative conditioning is 0
  std::map<std::string, Component> components;
  std::vector<AdapterInfo> adapters;
  std::map<std::string, RefitEntry> refit_map;  // by module

  const Component& component(const std::string& name) const;
};

// Read and check FOLDER/manifest.json: a missing folder or manifest, bad JSON, a newer format version or a part of
// the wrong shape is an engine-folder error that says what is wrong and what to do.
Manifest read_manifest(const std::string& folder);

}  // namespace lcmrt
