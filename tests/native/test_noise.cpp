// lcmrt's noise generator: Philox4x32-10 against Random123's known-answer vectors, the normal transform against
// values of the standard normal quantile, and the layout rules of lcmrt/noise.py.
#include <cmath>
#include <cstdint>

#include "check.h"
#include "noise.h"

int main() {
  struct Known {
    uint32_t counter[4], key[2], out[4];
  };
  // Random123 kat_vectors, philox4x32 with 10 rounds
  const Known known[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Known& k : known) {
    const lcmrt::PhiloxBlock block = lcmrt::philox4x32_10(k.counter, k.key);
    for (int i = 0; i < 4; ++i) CHECK_EQ(block.w[i], k.out[i]);
  }

  // quantiles of the standard normal (to 1e-15 relative: AS241's accuracy)
  const double quantiles[][2] = {{0.5, 0.0},
                                 {0.975, 1.959963984540054},
                                 {0.025, -1.959963984540054},
                                 {0.8413447460685429, 1.0},
                                 {1e-10, -6.361340902404056},
                                 {1e-300, -37.0470962993612}};
  for (const auto& q : quantiles) {
    const double z = lcmrt::ndtri(q[0]);
    CHECK(std::fabs(z - q[1]) <= 1e-14 * std::fmax(1.0, std::fabs(q[1])));
  }

  // image k of a seed does not depend on how many images are drawn; streams and seeds differ
  const auto four = lcmrt::standard_normal(7, lcmrt::kLatentsStream, 4, 1025);
  const auto one = lcmrt::standard_normal(7, lcmrt::kLatentsStream, 1, 1025);
  for (int i = 0; i < 1025; ++i) CHECK_EQ(four[i], one[i]);
  CHECK(four[1025] != four[0]);
  CHECK(lcmrt::standard_normal(7, lcmrt::kFirstStepNoiseStream, 1, 1)[0] != one[0]);
  CHECK(lcmrt::standard_normal(8, lcmrt::kLatentsStream, 1, 1)[0] != one[0]);
  double sum = 0, squares = 0;
  const auto many = lcmrt::standard_normal(1, 3, 1, 200000);
  for (float v : many) {
    sum += v;
    squares += double(v) * v;
  }
  CHECK(std::fabs(sum / many.size()) < 0.01);
  CHECK(std::fabs(squares / many.size() - 1.0) < 0.02);
  return check_exit();
}
