"""lcmrt.sampler against diffusers' LCMScheduler: same timesteps, same trajectories, same errors."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from lcmrt.errors import GenerationError, InputError
from lcmrt.sampler import LCMSampler, StepCoefficients, apply_step, x0_prediction_coefficients

torch = pytest.importorskip("torch")
scheduling_lcm = pytest.importorskip("diffusers.schedulers.scheduling_lcm")

# Parity bound with diffusers for float32 trajectories (the project's sampler contract).
MAX_ABS_DIFF = 1e-6
LATENT_SHAPE = (2, 4, 16, 16)  # [B, 4, H/8, W/8] of a 128x128 image

# The LCM-LoRA scheduler config of SD1.5 as diffusers writes it, metadata keys included.
SD15_CONFIG = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


# The parity cases: (config overrides, set_timesteps arguments). Model outputs and noise are random N(0, 1).
CASES = {
    **{
        f"{prediction}-{steps}step-alpha_one_{one}": (
            {"prediction_type": prediction, "set_alpha_to_one": one},
            {"num_inference_steps": steps},
        )
        for prediction in ("epsilon", "v_prediction", "sample")
        for steps in (1, 2, 4, 8)
        for one in (True, False)
    },
    "linear": ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {"num_inference_steps": 4}),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, {"num_inference_steps": 4}),
    "clip": ({"clip_sample": True, "clip_sample_range": 1.5}, {"num_inference_steps": 4}),
    "scaling": ({"timestep_scaling": 5.0, "original_inference_steps": 40}, {"num_inference_steps": 4}),
    "zero_snr": ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, {"num_inference_steps": 4}),
    "trained_betas": ({"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()}, {"num_inference_steps": 4}),
    "custom": ({}, {"timesteps": [999, 759, 499, 259]}),
    "custom_off_schedule": ({}, {"timesteps": [999, 500, 100]}),
    "custom_late_start": ({}, {"timesteps": [899, 599, 299, 0]}),
    "strength_0.5": ({}, {"num_inference_steps": 4, "strength": 0.5}),
    "strength_0.83": ({}, {"num_inference_steps": 4, "strength": 0.83}),
    # diffusers keeps num_inference_steps at the unsliced length here, so it still draws noise on the last
    # step; its pipelines decode `denoised` though, which is what lcmrt returns on the last step.
    "custom_strength_0.5": ({}, {"timesteps": [999, 759, 499, 259], "strength": 0.5}),
}


def random_inputs(num_steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    outputs = [rng.standard_normal(LATENT_SHAPE, dtype=np.float32) for _ in range(num_steps)]
    noises = [rng.standard_normal(LATENT_SHAPE, dtype=np.float32) for _ in range(num_steps)]
    return sample, outputs, noises


def diffusers_scheduler(config, timestep_args):
    scheduler = scheduling_lcm.LCMScheduler.from_config(config)
    scheduler.set_timesteps(**timestep_args)
    return scheduler


def diffusers_trajectory(monkeypatch, scheduler, sample, outputs, noises) -> list[np.ndarray]:
    """Latents after every step of diffusers' LCMScheduler, with our noise in place of its generator's.

    The last entry is `denoised`, which diffusers' LCM pipelines decode after the loop.
    """
    pending = [torch.from_numpy(n) for n in noises]
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *args, **kwargs: pending.pop(0))
    latents, result = torch.from_numpy(sample), []
    for i, t in enumerate(scheduler.timesteps):  # t: 0-d int64 tensor, as in the pipelines
        latents, denoised = scheduler.step(torch.from_numpy(outputs[i]), t, latents, return_dict=False)
        result.append(latents.numpy())
    result[-1] = denoised.numpy()
    return result


def lcmrt_trajectory(sampler, sample, outputs, noises) -> list[np.ndarray]:
    latents, result = sample, []
    for i, t in enumerate(sampler.timesteps):
        latents = sampler.step(outputs[i], t, latents, noise=noises[i] if i < len(sampler.timesteps) - 1 else None)
        assert latents.dtype == np.float32
        result.append(latents)
    return result


def diffusers_coefficients(scheduler, prediction_type: str, clip_range: float) -> list[StepCoefficients]:
    """StepCoefficients holding diffusers' own float32 scalars (its torch sqrt included) for every step."""
    result = []
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        final = i == len(timesteps) - 1
        t_next = t if final else timesteps[i + 1]
        alpha, alpha_next = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_next]
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        x0_coefficients = x0_prediction_coefficients(
            prediction_type, alpha.sqrt().numpy(), (1 - alpha).sqrt().numpy()
        )
        result.append(
            StepCoefficients(
                *x0_coefficients,
                clip_range=clip_range,
                c_skip=float(c_skip),
                c_out=float(c_out),
                sqrt_alpha_next=float(alpha_next.sqrt()),
                sqrt_beta_next=float((1 - alpha_next).sqrt()),
                final=final,
            )
        )
    return result


