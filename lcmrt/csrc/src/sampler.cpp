#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "errors.h"

namespace lcmrt {
namespace {

constexpr float kSigmaDataSquared = 0.25f;  // sigma_data = 0.5
constexpr double kMaxCosineBeta = 0.999;

using json = nlohmann::json;

json value_or(const json& config, const char* key, json fallback) {
  const auto it = config.find(key);
  return it == config.end() ? fallback : *it;
}

[[noreturn]] void bad(const char* key, const std::string& expected, const json& value) {
  throw input_error(std::string("LCM scheduler config: ") + key + " must be " + expected + ", got " + value.dump() +
                    ".");
}

int int_key(const json& config, const char* key, int fallback, int low, int high, const std::string& expected) {
  const json v = value_or(config, key, json(fallback));
  if (!v.is_number_integer() || v.get<int64_t>() < low || v.get<int64_t>() > high) bad(key, expected, v);
  return v.get<int>();
}

double number_key(const json& config, const char* key, double fallback) {
  const json v = value_or(config, key, json(fallback));
  if (!v.is_number()) bad(key, "a number", v);
  return v.get<double>();
}

bool bool_key(const json& config, const char* key, bool fallback) {
  const json v = value_or(config, key, json(fallback));
  if (!v.is_boolean()) bad(key, "true or false", v);
  return v.get<bool>();
}

// torch.linspace(start, end, steps, float32) as its vectorized CPU kernel rounds it (lcmrt/sampler.py
// _linspace_like_torch): the first half up from start, the second down from end, each a fused multiply-add.
std::vector<float> linspace_like_torch(double start, double end, int steps) {
  const float start32 = static_cast<float>(start), end32 = static_cast<float>(end);
  if (steps == 1) return {start32};
  const float step = (end32 - start32) / static_cast<float>(steps - 1);
  std::vector<float> out(steps);
  for (int i = 0; i < steps; ++i)
    out[i] = i < steps / 2 ? std::fma(step, static_cast<float>(i), start32)
                           : std::fma(-step, static_cast<float>(steps - 1 - i), end32);
  return out;
}

std::vector<float> cumprod_like_torch(const std::vector<float>& values) {
  std::vector<float> out(values.size());
  double product = 1.0;
  for (size_t i = 0; i < values.size(); ++i) {
    product *= static_cast<double>(values[i]);
    out[i] = static_cast<float>(product);
  }
  return out;
}

std::vector<float> betas_of(const json& config, int n) {
  const json trained = value_or(config, "trained_betas", json(nullptr));
  std::vector<float> betas;
  if (!trained.is_null()) {
    if (!trained.is_array() || trained.size() != static_cast<size_t>(n))
      bad("trained_betas", "a list of num_train_timesteps=" + std::to_string(n) + " numbers", trained);
    for (const json& b : trained) {
      if (!b.is_number()) bad("trained_betas", "a list of numbers", trained);
      betas.push_back(static_cast<float>(b.get<double>()));
    }
  } else {
    const json schedule_value = value_or(config, "beta_schedule", json("scaled_linear"));
    const std::string schedule = schedule_value.is_string() ? schedule_value.get<std::string>() : "";
    const double start = number_key(config, "beta_start", 0.00085), end = number_key(config, "beta_end", 0.012);
    for (auto [key, v] : {std::pair{"beta_start", start}, std::pair{"beta_end", end}})
      if (!(v >= 0 && v < 1)) bad(key, "a number in [0, 1)", json(v));
    if (schedule == "linear") {
      betas = linspace_like_torch(start, end, n);
    } else if (schedule == "scaled_linear") {  // linear in sqrt(beta)
      betas = linspace_like_torch(std::pow(start, 0.5), std::pow(end, 0.5), n);
      for (float& b : betas) b = b * b;
    } else if (schedule == "squaredcos_cap_v2") {
      const double pi = 3.141592653589793;
      auto alpha_bar = [pi](double t) {
        const double c = std::cos((t + 0.008) / 1.008 * pi / 2);
        return c * c;
      };
      for (int i = 0; i < n; ++i)
        betas.push_back(static_cast<float>(
            std::min(1 - alpha_bar(static_cast<double>(i + 1) / n) / alpha_bar(static_cast<double>(i) / n),
                     kMaxCosineBeta)));
    } else {
      bad("beta_schedule", "one of ['linear', 'scaled_linear', 'squaredcos_cap_v2']", schedule_value);
    }
  }
  if (bool_key(config, "rescale_betas_zero_snr", false)) {  // Lin et al., arXiv 2305.08891, Algorithm 1
    std::vector<float> alphas(betas.size());
    for (size_t i = 0; i < betas.size(); ++i) alphas[i] = 1.0f - betas[i];
    std::vector<float> root = cumprod_like_torch(alphas);
    for (float& r : root) r = std::sqrt(r);
    const float first = root.front(), last = root.back(), scale = first / (first - last);
    std::vector<float> bar(root.size());
    for (size_t i = 0; i < root.size(); ++i) {
      const float shifted = (root[i] - last) * scale;
      bar[i] = shifted * shifted;
    }
    for (size_t i = 0; i < bar.size(); ++i) betas[i] = 1.0f - (i == 0 ? bar[0] : bar[i] / bar[i - 1]);
  }
  return betas;
}

}  // namespace

LcmSampler::LcmSampler(const json& config) {
  if (!config.is_object()) throw input_error("LCM scheduler config must be a JSON object.");
  num_train_timesteps_ = int_key(config, "num_train_timesteps", 1000, 1, 1 << 20, "a positive integer");
  original_inference_steps_ = int_key(config, "original_inference_steps", 50, 1, num_train_timesteps_,
                                      "an integer in [1, num_train_timesteps=" + std::to_string(num_train_timesteps_) +
                                          "]");
  const double scaling = number_key(config, "timestep_scaling", 10.0);
  if (!(scaling > 0 && std::isfinite(scaling))) bad("timestep_scaling", "a positive number", json(scaling));
  timestep_scaling_ = static_cast<float>(scaling);
  const json prediction = value_or(config, "prediction_type", json("epsilon"));
  prediction_type_ = prediction.is_string() ? prediction.get<std::string>() : "";
  if (prediction_type_ != "epsilon" && prediction_type_ != "v_prediction" && prediction_type_ != "sample")
    bad("prediction_type", "one of ['epsilon', 'v_prediction', 'sample']", prediction);
  clip_sample_ = bool_key(config, "clip_sample", false);
  clip_sample_range_ = number_key(config, "clip_sample_range", 1.0);
  if (clip_sample_ && !(clip_sample_range_ > 0))
    bad("clip_sample_range", "a positive number when clip_sample is on", json(clip_sample_range_));
  if (bool_key(config, "thresholding", false))
    throw input_error(
        "LCM scheduler config: thresholding=True (dynamic thresholding) is not supported by lcmrt; it is meant for "
        "pixel-space models, not latent diffusion. Set thresholding to false.");
  std::vector<float> alphas = betas_of(config, num_train_timesteps_);
  for (float& a : alphas) a = 1.0f - a;
  alphas_cumprod_ = cumprod_like_torch(alphas);
}

void LcmSampler::set_timesteps(int num_inference_steps) {
  const int original = original_inference_steps_;
  if (num_inference_steps < 1)
    throw generation_error("num_inference_steps must be a positive integer, got " +
                           std::to_string(num_inference_steps) + ".");
  if (num_inference_steps > original)
    throw generation_error("num_inference_steps=" + std::to_string(num_inference_steps) +
                           " is larger than original_inference_steps=" + std::to_string(original) +
                           ": LCM timesteps are a subset of the " + std::to_string(original) +
                           "-step distillation schedule.");
  // the distillation schedule t = k*i - 1, i = 1..original, descending; evenly spaced indices into it
  const int64_t k = num_train_timesteps_ / original;
  timesteps_.clear();
  const double spacing = static_cast<double>(original) / num_inference_steps;
  for (int i = 0; i < num_inference_steps; ++i) {
    const int64_t index = static_cast<int64_t>(std::floor(i * spacing));
    timesteps_.push_back((original - index) * k - 1);
  }
  coefficients_.clear();
  for (size_t i = 0; i < timesteps_.size(); ++i) coefficients_.push_back(compute_coefficients(i));
}

StepCoefficients LcmSampler::compute_coefficients(size_t step) const {
  const int64_t t = timesteps_[step];
  const bool final = step + 1 == timesteps_.size();
  const int64_t t_next = final ? t : timesteps_[step + 1];
  const float alpha = alphas_cumprod_[t], alpha_next = alphas_cumprod_[t_next];
  const float sqrt_alpha = std::sqrt(alpha), sqrt_beta = std::sqrt(1.0f - alpha);
  StepCoefficients c{};
  if (prediction_type_ == "epsilon") {  // (x_t - sqrt(b_t) eps) / sqrt(a_t)
    c.x0_from_sample = 1.0f, c.x0_from_output = sqrt_beta, c.x0_divisor = sqrt_alpha;
  } else if (prediction_type_ == "v_prediction") {  // sqrt(a_t) x_t - sqrt(b_t) v
    c.x0_from_sample = sqrt_alpha, c.x0_from_output = sqrt_beta, c.x0_divisor = 1.0f;
  } else {  // sample: x0 = model_output
    c.x0_from_sample = 0.0f, c.x0_from_output = -1.0f, c.x0_divisor = 1.0f;
  }
  c.clip_range = clip_sample_ ? static_cast<float>(clip_sample_range_) : std::numeric_limits<float>::infinity();
  const float scaled = static_cast<float>(t) * timestep_scaling_;
  const float denominator = scaled * scaled + kSigmaDataSquared;
  c.c_skip = kSigmaDataSquared / denominator;
  c.c_out = scaled / std::sqrt(denominator);
  c.sqrt_alpha_next = std::sqrt(alpha_next);
  c.sqrt_beta_next = std::sqrt(1.0f - alpha_next);
  c.final = final;
  return c;
}

void apply_step(const StepCoefficients& c, const float* model_output, const float* sample, const float* noise,
                float* out, size_t n) {
  if (!c.final && noise == nullptr)
    throw generation_error("LCM sampling needs fresh standard-normal noise on every step but the last.");
  const bool clip = !std::isinf(c.clip_range);
  for (size_t i = 0; i < n; ++i) {
    float x0 = (c.x0_from_sample * sample[i] - c.x0_from_output * model_output[i]) / c.x0_divisor;
    if (clip) x0 = std::clamp(x0, -c.clip_range, c.clip_range);
    const float denoised = c.c_out * x0 + c.c_skip * sample[i];
    out[i] = c.final ? denoised : c.sqrt_alpha_next * denoised + c.sqrt_beta_next * noise[i];
  }
}

}  // namespace lcmrt
