#include "pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <sstream>

#include "errors.h"
#include "files.h"
#include "noise.h"
#include "sampler.h"

namespace lcmrt {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool all_finite(const std::vector<float>& values) {
  return std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); });
}

Error non_finite(const std::string& component, const std::string& where) {
  return generation_error("The " + component + " (fp32) returned NaN/inf " + where +
                          ", so there is no image. The fp32 graph should not do that: its files may be damaged or "
                          "come from another model. Rebuild the folder with `lcmrt build`.");
}

std::string number_text(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

// rows [first, first + take) of [count, row] values, zero-padded to `rows` rows (lcmrt/pipeline.py _pad)
std::vector<float> padded_rows(const float* values, int64_t first, int64_t take, int64_t rows, int64_t row) {
  std::vector<float> out(static_cast<size_t>(rows * row), 0.0f);
  std::copy(values + first * row, values + (first + take) * row, out.begin());
  return out;
}

}  // namespace

Pipeline::Pipeline(const std::string& folder, int threads) : manifest_(read_manifest(folder)), bank_(manifest_) {
  const auto& unet_inputs = manifest_.component("unet").input_shapes;
  if (unet_inputs.count("timestep_cond"))
    throw folder_error(folder + " holds a distilled LCM UNet (guidance embedding input); the native runtime runs "
                       "LCM-LoRA folders. Run it with the Python runtime (`lcmrt generate`).");
  const auto sample = unet_inputs.find("sample");
  if (sample == unet_inputs.end() || sample->second.size() != 4 || sample->second[1] != manifest_.shapes.latent_channels)
    throw folder_error(folder + "'s UNet does not take [batch, " + std::to_string(manifest_.shapes.latent_channels) +
                       ", H/8, W/8] latents (an inpainting UNet?); the native runtime runs text to image. Run it with "
                       "the Python runtime (`lcmrt generate`).");
  const auto timestep = unet_inputs.find("timestep");
  per_sample_timesteps_ = timestep == unet_inputs.end() || timestep->second != std::vector<nlohmann::json>{1};
  components_ = manifest_.family.text_encoders;
  components_.insert(components_.end(), {"unet", "vae_decoder"});
  for (const std::string& name : components_) sessions_[name] = std::make_unique<Session>(manifest_, name, threads);
  for (const auto& [encoder, info] : manifest_.tokenizers) {
    verify_files(folder, {{info.file, info.sha256}}, kRebuild);
    tokenizers_[encoder] = std::make_unique<ClipTokenizer>(folder_file(folder, info.file), info.max_length,
                                                           info.pad_token_id);
  }
  active_ = bank_.check(bank_.defaults());
  feeds_ = bank_.weights_for(active_);
  for (const auto& entry : bank_.fused()) adapter_names_.push_back(entry.first);
  for (const auto& entry : active_) adapter_names_.push_back(entry.first);
}

const WeightFeeds& Pipeline::feeds_of(const std::string& component) const {
  static const WeightFeeds none;
  const auto it = feeds_.find(component);
  return it == feeds_.end() ? none : it->second;
}

