// lcmrt's seed -> noise generator: bit-identical to lcmrt/noise.py, whose docstring defines it.
#pragma once

#include <cstdint>
#include <vector>

namespace lcmrt {

// Streams of a generation's draws (lcmrt/noise.py: LATENTS, IMAGE_NOISE, MASKED_IMAGE_NOISE, FIRST_STEP_NOISE).
constexpr uint32_t kLatentsStream = 0;
constexpr uint32_t kFirstStepNoiseStream = 16;  // step_noise[n] is stream 16 + n

struct PhiloxBlock {
  uint32_t w[4];
};

// Philox4x32-10 of one counter under a key (Random123's philox4x32 with 10 rounds).
PhiloxBlock philox4x32_10(const uint32_t counter[4], const uint32_t key[2]);

// The standard normal quantile of p in (0, 1): Wichura's AS241 (PPND16) with IEEE-exact operations only.
double ndtri(double p);

// `images` x `per_image` float32 standard-normal values of (seed, stream), image-major.
std::vector<float> standard_normal(uint64_t seed, uint32_t stream, int64_t images, int64_t per_image);

}  // namespace lcmrt
