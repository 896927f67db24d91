// The LCM multi-step sampler of lcmrt/sampler.py (its docstring has the math), in float32 operation for operation:
// same timesteps, same step coefficients (bit-equal), same update order.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

namespace lcmrt {

// The float32 scalars of one step (lcmrt/sampler.py StepCoefficients).
struct StepCoefficients {
  float x0_from_sample, x0_from_output, x0_divisor;
  float clip_range;  // +inf when clip_sample is off
  float c_skip, c_out;
  float sqrt_alpha_next, sqrt_beta_next;
  bool final;
};

class LcmSampler {
 public:
  // From a diffusers scheduler config (the manifest's scheduler.config): LCMScheduler's keys with its defaults,
  // unknown keys ignored, values checked (input_error naming the key).
  explicit LcmSampler(const nlohmann::json& config);

  // Evenly spaced timesteps of the distillation schedule (generation_error as Python's for impossible counts).
  void set_timesteps(int num_inference_steps);
  const std::vector<int64_t>& timesteps() const { return timesteps_; }
  const StepCoefficients& coefficients(size_t step) const { return coefficients_.at(step); }
  const std::vector<float>& alphas_cumprod() const { return alphas_cumprod_; }

 private:
  StepCoefficients compute_coefficients(size_t step) const;

  int num_train_timesteps_, original_inference_steps_;
  float timestep_scaling_;
  std::string prediction_type_;
  bool clip_sample_;
  double clip_sample_range_;
  std::vector<float> alphas_cumprod_;
  std::vector<int64_t> timesteps_;
  std::vector<StepCoefficients> coefficients_;
};

// One LCM step over n values: out = x_{t_next}, or x0 on the final step (noise ignored there, required before).
void apply_step(const StepCoefficients& c, const float* model_output, const float* sample, const float* noise,
                float* out, size_t n);

}  // namespace lcmrt
