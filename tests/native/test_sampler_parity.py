"""The native LCM sampler (lcmrt/csrc/src/sampler.cpp) against lcmrt/sampler.py: the same timesteps, alphas_cumprod
and step coefficients, bit for bit, for every schedule and parameterization diffusers' LCMScheduler knows."""
import json

import numpy as np
import pytest

from lcmrt.sampler import LCMSampler

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True, "_class_name": "LCMScheduler"}
CONFIGS = {
    "sd15": SD15,
    "linear": {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {**SD15, "beta_schedule": "squaredcos_cap_v2"},
    "v-prediction-zero-snr": {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    "sample-clipped": {**SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
    "trained-betas": {**SD15, "num_train_timesteps": 100, "original_inference_steps": 20,
                      "trained_betas": np.linspace(1e-4, 0.03, 100).tolist()},
    "scaling-and-original-steps": {**SD15, "timestep_scaling": 7.5, "original_inference_steps": 25},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_sampler_is_pythons(probe, name):
    config = CONFIGS[name]
    for steps in (1, 2, 3, 4, 6, 8):
        native = json.loads(probe("sampler", steps, stdin=json.dumps(config).encode()))
        python = LCMSampler.from_config(config)
        python.set_timesteps(steps)
        assert native["timesteps"] == python.timesteps.tolist()
        np.testing.assert_array_equal(np.array(native["alphas_cumprod"], np.float32), python.alphas_cumprod)
        for i, row in enumerate(native["coefficients"]):
            expected = python.step_coefficients(i)
            assert [float(v) for v in row[:-1]] == list(expected[:-1]) and row[-1] == expected.final, (steps, i)


def test_sampler_refuses_what_python_refuses(native_build):
    import subprocess

    probe_path = native_build / "tests" / "native" / "lcmrt-probe"
    for config, steps, fragment in [({**SD15, "thresholding": True}, 4, "thresholding=True"),
                                    ({**SD15, "prediction_type": "x"}, 4, "prediction_type must be one of"),
                                    (SD15, 51, "larger than original_inference_steps=50")]:
        run = subprocess.run([str(probe_path), "sampler", str(steps)], input=json.dumps(config).encode(),
                             capture_output=True)
        assert run.returncode == 1 and fragment in run.stderr.decode(), run.stderr