Pipeline::Conditioning Pipeline::encode(const std::string& prompt, std::vector<std::string>& warnings) const {
  const Family& family = manifest_.family;
  std::vector<std::vector<float>> hidden;  // per text encoder: [1, text length, width]
  Conditioning out;
  for (const std::string& encoder : family.text_encoders) {
    const ClipTokenizer& tokenizer = *tokenizers_.at(encoder);
    size_t dropped = 0;
    const std::vector<int64_t> ids = tokenizer.encode(prompt, &dropped);
    if (dropped && encoder == family.text_encoders.front())
      warnings.push_back("The prompt is longer than the text encoder takes (" + std::to_string(tokenizer.max_length()) +
                         " tokens): " + std::to_string(dropped) + " tokens were dropped from its end.");
    auto outputs = sessions_.at(encoder)->run(
        {{"input_ids", {1, static_cast<int64_t>(ids.size())}, nullptr, ids.data()}}, feeds_of(encoder));
    for (const auto& [name, array] : outputs)
      if (!all_finite(array.values)) throw non_finite(encoder == "text_encoder" ? "text encoder" : "text encoder 2",
                                                      "for the prompt");
    const auto state = outputs.find(family.hidden_state);
    if (state == outputs.end())
      throw folder_error(manifest_.folder + "'s " + encoder + " has no " + family.hidden_state + " output. " + kRebuild);
    hidden.push_back(std::move(state->second.values));
    if (encoder == family.pooled_text_encoder) {
      const auto pooled = outputs.find("text_embeds");
      if (pooled == outputs.end())
        throw folder_error(manifest_.folder + "'s " + encoder + " has no text_embeds output. " + kRebuild);
      out.pooled = std::move(pooled->second.values);
    }
  }
  if (hidden.size() == 1) {
    out.hidden = std::move(hidden.front());
    return out;
  }
  // SDXL: both encoders' hidden states side by side on the feature axis, token by token
  const size_t tokens = static_cast<size_t>(tokenizers_.at(family.text_encoders.front())->max_length());
  for (size_t t = 0; t < tokens; ++t)
    for (const auto& h : hidden) {
      const size_t width = h.size() / tokens;
      out.hidden.insert(out.hidden.end(), h.begin() + t * width, h.begin() + (t + 1) * width);
    }
  return out;
}

