"""A running `lcmrt serve` app for the server tests: uvicorn in a thread on 127.0.0.1 (port 0: a free one), talked to
over the loopback with http.client, and always shut down."""
from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import uvicorn
from PIL import Image

from lcmrt import Pipeline
from lcmrt.server import create_app

START_TIMEOUT_S = 30


class Client:
    """JSON over HTTP to one server; every call returns (status, headers, body: parsed JSON, else text)."""

    def __init__(self, port: int, api_key: str | None = None):
        self.port = port
        self.api_key = api_key

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.api_key is not None:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        if body is not None:
            raw = json.dumps(body).encode()
        if raw is not None:
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=raw, headers=headers)
            response = connection.getresponse()
            data = response.read().decode()
            try:
                data = json.loads(data)
            except ValueError:
                pass
            return response.status, dict(response.getheaders()), data
        finally:
            connection.close()

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body=None, **kwargs):
        return self.request("POST", path, body, **kwargs)


@contextmanager
def running(app, api_key: str | None = None):
    """Serve `app` on a free loopback port for the duration of the block."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Client(port, api_key)
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
        assert not thread.is_alive(), "uvicorn did not shut down"


def png_pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def cfg_pipe(tiny_engine):
    """The server's pipeline of the fused tiny folder (model name: its folder's, "tiny-cfg")."""
    return Pipeline.load(tiny_engine)


@pytest.fixture(scope="module")
def adapter_pipe(two_adapter_folder):
    """The server's pipeline of the refittable folder (adapters style 0.8 by default, style2, lcm2)."""
    return Pipeline.load(two_adapter_folder)


@pytest.fixture(scope="module")
def reference_adapter_pipe(two_adapter_folder):
    """Another pipeline of the refittable folder, for the images the server's must equal."""
    return Pipeline.load(two_adapter_folder)


@pytest.fixture(scope="module")
def pipelines(tiny_engine, cfg_pipe, two_adapter_folder, adapter_pipe):
    return {tiny_engine.name: cfg_pipe, two_adapter_folder.name: adapter_pipe}


@pytest.fixture(scope="module")
def client(pipelines):
    """One server for the tests that do not need their own: both folders, the fused one the default model."""
    with running(create_app(pipelines)) as client:
        yield client
