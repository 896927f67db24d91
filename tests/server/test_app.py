"""/health, /metrics and the API key of lcmrt/server/app.py."""
from __future__ import annotations

import re

import pytest
from conftest import running

from lcmrt.errors import InputError
from lcmrt.server import create_app

KEY = "s3cret-key"


def _sample(metrics: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus' text format."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" (\S+)"
    match = re.search(f"^{pattern}$", metrics, re.MULTILINE)
    assert match, f"no {name} {labels} in\n{metrics}"
    return float(match.group(1))


def test_health(client):
    assert client.get("/health")[::2] == (200, {"status": "ok", "models": ["tiny-cfg", "two"], "queue_depth": 0})


def test_the_api_key_guards_every_endpoint_but_health(pipelines):
    with running(create_app(pipelines, api_key=KEY), api_key=KEY) as client:
        anonymous = type(client)(client.port)
        assert anonymous.get("/health")[0] == 200
        for method, path in (("GET", "/metrics"), ("GET", "/sdapi/v1/sd-models"), ("POST", "/sdapi/v1/txt2img"),
                             ("POST", "/v1/images"), ("GET", "/docs")):
            status, headers, body = anonymous.request(method, path, body={"prompt": "a fox"})
            assert status == 401, path
            assert "--api-key" in body["detail"] and headers["www-authenticate"] == "Bearer"
        wrong = type(client)(client.port, api_key="guess")
        assert wrong.get("/sdapi/v1/sd-models")[0] == 401
        assert client.get("/sdapi/v1/sd-models")[0] == 200
        assert client.post("/v1/images", {"prompt": "a fox", "seed": 1})[0] == 200
        metrics = client.get("/metrics")[2]
        assert _sample(metrics, "lcmrt_requests_total", endpoint="/sdapi/v1/sd-models", status="401") == 2
        assert _sample(metrics, "lcmrt_requests_total", endpoint="/v1/images", status="401") == 1


def test_metrics_count_requests_images_and_adapter_swaps(pipelines, adapter_pipe):
    adapter_pipe.set_adapters({"style": 0.8})  # the folder's defaults, whatever earlier tests left
    with running(create_app(pipelines)) as client:
        txt2img = "/sdapi/v1/txt2img"
        two = {"override_settings": {"sd_model_checkpoint": "two"}}
        assert client.post(txt2img, {"prompt": "a fox", "batch_size": 3})[0] == 200
        assert client.post(txt2img, {"prompt": "a fox", **two})[0] == 200  # the defaults: no swap
        assert client.post(txt2img, {"prompt": "a fox <lora:style2:0.5>", **two})[0] == 200  # swap 1
        assert client.post(txt2img, {"prompt": "a fox <lora:style2>", **two})[0] == 200  # swap 2 (weight 1)
        assert client.post(txt2img, {"prompt": "a fox <lora:style2:1.0>", **two})[0] == 200  # the same set
        assert client.post(txt2img, {"prompt": "a fox", "steps": 0})[0] == 422
        assert client.get("/nowhere")[0] == 404
        metrics = client.get("/metrics")[2]
    assert _sample(metrics, "lcmrt_requests_total", endpoint=txt2img, status="200") == 5
    assert _sample(metrics, "lcmrt_requests_total", endpoint=txt2img, status="422") == 1
    assert _sample(metrics, "lcmrt_requests_total", endpoint="unmatched", status="404") == 1
    assert _sample(metrics, "lcmrt_images_generated_total", model="tiny-cfg") == 3
    assert _sample(metrics, "lcmrt_images_generated_total", model="two") == 4
    assert _sample(metrics, "lcmrt_adapter_swaps_total", model="two") == 2
    assert _sample(metrics, "lcmrt_adapter_swaps_total", model="tiny-cfg") == 0
    assert _sample(metrics, "lcmrt_generation_seconds_count", model="two") == 4
    assert _sample(metrics, "lcmrt_generation_seconds_sum", model="two") > 0
    assert _sample(metrics, "lcmrt_queue_depth") == 0


def test_bad_server_settings_are_refused(pipelines):
    for kwargs, fragment in (({"queue_size": 0}, "queue_size=0"), ({"timeout": 0}, "timeout=0"),
                             ({"api_key": ""}, "empty")):
        with pytest.raises(InputError, match=fragment):
            create_app(pipelines, **kwargs)
    with pytest.raises(InputError, match="at least one model"):
        create_app({})