Images Pipeline::generate(const Request& r) const {
  if (r.steps < 1 || r.steps > kMaxSteps)
    throw generation_error("num_inference_steps=" + std::to_string(r.steps) + " is outside 1.." +
                           std::to_string(kMaxSteps) + "; LCM needs 2-8 steps for good images (4 is the usual choice).");
  if (!std::isfinite(r.guidance_scale))
    throw input_error("guidance_scale=" + number_text(r.guidance_scale) + " must be a finite number.");
  if (r.num_images < 1 || r.num_images > kMaxImages)
    throw input_error("num_images=" + std::to_string(r.num_images) + " must be a positive integer up to " +
                      std::to_string(kMaxImages) + " (a call holds all its images in memory).");
  const Shapes& s = manifest_.shapes;
  const int height = r.height ? r.height : s.height, width = r.width ? r.width : s.width;
  if (std::find(s.sizes.begin(), s.sizes.end(), std::make_pair(height, width)) == s.sizes.end()) {
    std::string sizes;
    for (const auto& [h, w] : s.sizes) sizes += (sizes.empty() ? "" : ", ") + std::to_string(w) + "x" + std::to_string(h);
    throw input_error(manifest_.folder + " serves " + sizes + " (width x height), not " + std::to_string(width) + "x" +
                      std::to_string(height) + ". Pick one of those, or rebuild the folder with this size (`lcmrt "
                      "build ... --size WIDTHxHEIGHT`, repeatable).");
  }
  const bool guided = r.guidance_scale > 1;
  const int n = s.batch;
  if (guided && std::find(s.unet_batch_sizes.begin(), s.unet_batch_sizes.end(), 2 * n) == s.unet_batch_sizes.end())
    throw generation_error("guidance_scale=" + number_text(r.guidance_scale) + " needs the unconditional batch, but " +
                           manifest_.folder + " was built with --guidance-mode none. Use guidance_scale <= 1, or "
                           "rebuild with --guidance-mode cfg.");
  LcmSampler sampler(manifest_.scheduler_config);
  sampler.set_timesteps(r.steps);
  const auto& timesteps = sampler.timesteps();
  const int64_t latent_h = height / 8, latent_w = width / 8, channels = s.latent_channels;
  const int64_t row = channels * latent_h * latent_w;
  std::vector<float> latents = r.latents ? std::vector<float>(r.latents, r.latents + r.num_images * row)
                                         : standard_normal(r.seed, kLatentsStream, r.num_images, row);
  std::vector<std::vector<float>> step_noise;
  for (size_t i = 0; i + 1 < timesteps.size(); ++i)
    step_noise.push_back(r.step_noise ? std::vector<float>(r.step_noise + i * r.num_images * row,
                                                           r.step_noise + (i + 1) * r.num_images * row)
                                      : standard_normal(r.seed, kFirstStepNoiseStream + static_cast<uint32_t>(i),
                                                        r.num_images, row));

  Images result;
  const auto start = std::chrono::steady_clock::now();
  std::shared_lock<std::shared_mutex> lock(lock_);  // one adapter set for the whole generation
  const Conditioning cond = encode(r.prompt, result.warnings);
  Conditioning uncond;
  if (guided && !r.negative_prompt && manifest_.force_zeros_for_empty_prompt)  // SDXL's rule: zeros, not ""
    uncond = {std::vector<float>(cond.hidden.size(), 0.0f), std::vector<float>(cond.pooled.size(), 0.0f)};
  else if (guided)
    uncond = encode(r.negative_prompt.value_or(""), result.warnings);
  // UNet batch rows: (negative, prompt) halves with guidance, n rows each
  auto rows = [&](const std::vector<float>& negative, const std::vector<float>& positive) {
    std::vector<float> out;
    for (int i = 0; guided && i < n; ++i) out.insert(out.end(), negative.begin(), negative.end());
    for (int i = 0; i < n; ++i) out.insert(out.end(), positive.begin(), positive.end());
    return out;
  };
  const std::vector<float> hidden = rows(uncond.hidden, cond.hidden), pooled = rows(uncond.pooled, cond.pooled);
  std::vector<float> time_ids;  // original size, crop top-left, target size: the image's size, no crop
  if (manifest_.family.time_ids) {
    const float sizes[6] = {float(height), float(width), 0.0f, 0.0f, float(height), float(width)};
    for (int i = 0; i < (guided ? 2 * n : n); ++i) time_ids.insert(time_ids.end(), sizes, sizes + 6);
  }
  result.text_encoder_seconds = seconds_since(start);

  const int64_t unet_batch = guided ? 2 * n : n;
  const int64_t text_length = tokenizers_.at(manifest_.family.text_encoders.front())->max_length();
  const int64_t text_width = static_cast<int64_t>(cond.hidden.size()) / text_length;
  const int64_t pooled_width = static_cast<int64_t>(cond.pooled.size());
  const WeightFeeds& unet_feeds = feeds_of("unet");
  const WeightFeeds& decoder_feeds = feeds_of("vae_decoder");
  const float scale = static_cast<float>(r.guidance_scale);
  result.count = r.num_images, result.height = height, result.width = width;
  result.pixels.resize(static_cast<size_t>(r.num_images) * height * width * 3);
  for (int first = 0; first < r.num_images; first += n) {
    const int take = std::min(n, r.num_images - first);
    std::vector<float> x = padded_rows(latents.data(), first, take, n, row);
    const auto unet_start = std::chrono::steady_clock::now();
    auto unet_inputs = [&](const std::vector<float>& sample, const std::vector<float>& timestep) {
      std::vector<Feed> feeds = {{"sample", {unet_batch, channels, latent_h, latent_w}, sample.data(), nullptr},
                                 {"timestep", {static_cast<int64_t>(timestep.size())}, timestep.data(), nullptr},
                                 {"encoder_hidden_states", {unet_batch, text_length, text_width}, hidden.data(), nullptr}};
      if (pooled_width) feeds.push_back({"text_embeds", {unet_batch, pooled_width}, pooled.data(), nullptr});
      if (!time_ids.empty()) feeds.push_back({"time_ids", {unet_batch, 6}, time_ids.data(), nullptr});
      return feeds;
    };
    for (size_t step = 0; step < timesteps.size(); ++step) {
      std::vector<float> sample(x);
      if (guided) sample.insert(sample.end(), x.begin(), x.end());
      const std::vector<float> timestep(per_sample_timesteps_ ? unet_batch : 1, static_cast<float>(timesteps[step]));
      const auto out = sessions_.at("unet")->run(
          unet_inputs(sample, timestep), unet_feeds);
      std::vector<float> pred = out.at("noise_pred").values;
      if (!all_finite(pred))
        throw non_finite("UNet", "at step " + std::to_string(step + 1) + " of " + std::to_string(timesteps.size()) +
                                     " (timestep " + std::to_string(timesteps[step]) + ")");
      if (guided) {  // uncond + g * (cond - uncond)
        const size_t half = pred.size() / 2;
        for (size_t i = 0; i < half; ++i) pred[i] = pred[i] + scale * (pred[half + i] - pred[i]);
        pred.resize(half);
      }
      const bool last = step + 1 == timesteps.size();
      const std::vector<float> noise = last ? std::vector<float>() : padded_rows(step_noise[step].data(), first, take, n, row);
      std::vector<float> next(x.size());
      apply_step(sampler.coefficients(step), pred.data(), x.data(), last ? nullptr : noise.data(), next.data(), x.size());
      x.swap(next);
    }
    if (!all_finite(x))
      throw generation_error("The latents overflowed float32 (NaN/inf) after " + std::to_string(timesteps.size()) +
                             " steps at guidance_scale=" + number_text(r.guidance_scale) +
                             "; use a guidance_scale in the usual 1-2 range.");
    result.unet_seconds += seconds_since(unet_start);
    const auto decode_start = std::chrono::steady_clock::now();
    const auto image = sessions_.at("vae_decoder")
                           ->run({{"latents", {n, channels, latent_h, latent_w}, x.data(), nullptr}}, decoder_feeds)
                           .at("image")
                           .values;
    if (!all_finite(image)) throw non_finite("VAE decoder", "for finite latents");
    const int64_t plane = static_cast<int64_t>(height) * width;
    for (int i = 0; i < take; ++i)  // [3, H, W] in ~[-1, 1] -> [H, W, 3] in [0, 1]
      for (int64_t p = 0; p < plane; ++p)
        for (int c = 0; c < 3; ++c)
          result.pixels[((first + i) * plane + p) * 3 + c] =
              std::clamp(image[(i * 3 + c) * plane + p] / 2 + 0.5f, 0.0f, 1.0f);
    result.vae_decode_seconds += seconds_since(decode_start);
  }
  result.total_seconds = seconds_since(start);
  nlohmann::ordered_json precision;
  for (const std::string& name : components_) precision[name] = "fp32";
  result.metadata = {{"prompt", r.prompt},
                     {"negative_prompt", r.negative_prompt ? nlohmann::ordered_json(*r.negative_prompt) : nullptr},
                     {"seed", r.seed},
                     {"steps", r.steps},
                     {"guidance", r.guidance_scale},
                     {"adapters", active_adapters()},
                     {"engine_folder", manifest_.folder},
                     {"backend", kBackendName},
                     {"lcmrt_version", kVersion},
                     {"precision", precision}};
  return result;
}

nlohmann::ordered_json Pipeline::active_adapters() const {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& [name, weight] : bank_.fused()) out[name] = weight;
  for (const auto& [name, weight] : active_)
    if (weight != 0.0) out[name] = weight;
  return out;
}

void Pipeline::set_adapters(const AdapterSet& requested) {
  std::unique_lock<std::shared_mutex> lock(lock_);  // no generation runs with half the weights switched
  AdapterSet next = bank_.check(requested);
  std::map<std::string, WeightFeeds> feeds = bank_.weights_for(next);  // may throw: nothing changed yet
  active_.swap(next);
  feeds_.swap(feeds);
}

std::vector<AdapterState> Pipeline::adapters() const {
  std::shared_lock<std::shared_mutex> lock(lock_);
  std::vector<AdapterState> out;
  for (const std::string& name : adapter_names_) {
    const auto fused = bank_.fused().find(name);
    const bool refittable = fused == bank_.fused().end();
    out.push_back({name.c_str(), refittable ? active_.at(name) : fused->second, refittable});
  }
  return out;
}

}  // namespace lcmrt
