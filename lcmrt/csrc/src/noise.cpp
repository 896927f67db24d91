// The generator of lcmrt/noise.py, operation for operation: this file must be compiled without contracting
// multiply-adds into FMAs (-ffp-contract=off, set for every source by CMakeLists.txt), so that each float64
// operation rounds as numpy's does.
#include "noise.h"

#include <cmath>
#include <stdexcept>

namespace lcmrt {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

constexpr double kLn2 = 0.6931471805599453;
constexpr double kSqrtHalf = 0.7071067811865476;
constexpr int kLogTerms = 11;

// AS241 PPND16, lowest degree first (lcmrt/noise.py _A.._F).
constexpr double kA[8] = {3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3,
                          1.3731693765509461125e4, 4.5921953931549871457e4, 6.7265770927008700853e4,
                          3.3430575583588128105e4, 2.5090809287301226727e3};
constexpr double kB[8] = {1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
                          2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4,
                          5.2264952788528545610e3};
constexpr double kC[8] = {1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
                          3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
                          2.27238449892691845833e-2, 7.74545014278341407640e-4};
constexpr double kD[8] = {1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
                          1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
                          1.05075007164441684324e-9};
constexpr double kE[8] = {6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
                          2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
                          2.71155556874348757815e-5, 2.01033439929228813265e-7};
constexpr double kF[8] = {1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
                          7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
                          2.04426310338993978564e-15};
constexpr double kSplit1 = 0.425, kSplit2 = 5.0, kConst1 = 0.180625, kConst2 = 1.6;

// log x = e ln2 + 2 atanh(s), x = m 2^e with m in [sqrt(1/2), sqrt(2)), s = (m - 1) / (m + 1).
double exact_ops_log(double x) {
  int exponent = 0;
  double m = std::frexp(x, &exponent);  // m in [0.5, 1)
  if (m < kSqrtHalf) {
    m = 2.0 * m;
    exponent -= 1;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double series = 1.0 / (2 * kLogTerms + 1);
  for (int n = kLogTerms - 1; n >= 0; --n) series = 1.0 / (2 * n + 1) + s2 * series;
  return static_cast<double>(exponent) * kLn2 + (2.0 * s) * series;
}

double ratio(const double* numerator, const double* denominator, double r) {
  double top = numerator[7], bottom = denominator[7];
  for (int i = 6; i >= 0; --i) {
    top = top * r + numerator[i];
    bottom = bottom * r + denominator[i];
  }
  return top / bottom;
}

}  // namespace

PhiloxBlock philox4x32_10(const uint32_t counter[4], const uint32_t key[2]) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < kRounds; ++round) {
    if (round) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t product0 = static_cast<uint64_t>(c0) * kM0, product1 = static_cast<uint64_t>(c2) * kM1;
    const uint32_t next0 = static_cast<uint32_t>(product1 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(product0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product1);
    c3 = static_cast<uint32_t>(product0);
    c0 = next0;
    c2 = next2;
  }
  return {{c0, c1, c2, c3}};
}

double ndtri(double p) {
  const double q = p - 0.5;
  if (std::fabs(q) <= kSplit1) return q * ratio(kA, kB, kConst1 - q * q);
  double r = std::sqrt(-exact_ops_log(std::fmin(p, 1.0 - p)));
  r = r <= kSplit2 ? ratio(kC, kD, r - kConst2) : ratio(kE, kF, r - kSplit2);
  return q < 0.0 ? -r : r;
}

std::vector<float> standard_normal(uint64_t seed, uint32_t stream, int64_t images, int64_t per_image) {
  if (images < 0 || per_image < 0 || (per_image + 1) / 2 > 0xFFFFFFFFll || images > 0xFFFFFFFFll)
    throw std::invalid_argument("standard_normal: shape out of range");
  std::vector<float> out(static_cast<size_t>(images * per_image));
  const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (int64_t image = 0; image < images; ++image) {
    float* row = out.data() + image * per_image;
    for (int64_t i = 0; i < per_image; i += 2) {
      const uint32_t counter[4] = {static_cast<uint32_t>(i / 2), static_cast<uint32_t>(image), stream, 0};
      const PhiloxBlock block = philox4x32_10(counter, key);
      for (int64_t half = 0; half < 2 && i + half < per_image; ++half) {
        const uint64_t k = (static_cast<uint64_t>(block.w[2 * half]) << 20) | (block.w[2 * half + 1] >> 12);
        const double p = (2.0 * static_cast<double>(k) + 1.0) * 0x1p-53;
        row[i + half] = static_cast<float>(ndtri(p));
      }
    }
  }
  return out;
}

}  // namespace lcmrt
