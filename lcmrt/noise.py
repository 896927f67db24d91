"""lcmrt's seed -> noise generator, defined so that the Python and the C++ runtime draw bit-identical noise.

A seed names every standard-normal value a generation draws, each by its position, not by the order of draws:

    value(seed, stream, image, i) = float32(ndtri(p)),   p = (2k + 1) / 2^53

- Streams: 0 the start latents, 1 the VAE encoder's sample of an input image (`image_noise`), 2 an inpainting
  UNet's masked-image sample (`masked_image_noise`), 16 + n the noise re-injected after step n (`step_noise[n]`).
- Element i of image `image` (C order over [channels, height, width]) takes half of one Philox4x32-10 block
  (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the Random123 reference):

      (w0, w1, w2, w3) = philox4x32_10(counter = (i // 2, image, stream, 0), key = (seed mod 2^32, seed // 2^32))
      k = (w0 << 20) | (w1 >> 12)   for even i,     k = (w2 << 20) | (w3 >> 12)   for odd i      (52 bits)

  so image 3 of a seed is the same whether 1 or 4 images are drawn, and `p` lies strictly inside (0, 1).
- ndtri is the standard normal's inverse CDF by Wichura's algorithm AS241 (PPND16, Applied Statistics 37,
  1988: rational approximations with relative error ~1e-16), evaluated in float64 with +, -, *, / and sqrt
  only, in the order written below, and the one logarithm it needs computed the same way (`_log`). IEEE 754
  rounds each of those operations exactly, so every implementation that keeps this order (and contracts no
  multiply-add into an FMA) gets the same float64, hence the same float32. Library `log` functions differ by
  an ulp between platforms and are not used.

Seeds are integers in [0, 2^64). `Pipeline(latents=..., step_noise=...)` still takes explicit noise, to
reproduce another implementation's draws (diffusers' torch generator, numpy's) exactly.
"""
from __future__ import annotations

import numpy as np

LATENTS, IMAGE_NOISE, MASKED_IMAGE_NOISE = 0, 1, 2
FIRST_STEP_NOISE = 16  # step_noise[n] is stream FIRST_STEP_NOISE + n
STREAMS = {"latents": LATENTS, "image_noise": IMAGE_NOISE, "masked_image_noise": MASKED_IMAGE_NOISE}
MAX_SEED = (1 << 64) - 1

# Philox4x32-10 (Random123's philox4x32 with 10 rounds): multipliers and Weyl key increments
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)

LN2 = 0.6931471805599453
SQRT_HALF = 0.7071067811865476
_LOG_TERMS = 11  # log's series in s^2 up to s^22 / 23: below 2e-17 relative for |s| <= 3 - 2 sqrt(2)

# AS241 PPND16 coefficients, numerator a / c / e and denominator b / d / f, lowest degree first
_A = (3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3, 1.3731693765509461125e4,
      4.5921953931549871457e4, 6.7265770927008700853e4, 3.3430575583588128105e4, 2.5090809287301226727e3)
_B = (1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
      2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4, 5.2264952788528545610e3)
_C = (1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0, 3.64784832476320460504e0,
      1.27045825245236838258e0, 2.41780725177450611770e-1, 2.27238449892691845833e-2, 7.74545014278341407640e-4)
_D = (1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
      1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4, 1.05075007164441684324e-9)
_E = (6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0, 2.96560571828504891230e-1,
      2.65321895265761230930e-2, 1.24266094738807843860e-3, 2.71155556874348757815e-5, 2.01033439929228813265e-7)
_F = (1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
      7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7, 2.04426310338993978564e-15)
SPLIT1, SPLIT2 = 0.425, 5.0  # |p - 0.5| <= SPLIT1: central region; r = sqrt(-log(min(p, 1-p))) <= SPLIT2: middle tail
CONST1, CONST2 = 0.180625, 1.6


def standard_normal(seed: int, stream: int, shape) -> np.ndarray:
    """float32 array of `shape` ([images, ...]) of lcmrt's standard-normal values for `seed` and `stream`."""
    shape = tuple(int(n) for n in shape)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is outside [0, 2^64)")
    images, per_image = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    blocks = (per_image + 1) // 2
    counter = [np.tile(np.arange(blocks, dtype=np.uint64), images),
               np.repeat(np.arange(images, dtype=np.uint64), blocks),
               np.full(images * blocks, stream, np.uint64), np.zeros(images * blocks, np.uint64)]
    w0, w1, w2, w3 = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    k = np.stack([(w0 << np.uint64(20)) | (w1 >> np.uint64(12)), (w2 << np.uint64(20)) | (w3 >> np.uint64(12))], axis=-1)
    k = k.reshape(images, 2 * blocks)[:, :per_image]
    p = (2.0 * k.astype(np.float64) + 1.0) * 2.0 ** -53  # exact: 2k + 1 < 2^53
    return ndtri(p).astype(np.float32).reshape(shape)


def philox4x32_10(counter, key) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of counters (four uint64 arrays holding 32-bit words) under a key of two 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for round_ in range(_ROUNDS):
        if round_:
            k0, k1 = (k0 + np.uint64(_W0)) & _MASK32, (k1 + np.uint64(_W1)) & _MASK32
        product0, product1 = c0 * np.uint64(_M0), c2 * np.uint64(_M1)  # < 2^64: no wrap-around
        c0, c1, c2, c3 = ((product1 >> np.uint64(32)) ^ c1 ^ k0, product1 & _MASK32,
                          (product0 >> np.uint64(32)) ^ c3 ^ k1, product0 & _MASK32)
    return c0, c1, c2, c3


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float64s with IEEE-exact operations only: x = m 2^e, m in [sqrt(1/2), sqrt(2)),
    log x = e ln2 + 2 atanh(s), s = (m - 1) / (m + 1), atanh's series summed by Horner's rule."""
    m, e = np.frexp(x)  # m in [0.5, 1)
    low = m < SQRT_HALF
    m = np.where(low, 2.0 * m, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = np.full_like(s, 1.0 / (2 * _LOG_TERMS + 1))
    for n in range(_LOG_TERMS - 1, -1, -1):
        series = 1.0 / (2 * n + 1) + s2 * series
    return e * LN2 + (2.0 * s) * series


def _ratio(numerator, denominator, r):
    """Horner's rule for both polynomials (coefficients lowest degree first), then their ratio."""
    top, bottom = np.full_like(r, numerator[-1]), np.full_like(r, denominator[-1])
    for a, b in zip(numerator[-2::-1], denominator[-2::-1]):
        top, bottom = top * r + a, bottom * r + b
    return top / bottom


def ndtri(p: np.ndarray) -> np.ndarray:
    """The standard normal quantile of p in (0, 1), float64: AS241 PPND16 with `_log`."""
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    central = q * _ratio(_A, _B, CONST1 - q * q)
    tail = np.sqrt(-_log(np.minimum(p, 1.0 - p)))
    tail = np.where(tail <= SPLIT2, _ratio(_C, _D, tail - CONST2), _ratio(_E, _F, tail - SPLIT2))
    tail = np.where(q < 0.0, -tail, tail)
    return np.where(np.abs(q) <= SPLIT1, central, tail)
