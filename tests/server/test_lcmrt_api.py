"""lcmrt's own API, POST /v1/images (lcmrt/server/lcmrt_api.py)."""
from __future__ import annotations

import base64
import io

import numpy as np
from conftest import png_pixels

import lcmrt
from lcmrt.images import read_png_metadata

PROMPT = "ein Bär im Schnee, 雪の中の狐"


def test_images_with_the_metadata_lcmrt_generate_writes(client, reference_adapter_pipe, two_adapter_folder):
    status, _, body = client.post("/v1/images", {"model": "two", "prompt": PROMPT, "num_inference_steps": 3,
                                                 "seed": 11, "num_images": 2, "adapters": {"style2": 0.25}})
    assert status == 200, body
    assert body["model"] == "two" and body["seed"] == 11
    assert body["adapters"] == {"lcm": 1.0, "style2": 0.25}
    # the folder's batch is 1: two chunks of three UNet steps
    assert body["timings"]["queue_wait"] >= 0 and len(body["timings"]["unet_steps"]) == 2 * 3
    reference_adapter_pipe.set_adapters({"style2": 0.25})
    expected = reference_adapter_pipe(PROMPT, num_inference_steps=3, seed=11, num_images=2)
    for image, reference in zip(body["images"], expected):
        np.testing.assert_array_equal(png_pixels(image), np.asarray(reference))
    metadata = read_png_metadata(io.BytesIO(base64.b64decode(body["images"][1])))
    assert metadata == {"prompt": PROMPT, "negative_prompt": None, "seed": 11, "steps": 3, "guidance": 1.0,
                        "adapters": {"lcm": 1.0, "style2": 0.25}, "engine_folder": str(two_adapter_folder),
                        "backend": reference_adapter_pipe.backend, "lcmrt_version": lcmrt.__version__,
                        "precision": reference_adapter_pipe.last_precisions}


def test_guidance_and_a_negative_prompt(client, cfg_pipe):
    status, _, body = client.post("/v1/images", {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 5,
                                                 "guidance_scale": 1.5})
    assert status == 200, body
    expected = cfg_pipe(PROMPT, negative_prompt="blurry", guidance_scale=1.5, seed=5)[0]
    np.testing.assert_array_equal(png_pixels(body["images"][0]), np.asarray(expected))


def test_malformed_json_and_bad_values_are_422(client):
    status, _, body = client.post("/v1/images", raw=b'{"prompt": "a fox",')
    assert status == 422 and "not valid JSON" in body["detail"]
    cases = (({"prompt": "a fox", "num_inference_steps": 4.0}, "num_inference_steps: Input should be a valid integer"),
             ({"prompt": "a fox", "num_inference_steps": 51}, "outside 1..50"),
             ({"prompt": "a fox", "guidance_scale": "high"}, "guidance_scale"),
             ({"prompt": "a fox", "steps": 4}, "steps: Extra inputs are not permitted"),
             ({}, "prompt: Field required"),
             ({"prompt": "a fox", "seed": 2**64}, "seed=18446744073709551616"),
             ({"prompt": "a fox", "num_images": 0}, "num_images=0"),
             ({"prompt": "a fox", "height": 64, "width": 64}, "128x128"),
             ({"prompt": "a fox", "model": "two", "adapters": {"style": 0.5, "nope": 1.0}}, "'nope'"),
             ({"prompt": "a fox", "adapters": {"lcm": 0.5}}, "fused"))
    for request, fragment in cases:
        status, _, body = client.post("/v1/images", request)
        assert status == 422, (request, body)
        assert fragment in body["detail"], (request, body)
        assert "Traceback" not in body["detail"]