@pytest.mark.filterwarnings("ignore:The custom timesteps")
@pytest.mark.parametrize("case", list(CASES))
def test_update_is_bit_identical_to_diffusers(monkeypatch, case):
    """Given diffusers' scalars, apply_step performs diffusers' float32 operations exactly."""
    overrides, timestep_args = CASES[case]
    config = {**SD15_CONFIG, **overrides}
    scheduler = diffusers_scheduler(config, timestep_args)
    sampler = LCMSampler.from_config(config)
    sampler.set_timesteps(**timestep_args)
    np.testing.assert_array_equal(sampler.timesteps, scheduler.timesteps.numpy())

    sample, outputs, noises = random_inputs(len(sampler.timesteps))
    clip_range = config["clip_sample_range"] if config["clip_sample"] else math.inf
    coefficients = diffusers_coefficients(scheduler, config["prediction_type"], clip_range)
    latents, ours = sample, []
    for i, coeffs in enumerate(coefficients):
        latents = apply_step(coeffs, outputs[i], latents, None if coeffs.final else noises[i])
        ours.append(latents)
    theirs = diffusers_trajectory(monkeypatch, scheduler, sample, outputs, noises)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:The custom timesteps")
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_diffusers(monkeypatch, case):
    """LCMSampler end to end: equal to diffusers up to its scalars' rounding, within MAX_ABS_DIFF relative to the
    largest float32 term of the x0 prediction (large for epsilon at high noise: x_t / sqrt(alpha_t))."""
    overrides, timestep_args = CASES[case]
    config = {**SD15_CONFIG, **overrides}
    sampler = LCMSampler.from_config(config)
    sampler.set_timesteps(**timestep_args)
    sample, outputs, noises = random_inputs(len(sampler.timesteps))
    ours = lcmrt_trajectory(sampler, sample, outputs, noises)
    theirs = diffusers_trajectory(monkeypatch, diffusers_scheduler(config, timestep_args), sample, outputs, noises)

    scale = 1.0
    for i, latents in enumerate([sample, *ours[:-1]]):
        c = sampler.step_coefficients(i)
        terms = (np.abs(c.x0_from_sample * latents) + np.abs(c.x0_from_output * outputs[i])) / c.x0_divisor
        scale = max(scale, float(terms.max()))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
    assert diff <= MAX_ABS_DIFF * scale


def test_scalars_match_diffusers():
    """alphas_cumprod, c_skip and c_out are bit-equal; square roots are within one float32 ulp of torch's."""
    scheduler = diffusers_scheduler(SD15_CONFIG, {"num_inference_steps": 8})
    sampler = LCMSampler.from_config(SD15_CONFIG)
    sampler.set_timesteps(8)
    np.testing.assert_array_equal(sampler.alphas_cumprod, scheduler.alphas_cumprod.numpy())
    for i, theirs in enumerate(diffusers_coefficients(scheduler, "epsilon", math.inf)):
        ours = sampler.step_coefficients(i)
        assert (ours.c_skip, ours.c_out, ours.final) == (theirs.c_skip, theirs.c_out, theirs.final)
        for name in ("x0_from_output", "x0_divisor", "sqrt_alpha_next", "sqrt_beta_next"):
            a, b = getattr(ours, name), getattr(theirs, name)
            assert abs(a - b) <= np.spacing(np.float32(b)), name


def test_custom_timesteps_off_the_schedule_warn():
    sampler = LCMSampler(**SD15_CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.set_timesteps(timesteps=[999, 759, 499, 259])
    with pytest.warns(UserWarning, match=r"\[500, 100\] are not on the 50-step distillation schedule"):
        sampler.set_timesteps(timesteps=[999, 500, 100])
    with pytest.warns(UserWarning, match="start at 899"):
        sampler.set_timesteps(timesteps=[899, 759])


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [(1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259]), (8, [999, 879, 759, 639, 499, 379, 259, 139])],
)
def test_timesteps(num_steps, expected):
    sampler = LCMSampler(**SD15_CONFIG)
    sampler.set_timesteps(num_steps)
    assert sampler.timesteps.dtype == np.int64
    assert sampler.timesteps.tolist() == expected
    diffusers_scheduler = scheduling_lcm.LCMScheduler.from_config(SD15_CONFIG)
    diffusers_scheduler.set_timesteps(num_steps)
    assert diffusers_scheduler.timesteps.tolist() == expected


def test_timesteps_ignore_steps_offset_and_spacing_like_diffusers():
    sampler = LCMSampler(**{**SD15_CONFIG, "steps_offset": 0, "timestep_spacing": "trailing"})
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bit_equal(schedule):
    config = {**SD15_CONFIG, "beta_schedule": schedule}
    expected = scheduling_lcm.LCMScheduler.from_config(config).alphas_cumprod.numpy()
    np.testing.assert_array_equal(LCMSampler.from_config(config).alphas_cumprod, expected)


