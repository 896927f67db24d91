"""The bounded queue of lcmrt/server/scheduler.py: 429 with Retry-After when full, 503 for a request that waited past
the timeout (and is never run). A generation is held on an Event, so the queue's state is known at each step."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import running

from lcmrt.server import create_app, lcmrt_api
from lcmrt.server import scheduler as scheduler_module
from lcmrt.server.metrics import ServerMetrics
from lcmrt.server.scheduler import QueueFull, Scheduler

WAIT_S = 30  # the most a step may take before the test fails


class Gate:
    """Replaces /v1/images' render: records each prompt it runs; the prompt "hold" waits until `release`."""

    def __init__(self, render):
        self._render = render
        self.rendered: list[str] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, pipe, generation, *args):
        self.rendered.append(generation.prompt)
        if generation.prompt == "hold":
            self.holding.set()
            assert self.release.wait(WAIT_S)
        return self._render(pipe, generation, *args)


@pytest.fixture
def gate(monkeypatch):
    gate = Gate(lcmrt_api.render)
    monkeypatch.setattr(lcmrt_api, "render", gate)
    yield gate
    gate.release.set()  # a failing test must not leave a worker blocked at shutdown


def _wait_until(condition):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_answers_429_with_retry_after(pipelines, gate):
    with running(create_app(pipelines, queue_size=1)) as client, ThreadPoolExecutor(2) as pool:
        held = pool.submit(client.post, "/v1/images", {"prompt": "hold", "seed": 1})
        assert gate.holding.wait(WAIT_S)  # running: the queue is empty
        queued = pool.submit(client.post, "/v1/images", {"prompt": "queued", "seed": 1})
        _wait_until(lambda: client.get("/health")[2]["queue_depth"] == 1)
        status, headers, body = client.post("/v1/images", {"prompt": "refused", "seed": 1})
        assert status == 429
        assert headers["retry-after"] == "1"  # no job has finished yet to measure
        assert "--queue-size" in body["detail"]
        # the other model shares the server's queue
        assert client.post("/v1/images", {"prompt": "refused too", "model": "two"})[0] == 429
        gate.release.set()
        assert held.result(WAIT_S)[0] == queued.result(WAIT_S)[0] == 200
        assert client.post("/v1/images", {"prompt": "accepted", "seed": 1})[0] == 200
    assert gate.rendered == ["hold", "queued", "accepted"]


def test_a_request_waiting_past_the_timeout_is_503_and_never_runs(pipelines, gate):
    timeout = 0.3
    with running(create_app(pipelines, timeout=timeout)) as client, ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, "/v1/images", {"prompt": "hold", "seed": 1})
        assert gate.holding.wait(WAIT_S)
        start = time.monotonic()
        status, _, body = client.post("/v1/images", {"prompt": "too late", "seed": 1})
        assert status == 503 and "--timeout" in body["detail"]
        assert timeout <= time.monotonic() - start < WAIT_S
        assert client.get("/health")[2]["queue_depth"] == 0
        gate.release.set()
        assert held.result(WAIT_S)[0] == 200
        # the worker reaches the expired job before this one, and skips it
        assert client.post("/v1/images", {"prompt": "after", "seed": 1})[0] == 200
    assert gate.rendered == ["hold", "after"]


class _Idle:
    adapters: dict = {}


def test_retry_after_is_the_mean_run_time_rounded_up(monkeypatch):
    ticks = iter([0.0, 2.2, 10.0, 12.6])  # two jobs that ran 2.2 s and 2.6 s
    monkeypatch.setattr(scheduler_module.time, "perf_counter", lambda: next(ticks))
    scheduler = Scheduler({"m": _Idle()}, queue_size=1, timeout=WAIT_S, metrics=ServerMetrics(["m"]))

    async def scenario():
        for _ in range(2):
            await scheduler.run("m", {}, 1, lambda pipe: None)
        scheduler.stop()  # no worker from here on: the next job stays queued
        queued = asyncio.ensure_future(scheduler.run("m", {}, 1, lambda pipe: None))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await scheduler.run("m", {}, 1, lambda pipe: None)
        queued.cancel()
        return refused.value.retry_after

    scheduler.start()
    assert asyncio.run(scenario()) == 3  # ceil of the mean, 2.4 s
