"""The LCM multi-step sampler, in numpy: lcmrt's own implementation, numerically equal to diffusers' `LCMScheduler`.

References: Latent Consistency Models (LCM, arXiv 2310.04378) and LCM-LoRA (arXiv 2311.05556).

An LCM is a consistency function f(x_t, t) that maps any point of the probability-flow ODE trajectory to its
origin x0. It is parameterized with the boundary-condition scalings of consistency models, so that f(x, 0) = x:

    f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_hat(x_t, t)
    c_skip(t) = sigma_data^2 / ((s*t)^2 + sigma_data^2)
    c_out(t)  = (s*t) / sqrt((s*t)^2 + sigma_data^2)          s = timestep_scaling, sigma_data = 0.5

where x0_hat is the teacher's x0 prediction from the UNet output (a_t = alphas_cumprod[t], b_t = 1 - a_t):

    epsilon:       x0_hat = (x_t - sqrt(b_t) * eps) / sqrt(a_t)
    v_prediction:  x0_hat = sqrt(a_t) * x_t - sqrt(b_t) * v
    sample:        x0_hat = model_output

Multistep sampling alternates the consistency function with forward diffusion to the next, lower timestep:

    x0          = f(x_{t_n}, t_n)
    x_{t_{n+1}} = sqrt(a_{t_{n+1}}) * x0 + sqrt(b_{t_{n+1}}) * z,      z ~ N(0, I)

and returns x0 itself after the last timestep (no noise there, so one-step sampling uses no noise at all).
The timesteps are a subset of the distillation schedule of `original_inference_steps` evenly spaced timesteps.

Numerical equality with diffusers: its scheduler computes the scalars above as float32 tensors on the CPU
and the update in the sample's dtype. `LCMSampler` rounds every scalar the same way (alphas_cumprod, c_skip
and c_out are bit-equal) and `apply_step` performs the same float32 operations in the same order, so with
diffusers' scalars the trajectory is bit-identical. The one rounding that cannot be copied is torch's float32
square root, which on x86 builds (MKL) is faithful rather than correctly rounded: about a fifth of square
roots differ by one unit in the last place from IEEE sqrt, which lcmrt uses (as do non-MKL torch builds).
Trajectories then agree to ~2e-7 relative to the largest float32 term of the x0 prediction; for epsilon at
t=999 that term is x_t / sqrt(alpha_t), so latents of unit scale can differ by ~1e-5 absolute there.

The per-step update is written against the array API (`apply_step` only uses arithmetic operators and
`clip`), so the same code runs on numpy arrays and on CuPy arrays for CUDA-graph capture; the scalars of
every step are python floats computed once in `set_timesteps` (`step_coefficients`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lcmrt.errors import GenerationError, InputError

# sigma_data of the consistency-model boundary condition (LCM paper, following Consistency Models; diffusers
# hard-codes the same 0.5).
SIGMA_DATA = 0.5
# Largest beta of the squaredcos_cap_v2 ("Glide cosine") schedule, as in diffusers' betas_for_alpha_bar.
MAX_COSINE_BETA = 0.999

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' LCMScheduler config keys with its defaults. `steps_offset`, `timestep_spacing` and
# `set_alpha_to_one` are accepted for config compatibility but do not change LCM sampling in diffusers either:
# LCM timesteps come from `original_inference_steps`, and the "previous alpha" of the last step is never used
# because no noise is added after it.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


def array_namespace(x: Any) -> Any:
    """The array-API namespace of `x` (numpy, cupy, ...); numpy for arrays that do not declare one."""
    if hasattr(x, "__array_namespace__"):
        return x.__array_namespace__()
    return np


class StepCoefficients(NamedTuple):
    """The python-float scalars of one LCM step (float32 values, rounded like diffusers' 0-d tensors)."""

    # x0_hat = (x0_from_sample * x_t - x0_from_output * model_output) / x0_divisor, one form for all three
    # parameterizations (see x0_prediction_coefficients) so the update has no branch per prediction type.
    x0_from_sample: float
    x0_from_output: float
    x0_divisor: float
    clip_range: float  # |x0_hat| is clipped to this; inf when clip_sample is off
    c_skip: float
    c_out: float
    sqrt_alpha_next: float  # sqrt(a) and sqrt(1 - a) of the next timestep, for the noise re-injection
    sqrt_beta_next: float
    final: bool  # last step: return x0, inject no noise


def apply_step(coeffs: StepCoefficients, model_output: Any, sample: Any, noise: Any | None = None) -> Any:
    """One LCM step with array arithmetic only: returns x_{t_{n+1}}, or x0 on the final step.

    `model_output`, `sample` and `noise`: same shape and dtype, e.g. latents [B, 4, H/8, W/8]; the result has
    that dtype too (python-float scalars do not promote numpy or CuPy arrays). The operation order is
    diffusers' so the float32 rounding matches. `noise` is ignored on the final step and required before it.
    """
    xp = array_namespace(sample)
    x0_hat = (coeffs.x0_from_sample * sample - coeffs.x0_from_output * model_output) / coeffs.x0_divisor
    if coeffs.clip_range != math.inf:
        x0_hat = xp.clip(x0_hat, -coeffs.clip_range, coeffs.clip_range)
    # consistency function with boundary condition: f(x_t, t) = c_skip * x_t + c_out * x0_hat
    denoised = coeffs.c_out * x0_hat + coeffs.c_skip * sample
    if coeffs.final:
        return denoised
    if noise is None:
        raise GenerationError(
            "LCM sampling needs fresh standard-normal noise on every step but the last: pass noise= an array "
            f"of shape {tuple(sample.shape)} and dtype {sample.dtype}, like the sample."
        )
    return coeffs.sqrt_alpha_next * denoised + coeffs.sqrt_beta_next * noise


def x0_prediction_coefficients(
    prediction_type: str, sqrt_alpha: np.float32, sqrt_beta: np.float32
) -> tuple[float, float, float]:
    """(x0_from_sample, x0_from_output, x0_divisor) so that x0_hat = (p * x_t - q * output) / r.

    Multiplying by 1 and dividing by 1 are exact, so each form rounds exactly like the direct formula.
    """
    if prediction_type == "epsilon":  # (x_t - sqrt(b_t) * eps) / sqrt(a_t)
        return 1.0, float(sqrt_beta), float(sqrt_alpha)
    if prediction_type == "v_prediction":  # sqrt(a_t) * x_t - sqrt(b_t) * v
        return float(sqrt_alpha), float(sqrt_beta), 1.0
    return 0.0, -1.0, 1.0  # sample: x0_hat = model_output


def boundary_condition_scalings(timestep: int, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) at a discrete timestep, in float32 like diffusers with the pipeline's tensor timestep."""
    f32 = np.float32
    scaled = f32(timestep) * f32(timestep_scaling)
    denominator = scaled * scaled + f32(SIGMA_DATA**2)
    c_skip = f32(SIGMA_DATA**2) / denominator
    c_out = scaled / np.sqrt(denominator)
    return float(c_skip), float(c_out)


class LCMSampler:
    """LCM multi-step sampler configured like diffusers' `LCMScheduler` (same config keys and defaults).

    Usage, mirroring a diffusers denoising loop (noise: standard normal, same shape as the latents):

        sampler = LCMSampler.from_config(manifest["scheduler"])
        sampler.set_timesteps(4)                       # timesteps: [999, 759, 499, 259] for SD1.5
        for i, t in enumerate(sampler.timesteps):
            eps = unet(latents, t, text_embeddings)    # latents: [B, 4, H/8, W/8]
            latents = sampler.step(eps, t, latents, noise=rng.standard_normal(latents.shape, np.float32)
                                   if i < len(sampler.timesteps) - 1 else None)
    """

    init_noise_sigma = 1.0  # standard deviation of the initial latents

    def __init__(self, **config: Any) -> None:
        unknown = sorted(k for k in config if k not in DEFAULT_CONFIG and not k.startswith("_"))
        if unknown:
            raise InputError(
                f"Unknown LCM scheduler config key(s) {unknown}; known keys: {sorted(DEFAULT_CONFIG)}. "
                "Use LCMSampler.from_config() for a config written for another diffusers scheduler."
            )
        self.config: dict[str, Any] = dict(DEFAULT_CONFIG)
        self.config.update((k, v) for k, v in config.items() if not k.startswith("_"))
        self.ignored_config_keys: tuple[str, ...] = ()
        _validate_config(self.config)

        betas = _betas(self.config)
        # alphas_cumprod[t] = prod_{s<=t} (1 - beta_s): the signal fraction a_t of q(x_t | x0)
        self.alphas_cumprod = _cumprod_like_torch(np.float32(1.0) - betas)

        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_inference_steps: int | None = None
        self._coefficients: list[StepCoefficients] = []

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LCMSampler:
        """Build from a diffusers scheduler config (e.g. scheduler_config.json or a manifest's "scheduler").

        Like diffusers' `LCMScheduler.from_config`, keys that LCMScheduler does not know (left by the base
        model's own scheduler, such as PNDM's `skip_prk_steps`) are dropped; their names are kept in
        `ignored_config_keys`. Keys starting with "_" are diffusers' metadata and are ignored.
        """
        known = {k: v for k, v in config.items() if k in DEFAULT_CONFIG}
        sampler = cls(**known)
        sampler.ignored_config_keys = tuple(
            sorted(k for k in config if k not in DEFAULT_CONFIG and not k.startswith("_"))
        )
        return sampler

    # ---- timesteps -------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
        original_inference_steps: int | None = None,
    ) -> None:
        """Choose the timesteps (`self.timesteps`, int64, descending) and precompute every step's scalars.

        Give either `num_inference_steps` (evenly spaced indices into the distillation schedule) or custom
        `timesteps`. `strength` < 1 (img2img) keeps only the lower-noise part of the schedule, as diffusers.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise GenerationError("Pass exactly one of num_inference_steps or timesteps to set_timesteps.")
        num_train = self.config["num_train_timesteps"]
        original_steps = (
            self.config["original_inference_steps"]
            if original_inference_steps is None
            else original_inference_steps
        )
        if not _is_int(original_steps) or not 1 <= original_steps <= num_train:
            raise GenerationError(
                f"original_inference_steps must be an integer in [1, {num_train}] "
                f"(num_train_timesteps), got {original_steps!r}."
            )
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise GenerationError(f"strength must be a number in (0, 1], got {strength!r}.")

        if timesteps is not None:
            chosen = self._custom_timesteps(timesteps, original_steps, strength)
        else:
            chosen = self._evenly_spaced_timesteps(num_inference_steps, original_steps, strength)

        self.timesteps = chosen
        self.num_inference_steps = len(chosen)
        self._coefficients = [self._compute_coefficients(i) for i in range(len(chosen))]

    def _evenly_spaced_timesteps(self, num_inference_steps: Any, original_steps: int, strength: float) -> np.ndarray:
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise GenerationError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        num_train = self.config["num_train_timesteps"]
        # Distillation schedule with the paper's skipping interval k: t = k*i - 1 for i = 1..N, where img2img
        # strength keeps the first (lowest-noise) N = int(original_steps * strength) of them.
        k = num_train // original_steps
        lcm_origin_timesteps = np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1
        if num_inference_steps > original_steps:  # original_steps <= num_train_timesteps is already checked
            raise GenerationError(
                f"num_inference_steps={num_inference_steps} is larger than original_inference_steps="
                f"{original_steps}: LCM timesteps are a subset of the {original_steps}-step distillation schedule."
            )
        if len(lcm_origin_timesteps) < num_inference_steps:
            raise GenerationError(
                f"num_inference_steps={num_inference_steps} is more than the {len(lcm_origin_timesteps)} "
                f"timesteps left of the {original_steps}-step distillation schedule at strength={strength}: "
                f"use at most {len(lcm_origin_timesteps)} steps or a strength of at least "
                f"{num_inference_steps / original_steps}."
            )
        # evenly spaced indices into the descending schedule
        descending = lcm_origin_timesteps[::-1]
        indices = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False)).astype(np.int64)
        return descending[indices].astype(np.int64)

    def _custom_timesteps(self, timesteps: Sequence[int], original_steps: int, strength: float) -> np.ndarray:
        num_train = self.config["num_train_timesteps"]
        values = np.asarray(timesteps)
        if values.ndim != 1 or values.size == 0:
            raise GenerationError(f"timesteps must be a non-empty 1-D list of integers, got {timesteps!r}.")
        if values.dtype.kind not in "iu":
            if values.dtype.kind != "f" or not np.all(values == np.round(values)):
                raise GenerationError(f"timesteps must be integers, got {list(values)}.")
        values = values.astype(np.int64)
        if np.any(np.diff(values) >= 0):
            raise GenerationError(f"timesteps must be strictly descending, got {values.tolist()}.")
        if values[0] >= num_train or values[-1] < 0:
            raise GenerationError(
                f"timesteps must lie in [0, {num_train - 1}] (num_train_timesteps={num_train}), got {values.tolist()}."
            )
        # The same advice diffusers logs: these run, but are off the schedule the model was distilled on.
        if strength == 1.0 and values[0] != num_train - 1:
            warnings.warn(
                f"The custom timesteps start at {values[0]}, not {num_train - 1}: results may be unexpected.",
                stacklevel=3,
            )
        k = num_train // original_steps
        distillation_schedule = set(range(k - 1, k * original_steps, k))  # the full one, whatever the strength
        off_schedule = sorted(set(values.tolist()) - distillation_schedule, reverse=True)
        if off_schedule:
            warnings.warn(
                f"The custom timesteps {off_schedule} are not on the {original_steps}-step distillation "
                "schedule: results may be unexpected.",
                stacklevel=3,
            )
        if len(values) > original_steps:
            warnings.warn(
                f"{len(values)} custom timesteps are more than original_inference_steps={original_steps}: "
                "results may be unexpected.",
                stacklevel=3,
            )
        # img2img strength keeps the last (lowest-noise) part, as diffusers' img2img get_timesteps.
        count = len(values)
        start = max(count - min(int(count * strength), count), 0)
        if start >= count:
            raise GenerationError(
                f"strength={strength} leaves none of the {count} custom timesteps: raise strength to at least "
                f"{1 / count}."
            )
        return values[start:]

    def begin_at(self, step_index: int) -> None:
        """Drop the first `step_index` timesteps (diffusers' `set_begin_index`): img2img and inpainting start
        part-way down the schedule (`img2img_start`). Each kept step keeps its scalars, the last one final."""
        if not self._coefficients:
            raise GenerationError("Call set_timesteps() before begin_at().")
        if not _is_int(step_index) or not 0 <= step_index < len(self._coefficients):
            raise GenerationError(f"begin_at({step_index!r}) must keep at least one of the "
                                  f"{len(self._coefficients)} timesteps.")
        self.timesteps = self.timesteps[step_index:]
        self._coefficients = self._coefficients[step_index:]

    # ---- stepping --------------------------------------------------------------------------------------

    def _compute_coefficients(self, step_index: int) -> StepCoefficients:
        f32 = np.float32
        t = int(self.timesteps[step_index])
        final = step_index == len(self.timesteps) - 1
        t_next = t if final else int(self.timesteps[step_index + 1])
        alpha = self.alphas_cumprod[t]
        alpha_next = self.alphas_cumprod[t_next]
        sqrt_alpha, sqrt_beta = np.sqrt(alpha), np.sqrt(f32(1.0) - alpha)
        x0_from_sample, x0_from_output, x0_divisor = x0_prediction_coefficients(
            self.config["prediction_type"], sqrt_alpha, sqrt_beta
        )
        c_skip, c_out = boundary_condition_scalings(t, self.config["timestep_scaling"])
        clip_range = float(self.config["clip_sample_range"]) if self.config["clip_sample"] else math.inf
        return StepCoefficients(
            x0_from_sample=x0_from_sample,
            x0_from_output=x0_from_output,
            x0_divisor=x0_divisor,
            clip_range=clip_range,
            c_skip=c_skip,
            c_out=c_out,
            sqrt_alpha_next=float(np.sqrt(alpha_next)),
            sqrt_beta_next=float(np.sqrt(f32(1.0) - alpha_next)),
            final=final,
        )

    def step_coefficients(self, step_index: int) -> StepCoefficients:
        """The scalars of step `step_index` of the current timesteps (precomputed by set_timesteps)."""
        if not self._coefficients:
            raise GenerationError("Call set_timesteps() before stepping the LCM sampler.")
        if not 0 <= step_index < len(self._coefficients):
            raise GenerationError(
                f"step_index {step_index} is outside the {len(self._coefficients)} steps set by set_timesteps()."
            )
        return self._coefficients[step_index]

    def index_for_timestep(self, timestep: Any) -> int:
        """Position of `timestep` in the current timesteps (diffusers finds its step index the same way)."""
        if not self._coefficients:
            raise GenerationError("Call set_timesteps() before stepping the LCM sampler.")
        positions = np.flatnonzero(self.timesteps == int(timestep))
        if positions.size == 0:
            raise GenerationError(
                f"Timestep {int(timestep)} is not in the current schedule {self.timesteps.tolist()}: "
                "step with the timesteps set by set_timesteps()."
            )
        return int(positions[0])

    def step(self, model_output: Any, timestep: Any, sample: Any, noise: Any | None = None) -> Any:
        """Denoise `sample` at `timestep` with the UNet's `model_output`; returns the next sample.

        On the final timestep this is the denoised x0 and `noise` is ignored; before it, `noise` (standard
        normal, same shape as `sample`) is required and re-injected to reach the next timestep's noise level.
        """
        coeffs = self.step_coefficients(self.index_for_timestep(timestep))
        if tuple(model_output.shape) != tuple(sample.shape):
            raise GenerationError(
                f"model_output has shape {tuple(model_output.shape)} but the sample has {tuple(sample.shape)}."
            )
        if not coeffs.final and noise is not None and tuple(noise.shape) != tuple(sample.shape):
            raise GenerationError(
                f"noise has shape {tuple(noise.shape)}; it must have the sample's shape {tuple(sample.shape)}."
            )
        return apply_step(coeffs, model_output, sample, noise)

    def add_noise(self, original_samples: Any, noise: Any, timesteps: Any) -> Any:
        """Forward diffusion q(x_t | x0) = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise, for img2img start latents.

        `timesteps`: one integer, or one per batch element (shape [B]). Rounds like diffusers' add_noise.
        """
        if tuple(noise.shape) != tuple(original_samples.shape):
            raise GenerationError(
                f"noise has shape {tuple(noise.shape)}; it must have the samples' shape "
                f"{tuple(original_samples.shape)}."
            )
        t = np.asarray(timesteps)
        num_train = self.config["num_train_timesteps"]
        if t.dtype.kind not in "iu" or t.ndim > 1 or np.any(t < 0) or np.any(t >= num_train):
            raise GenerationError(
                f"add_noise timesteps must be integers in [0, {num_train - 1}], one or one per batch "
                f"element, got {timesteps!r}."
            )
        # diffusers casts alphas_cumprod to the samples' dtype before taking square roots
        alpha = self.alphas_cumprod.astype(original_samples.dtype)[t]
        sqrt_alpha, sqrt_beta = np.sqrt(alpha), np.sqrt(1 - alpha)
        if t.ndim == 0:
            return float(sqrt_alpha) * original_samples + float(sqrt_beta) * noise
        xp = array_namespace(original_samples)
        per_sample = (-1,) + (1,) * (len(original_samples.shape) - 1)  # [B, 1, 1, 1] for latents
        sqrt_alpha = xp.asarray(sqrt_alpha.reshape(per_sample))
        sqrt_beta = xp.asarray(sqrt_beta.reshape(per_sample))
        return sqrt_alpha * original_samples + sqrt_beta * noise


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """The first of `num_inference_steps` timesteps an image edit at `strength` runs, as diffusers' img2img and
    inpaint pipelines choose it (`get_timesteps`): the last int(num_inference_steps * strength) steps, so the
    image is noised to the level of the first of them. A GenerationError where none is left."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not 0 < strength <= 1:
        raise GenerationError(f"strength={strength!r} must be a number in (0, 1]: the share of the schedule an image "
                              "edit runs (0.3 keeps the image close, 1.0 starts from noise).")
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    if kept < 1:
        least = math.ceil(1 / strength - 1e-9)
        raise GenerationError(f"strength={strength:g} with num_inference_steps={num_inference_steps} runs "
                              f"int({num_inference_steps} * {strength:g}) = 0 steps: raise num_inference_steps to at "
                              f"least {least}, or strength to at least {math.ceil(1e4 / num_inference_steps) / 1e4:g}.")
    return num_inference_steps - kept


# ---- noise schedule (float32, rounded like diffusers' torch code on the CPU) -------------------------------


def _betas(config: Mapping[str, Any]) -> np.ndarray:
    n = config["num_train_timesteps"]
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = _linspace_like_torch(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        # latent diffusion's schedule: linear in sqrt(beta)
        betas = _linspace_like_torch(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    if config["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _fma_float32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x * y + z with a single rounding to float32 (a fused multiply-add) for float32 inputs."""
    x64, y64, z64 = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (x, y, z))
    product = x64 * y64  # exact: 24 + 24 significant bits fit in float64's 53
    total = product + z64
    # two-sum: the exact rounding error of `total`; rounding to odd then keeps the float32 rounding single
    z_part = total - product
    error = (product - (total - z_part)) + (z64 - z_part)
    even = (total.view(np.int64) & 1) == 0
    total = np.where((error != 0) & even, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)


def _linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) as its vectorized CPU kernel (AVX2/AVX512) rounds it:
    the first half counts up from start, the second half down from end, each with a fused multiply-add."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    up = _fma_float32(step, i.astype(np.float32), start32)
    down = _fma_float32(-step, (steps - 1 - i).astype(np.float32), end32)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def _cosine_betas(n: int) -> np.ndarray:
    """The squaredcos_cap_v2 schedule: betas from alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), MAX_COSINE_BETA) for i in range(n)]
    return np.array(betas, dtype=np.float32)


def _cumprod_like_torch(alphas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64 and rounds each partial product to float32
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al., arXiv 2305.08891, Algorithm 1), in float32 as diffusers."""
    alphas_bar_sqrt = np.sqrt(_cumprod_like_torch(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # last -> 0, first unchanged
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


# ---- config validation --------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _validate_config(config: Mapping[str, Any]) -> None:
    def bad(key: str, expected: str) -> InputError:
        return InputError(f"LCM scheduler config: {key} must be {expected}, got {config[key]!r}.")

    n = config["num_train_timesteps"]
    if not _is_int(n) or n < 1:
        raise bad("num_train_timesteps", "a positive integer")
    if config["trained_betas"] is not None:
        if np.asarray(config["trained_betas"]).shape != (n,):
            raise bad("trained_betas", f"a list of num_train_timesteps={n} numbers")
    elif config["beta_schedule"] not in BETA_SCHEDULES:
        raise bad("beta_schedule", f"one of {list(BETA_SCHEDULES)}")
    for key in ("beta_start", "beta_end"):
        if isinstance(config[key], bool) or not isinstance(config[key], (int, float)) or not 0 <= config[key] < 1:
            raise bad(key, "a number in [0, 1)")
    if config["prediction_type"] not in PREDICTION_TYPES:
        raise bad("prediction_type", f"one of {list(PREDICTION_TYPES)}")
    steps = config["original_inference_steps"]
    if not _is_int(steps) or not 1 <= steps <= n:
        raise bad("original_inference_steps", f"an integer in [1, num_train_timesteps={n}]")
    scaling = config["timestep_scaling"]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (0 < scaling < math.inf):
        raise bad("timestep_scaling", "a positive number")
    if config["clip_sample"] and not config["clip_sample_range"] > 0:
        raise bad("clip_sample_range", "a positive number when clip_sample is on")
    if config["thresholding"]:
        raise InputError(
            "LCM scheduler config: thresholding=True (dynamic thresholding) is not supported by lcmrt; it is "
            "meant for pixel-space models, not latent diffusion. Set thresholding to false."
        )
    if config["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise bad("timestep_spacing", f"one of {list(TIMESTEP_SPACINGS)}")
    if not _is_int(config["steps_offset"]) or config["steps_offset"] < 0:
        raise bad("steps_offset", "a non-negative integer")
