"""The server's job queue: one bounded queue for the whole server, one worker thread per model.

A request becomes a `Job`; the worker of its model runs that model's jobs one at a time, in arrival order, in its
own thread, so the event loop stays free to answer other requests meanwhile. Right before a job whose adapter set
differs from the one in effect, the worker switches the pipeline's adapters (a refit). Admission is bounded: past
`queue_size` waiting jobs a request is refused (HTTP 429), and a job still waiting after `timeout` seconds is
answered HTTP 503 and never run. Cross-request batching and adapter-aware ordering are not built yet (issue 16).
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Callable

from ..pipeline import Pipeline
from .metrics import ServerMetrics

LATENCY_WINDOW = 32  # recent jobs whose run time estimates Retry-After and progress
FIRST_RETRY_AFTER_S = 1  # before any job has finished there is no latency to go by


class QueueFull(Exception):
    """The server's queue holds `queue_size` waiting jobs already."""

    def __init__(self, queue_size: int, retry_after: int):
        super().__init__(f"The server's queue is full ({queue_size} requests waiting). Retry after {retry_after} s, "
                         "or start the server with a larger --queue-size.")
        self.retry_after = retry_after


class JobExpired(Exception):
    """A job waited in the queue longer than the server's timeout; it was not run."""

    def __init__(self, timeout: float):
        super().__init__(f"The request waited {timeout:g} s in the queue without starting (the server's --timeout), "
                         "so it was dropped unrun. Retry later, or start the server with a longer --timeout.")


@dataclass(eq=False)
class Job:
    """One request's work for one model: `work(pipe)` runs in the model's worker thread with `adapters` in effect."""
    model: str
    adapters: dict[str, float]  # every refittable adapter of the model: its weight (0 = off)
    images: int
    work: Callable[[Pipeline], object]
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    state: str = "waiting"  # -> "running" (a worker took it) or "expired" (never run)
    future: Future = field(default_factory=Future)


class Scheduler:
    """The queue and the workers of one server. `start()` before the first job, `stop()` at shutdown."""

    def __init__(self, pipelines: dict[str, Pipeline], queue_size: int, timeout: float, metrics: ServerMetrics):
        self.pipelines = pipelines
        self.queue_size = queue_size
        self.timeout = timeout
        self._metrics = metrics
        self._queues = {name: SimpleQueue() for name in pipelines}
        self._lock = threading.Lock()  # guards the counts below and every job's state
        self._waiting = 0
        self._running: dict[str, Job] = {}
        self._run_seconds: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._threads: list[threading.Thread] = []

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker (not counting those running)."""
        return self._waiting

    def start(self) -> None:
        for name, pipe in self.pipelines.items():
            thread = threading.Thread(target=self._work, args=(name, pipe), name=f"lcmrt-worker-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Let each worker finish the jobs queued before this call, then end it."""
        for jobs in self._queues.values():
            jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    async def run(self, model: str, adapters: dict[str, float], images: int, work: Callable[[Pipeline], object]):
        """Queue `work` for `model` and return its result; QueueFull when the queue is full, JobExpired when it has
        not started within the timeout. Errors raised by `work` are raised here."""
        job = self._submit(Job(model, adapters, images, work))
        result = asyncio.wrap_future(job.future)
        done, _ = await asyncio.wait({result}, timeout=self.timeout)
        if not done and self._expire(job):
            raise JobExpired(self.timeout)
        return await result

    def progress(self) -> dict:
        """What runs and waits now: {"waiting": n, "running": [(model, seconds it has run)], "mean_run_s": s}."""
        now = time.monotonic()
        with self._lock:
            running = [(job.model, now - job.started) for job in self._running.values()]
            return {"waiting": self._waiting, "running": running, "mean_run_s": self._mean_run_s()}

    def _submit(self, job: Job) -> Job:
        with self._lock:
            if self._waiting >= self.queue_size:
                mean = self._mean_run_s()
                # a slot frees when a running job ends: about one mean run from now
                raise QueueFull(self.queue_size, FIRST_RETRY_AFTER_S if mean is None else max(1, math.ceil(mean)))
            self._waiting += 1
            self._metrics.queue_depth.set(self._waiting)
        self._queues[job.model].put(job)
        return job

    def _mean_run_s(self) -> float | None:
        """The mean run time of the recent jobs (the caller holds the lock); None before the first."""
        return sum(self._run_seconds) / len(self._run_seconds) if self._run_seconds else None

    def _expire(self, job: Job) -> bool:
        """Take a waiting job out of the count: True if it was waiting (it will never run), False if it runs."""
        with self._lock:
            if job.state != "waiting":
                return False
            job.state = "expired"
            self._waiting -= 1
            self._metrics.queue_depth.set(self._waiting)
            return True

    def _begin(self, job: Job) -> bool:
        """Mark a dequeued job running, unless its request expired it or it has waited past the timeout."""
        now = time.monotonic()
        with self._lock:
            if job.state != "waiting":
                return False
            self._waiting -= 1
            self._metrics.queue_depth.set(self._waiting)
            if now - job.enqueued > self.timeout:
                job.state = "expired"
                job.future.set_exception(JobExpired(self.timeout))
                return False
            job.state, job.started = "running", now
            self._running[job.model] = job
            return True

    def _work(self, name: str, pipe: Pipeline) -> None:
        while (job := self._queues[name].get()) is not None:
            if not self._begin(job):
                continue
            try:
                if any(pipe.adapters.get(adapter, 0.0) != weight for adapter, weight in job.adapters.items()):
                    pipe.set_adapters(job.adapters)
                    self._metrics.adapter_swaps.labels(name).inc()
                start = time.perf_counter()
                result = job.work(pipe)
                seconds = time.perf_counter() - start
            except Exception as e:  # the request answers it: a bad request's 422, a failure's 500
                job.future.set_exception(e)
            else:
                self._metrics.generation_seconds.labels(name).observe(seconds)
                self._metrics.images.labels(name).inc(job.images)
                with self._lock:
                    self._run_seconds.append(seconds)
                job.future.set_result(result)
            finally:
                with self._lock:
                    del self._running[name]