@pytest.mark.parametrize("timesteps", [499, [499, 259]])
def test_add_noise_matches_diffusers(timesteps):
    rng = np.random.default_rng(3)
    original = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    noise = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    ours = LCMSampler(**SD15_CONFIG).add_noise(original, noise, timesteps)
    theirs = scheduling_lcm.LCMScheduler.from_config(SD15_CONFIG).add_noise(
        torch.from_numpy(original), torch.from_numpy(noise), torch.tensor(timesteps)
    )
    assert ours.dtype == np.float32 and ours.shape == LATENT_SHAPE
    assert np.abs(ours - theirs.numpy()).max() <= MAX_ABS_DIFF


def test_init_noise_sigma():
    assert LCMSampler(**SD15_CONFIG).init_noise_sigma == 1.0


def test_missing_noise_names_the_shape():
    sampler = LCMSampler(**SD15_CONFIG)
    sampler.set_timesteps(4)
    sample, outputs, _ = random_inputs(1, seed=1)
    with pytest.raises(GenerationError, match=r"noise.*\(2, 4, 16, 16\)"):
        sampler.step(outputs[0], sampler.timesteps[0], sample)
    # the last step needs none
    final = sampler.step(outputs[0], sampler.timesteps[-1], sample)
    assert final.shape == LATENT_SHAPE


def test_step_errors():
    sampler = LCMSampler(**SD15_CONFIG)
    sample, outputs, noises = random_inputs(1, seed=2)
    with pytest.raises(GenerationError, match="set_timesteps"):
        sampler.step(outputs[0], 999, sample, noise=noises[0])
    sampler.set_timesteps(4)
    with pytest.raises(GenerationError, match="not in the current schedule"):
        sampler.step(outputs[0], 500, sample, noise=noises[0])
    with pytest.raises(GenerationError, match="shape"):
        sampler.step(outputs[0], 999, sample, noise=noises[0][:1])


def test_apply_step_keeps_dtype_and_matches_step():
    sampler = LCMSampler(**SD15_CONFIG)
    sampler.set_timesteps(4)
    sample, outputs, noises = random_inputs(1, seed=4)
    coeffs = sampler.step_coefficients(1)
    assert all(isinstance(c, (float, bool)) for c in coeffs)
    expected = sampler.step(outputs[0], sampler.timesteps[1], sample, noise=noises[0])
    np.testing.assert_array_equal(apply_step(coeffs, outputs[0], sample, noises[0]), expected)
    as64 = apply_step(coeffs, outputs[0].astype(np.float64), sample.astype(np.float64), noises[0].astype(np.float64))
    assert as64.dtype == np.float64
    assert np.abs(as64 - expected).max() < 1e-4


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"thresholding": True}, "thresholding"),
        ({"original_inference_steps": 2000}, "original_inference_steps"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"trained_betas": [0.01] * 10}, "trained_betas"),
        ({"timestep_scaling": -1.0}, "timestep_scaling"),
        ({"skip_prk_steps": True}, "skip_prk_steps"),
    ],
)
def test_bad_config_errors(overrides, match):
    with pytest.raises(InputError, match=match):
        LCMSampler(**{**SD15_CONFIG, **overrides})


def test_from_config_drops_keys_of_other_schedulers():
    sampler = LCMSampler.from_config({**SD15_CONFIG, "skip_prk_steps": True})
    assert sampler.ignored_config_keys == ("skip_prk_steps",)
    assert sampler.config["steps_offset"] == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"num_inference_steps": 51}, "original_inference_steps=50"),
        ({"num_inference_steps": 0}, "positive integer"),
        ({"num_inference_steps": 30, "strength": 0.5}, "at most 25 steps"),
        ({}, "exactly one"),
        ({"num_inference_steps": 4, "timesteps": [999]}, "exactly one"),
        ({"timesteps": [259, 499]}, "descending"),
        ({"timesteps": [1000, 499]}, r"\[0, 999\]"),
        ({"timesteps": [999, -1]}, r"\[0, 999\]"),
        ({"timesteps": [999.5]}, "integers"),
        ({"timesteps": []}, "non-empty"),
        ({"timesteps": [999, 759], "strength": 0.3}, "leaves none"),
        ({"num_inference_steps": 4, "strength": 0.0}, "strength"),
    ],
)
def test_set_timesteps_errors(args, match):
    with pytest.raises(GenerationError, match=match):
        LCMSampler(**SD15_CONFIG).set_timesteps(**args)


def test_runtime_module_imports_no_torch():
    code = "import lcmrt.sampler, sys; assert not any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)

