"""The AUTOMATIC1111 web UI API subset of lcmrt/server/sdapi.py, as its clients call it."""
from __future__ import annotations

import json

import numpy as np
from conftest import png_pixels, running

from lcmrt.server import create_app

PROMPT = "a watercolor fox in the snow"


def test_txt2img_gives_the_pipelines_images_for_the_seed(client, cfg_pipe):
    status, _, body = client.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "seed": 7, "batch_size": 2, "steps": 3,
                                                        "sampler_name": "Euler a", "restore_faces": False})
    assert status == 200, body
    info = json.loads(body["info"])
    # image i has the seed seed + i, as in the web UI: resending all_seeds[i] gives image i
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert (info["steps"], info["cfg_scale"], info["sd_model_name"]) == (3, 1.0, "tiny-cfg")
    assert info["width"] == info["height"] == 128 and info["sampler_name"] == "LCM"
    assert len(body["images"]) == 2
    for seed, image in zip(info["all_seeds"], body["images"]):
        expected = np.asarray(cfg_pipe(PROMPT, num_inference_steps=3, seed=seed, output="pil")[0])
        np.testing.assert_array_equal(png_pixels(image), expected)
    # the request is echoed, the fields lcmrt does not use included
    assert body["parameters"]["sampler_name"] == "Euler a" and body["parameters"]["batch_size"] == 2


def test_a_random_seed_is_reported(client, cfg_pipe):
    status, _, body = client.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "seed": -1})
    assert status == 200, body
    seed = json.loads(body["info"])["seed"]
    assert 0 <= seed < 2**32
    np.testing.assert_array_equal(png_pixels(body["images"][0]), np.asarray(cfg_pipe(PROMPT, seed=seed)[0]))


def test_a_lora_tag_switches_the_adapters_and_leaves_the_prompt(client, reference_adapter_pipe):
    status, _, body = client.post("/sdapi/v1/txt2img", {
        "prompt": f"{PROMPT} <lora:style2:0.5>", "seed": 3, "override_settings": {"sd_model_checkpoint": "two"}})
    assert status == 200, body
    reference_adapter_pipe.set_adapters({"style2": 0.5})
    expected = np.asarray(reference_adapter_pipe(PROMPT, seed=3)[0])
    np.testing.assert_array_equal(png_pixels(body["images"][0]), expected)
    # and without a tag, the folder's default adapters (style at 0.8): a different image
    status, _, body = client.post("/sdapi/v1/txt2img", {
        "prompt": PROMPT, "seed": 3, "override_settings": {"sd_model_checkpoint": "two"}})
    reference_adapter_pipe.set_adapters({"style": 0.8})
    default = np.asarray(reference_adapter_pipe(PROMPT, seed=3)[0])
    np.testing.assert_array_equal(png_pixels(body["images"][0]), default)
    assert np.abs(default.astype(int) - expected).max() > 0


def test_unknown_or_malformed_lora_is_422_naming_the_adapters(client):
    status, _, body = client.post("/sdapi/v1/txt2img", {
        "prompt": "a fox <lora:papercut:0.7>", "override_settings": {"sd_model_checkpoint": "two"}})
    assert status == 422
    assert "'papercut'" in body["detail"] and "style, lcm2, style2" in body["detail"]
    status, _, body = client.post("/sdapi/v1/txt2img", {
        "prompt": "a fox <lora:style2:much>", "override_settings": {"sd_model_checkpoint": "two"}})
    assert status == 422 and "<lora:NAME:WEIGHT>" in body["detail"]


def test_bad_values_are_422(client):
    for request, fragment in (({"steps": 0}, "num_inference_steps=0"), ({"width": 100}, "128x128"),
                              ({"seed": -2}, "seed"), ({"batch_size": 65}, "at most 64"),
                              ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, "'sdxl'")):
        status, _, body = client.post("/sdapi/v1/txt2img", {"prompt": PROMPT, **request})
        assert status == 422, (request, body)
        assert fragment in body["detail"], (request, body)


def test_sd_models_options_and_loras(pipelines, two_adapter_folder):
    with running(create_app(pipelines)) as client:
        status, _, models = client.get("/sdapi/v1/sd-models")
        assert status == 200
        assert [(m["title"], m["model_name"]) for m in models] == [("tiny-cfg", "tiny-cfg"), ("two", "two")]
        assert models[1]["filename"] == str(two_adapter_folder) and set(models[1]) >= {"hash", "sha256", "config"}
        assert client.get("/sdapi/v1/options")[2] == {"sd_model_checkpoint": "tiny-cfg"}
        assert client.get("/sdapi/v1/loras")[2] == []  # the fused folder has no refittable adapter

        status, _, _ = client.post("/sdapi/v1/options", {"sd_model_checkpoint": "two", "sd_vae": "Automatic"})
        assert status == 200
        assert client.get("/sdapi/v1/options")[2] == {"sd_model_checkpoint": "two"}
        loras = client.get("/sdapi/v1/loras")[2]
        assert [(lora["name"], lora["alias"]) for lora in loras] == [("style", "style"), ("lcm2", "lcm2"),
                                                                    ("style2", "style2")]
        assert loras[0]["path"] == str(two_adapter_folder / "adapters" / "style.safetensors")
        status, _, body = client.post("/sdapi/v1/options", {"sd_model_checkpoint": "nope"})
        assert status == 422 and "tiny-cfg, two" in body["detail"]


def test_progress_when_idle(client):
    status, _, body = client.get("/sdapi/v1/progress")
    assert status == 200
    assert (body["progress"], body["eta_relative"], body["state"]["job_count"]) == (0.0, 0.0, 0)
    assert set(body) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
