"""One Pipeline shared by threads (lcmrt/pipeline.py, README "Threading"): generations run concurrently and
give the single-threaded images; set_adapters waits for running generations and applies to the ones that
start after it; the prompt cache never serves an embedding of another adapter set; last_seed and
last_timings are per thread; GPU sessions with fixed device buffers run one call at a time (CPU stand-in).

Interleavings are forced, not hoped for: a wrapped session run pauses one thread at a chosen point until the
other thread has either finished its call or is blocked waiting for a lock (`_blocked_or_done`)."""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from lcmrt import Pipeline
from lcmrt.manifest import read_manifest

from tiny_engines import STYLE_WEIGHT  # noqa: E402

PROMPT = "a paper cut fox in the snow"
# cfg: the negative prompt goes through the text encoder too; four UNet steps to swap in the middle of
CALL = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=1.5, seed=3, output="np")
TIMEOUT = 60  # seconds; only a deadlock comes near it
SWAPS = 300  # set_adapters calls racing with encode_prompt; the unguarded cache failed ~3 times per 100


class Worker(threading.Thread):
    """A thread that keeps its call's result or exception; `result()` joins and re-raises."""

    def __init__(self, target, *args, **kwargs):
        super().__init__(daemon=True)
        self.call = (target, args, kwargs)
        self.done = threading.Event()
        self.value = self.error = None

    def run(self):
        target, args, kwargs = self.call
        try:
            self.value = target(*args, **kwargs)
        except BaseException as e:  # re-raised in the test's thread by result()
            self.error = e
        finally:
            self.done.set()

    def result(self):
        self.join(TIMEOUT)
        assert not self.is_alive(), f"{self.name} did not finish in {TIMEOUT} s (deadlock?)"
        if self.error is not None:
            raise self.error
        return self.value


def _blocked_or_done(worker: Worker, waiting: threading.Event | None = None) -> None:
    """Return once `worker` has finished its call, or is blocked in a threading wait (a condition variable
    held by another thread), or has set `waiting`."""
    deadline = time.monotonic() + TIMEOUT
    while not worker.done.is_set() and not (waiting is not None and waiting.is_set()):
        frame = sys._current_frames().get(worker.ident)
        if frame is not None and frame.f_code.co_filename == threading.__file__ and frame.f_code.co_name == "wait":
            return
        assert time.monotonic() < deadline, f"{worker.name} neither finished nor blocked"
        time.sleep(0.001)


def _pause_in(session, monkeypatch, thread, at_call: int, pause, after: bool = False):
    """Make `session.run` call `pause()` on its `at_call`-th run (1-based) in `thread`: before the run, or
    after it with `after`."""
    original, calls = session.run, []

    def run(feeds):
        mine = threading.current_thread() is thread
        if mine:
            calls.append(1)
        if mine and len(calls) == at_call and not after:
            pause()
        out = original(feeds)
        if mine and len(calls) == at_call and after:
            pause()
        return out

    monkeypatch.setattr(session, "run", run)
    return original


def _swap_when(ready: threading.Event, calling: threading.Event, pipe, adapters):
    assert ready.wait(TIMEOUT)
    calling.set()
    pipe.set_adapters(adapters)


@pytest.fixture(scope="module")
def references(tiny_refit_engine):
    """Single-threaded images of CALL with the style adapter off and at STYLE_WEIGHT."""
    pipe = Pipeline.load(tiny_refit_engine, adapters={"style": 0.0})
    off = pipe(PROMPT, **CALL)
    pipe.set_adapters({"style": STYLE_WEIGHT})
    on = pipe(PROMPT, **CALL)
    assert np.abs(on - off).max() > 1e-3
    return {0.0: off, STYLE_WEIGHT: on}


@pytest.fixture
def pipe(tiny_refit_engine):
    """The refittable tiny folder (read-only: loading does not write to it) with the style adapter off."""
    return Pipeline.load(tiny_refit_engine, adapters={"style": 0.0})


def _which(image, references):
    """The adapter weight whose reference image this is, bit for bit, or None for an image of neither set."""
    return next((w for w, ref in references.items() if np.array_equal(image, ref)), None)


def test_set_adapters_waits_for_a_running_generation(pipe, references, monkeypatch):
    """set_adapters is called while a generation is at its third of four UNet steps: it waits, the running
    generation ends with the set it started with, and the next one runs with the new set."""
    at_step, calling = threading.Event(), threading.Event()
    generator = Worker(pipe, PROMPT, **CALL)
    swapper = Worker(_swap_when, at_step, calling, pipe, {"style": STYLE_WEIGHT})

    def pause():
        at_step.set()
        assert calling.wait(TIMEOUT)
        _blocked_or_done(swapper)

    _pause_in(pipe.sessions["unet"], monkeypatch, generator, 3, pause)
    generator.start(), swapper.start()
    image = generator.result()
    swapper.result()
    assert _which(image, references) == 0.0, (
        f"the generation running during the swap gave the image of {_which(image, references)} "
        f"(None: a mix of both sets; max diff to the style-off image {np.abs(image - references[0.0]).max():.3g})")
    assert pipe.adapters["style"] == STYLE_WEIGHT
    assert _which(pipe(PROMPT, **CALL), references) == STYLE_WEIGHT


def test_every_image_is_of_one_adapter_set_while_swapping(pipe, references):
    """A thread swaps the adapters back and forth as fast as it can while another generates: each image is
    one of the two sets' images, bit for bit."""
    stop = threading.Event()

    def swap():
        swaps = 0
        while not stop.is_set() and swaps < 500:
            pipe.set_adapters({"style": STYLE_WEIGHT if swaps % 2 == 0 else 0.0})
            swaps += 1
        return swaps

    def generate():
        try:
            return [pipe(PROMPT, **CALL) for _ in range(4)]
        finally:
            stop.set()

    generator, swapper = Worker(generate), Worker(swap)
    generator.start(), swapper.start()
    images = generator.result()
    assert swapper.result() > 0
    assert [_which(image, references) is not None for image in images] == [True] * len(images)


def test_prompt_cache_after_a_swap_racing_with_encode(pipe, monkeypatch):
    """encode_prompt has run the text encoder with the old weights when set_adapters is called: the cache
    must not keep that embedding for the new set (every later call would use it)."""
    encoded, calling = threading.Event(), threading.Event()
    encoder = Worker(pipe.encode_prompt, PROMPT)
    swapper = Worker(_swap_when, encoded, calling, pipe, {"style": STYLE_WEIGHT})

    def pause():
        encoded.set()
        assert calling.wait(TIMEOUT)
        _blocked_or_done(swapper)

    text_encoder = pipe.sessions["text_encoder"]
    run = _pause_in(text_encoder, monkeypatch, encoder, 1, pause, after=True)
    encoder.start(), swapper.start()
    before = encoder.result()["encoder_hidden_states"]
    swapper.result()
    fresh = run({"input_ids": pipe.tokenizer(PROMPT)})["last_hidden_state"]  # the new set, no cache
    assert not np.array_equal(before, fresh)  # the style adapter changes the text encoder
    np.testing.assert_array_equal(pipe.encode_prompt(PROMPT)["encoder_hidden_states"], fresh)


def test_encode_prompt_racing_with_set_adapters(pipe):
    """Two threads encode a few prompts (mostly cache hits) as fast as they can while a third swaps adapters:
    no KeyError from the cache's bookkeeping, and afterwards the cache serves the active set's embeddings."""
    prompts = ["a fox", "a cat", "a lighthouse"]
    swapped, encodes = threading.Event(), [0, 0]

    def encode(n):
        while not swapped.is_set():
            for p in prompts:
                pipe.encode_prompt(p)
                encodes[n] += 1

    def swap():
        try:
            for i in range(SWAPS):
                pipe.set_adapters({"style": STYLE_WEIGHT if i % 2 == 0 else 0.0})
                seen, deadline = list(encodes), time.monotonic() + TIMEOUT
                while encodes == seen and time.monotonic() < deadline:  # a swap waits for no one: let them in
                    time.sleep(0)
        finally:
            swapped.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up in fewer iterations
    try:
        workers = [Worker(encode, 0), Worker(encode, 1), Worker(swap)]
        for w in workers:
            w.start()
        for w in workers:
            w.result()
    finally:
        sys.setswitchinterval(interval)
    assert sum(encodes) >= SWAPS  # the encoders ran between the swaps
    run = pipe.sessions["text_encoder"].run
    for p in prompts:
        np.testing.assert_array_equal(pipe.encode_prompt(p)["encoder_hidden_states"], run({"input_ids": pipe.tokenizer(p)})["last_hidden_state"])


def test_generations_run_concurrently_with_per_thread_results(tiny_engine, monkeypatch):
    """One thread pauses in its VAE decode until a second thread has run a whole generation (so generations
    are not serialized); each thread sees its own last_seed and last_timings, and the images are the
    single-threaded ones."""
    pipe = Pipeline.load(tiny_engine)
    assert pipe.last_seed is None and pipe.last_timings == {}
    calls = {"a": dict(num_inference_steps=2, seed=1), "b": dict(num_inference_steps=3, seed=2)}
    expected = {name: pipe(PROMPT, output="np", **call) for name, call in calls.items()}
    assert pipe.last_seed == 2 and len(pipe.last_timings["unet_steps"]) == 3  # this thread's last call: b's

    def generate(name):
        image = pipe(PROMPT, output="np", **calls[name])
        return image, pipe.last_seed, len(pipe.last_timings["unet_steps"])

    in_vae = threading.Event()
    a, b = Worker(generate, "a"), Worker(generate, "b")

    def pause():
        in_vae.set()
        _blocked_or_done(b)
        assert b.done.is_set(), "b waited for a's generation to end: generations are serialized"

    _pause_in(pipe.sessions["vae_decoder"], monkeypatch, a, 1, pause)
    a.start()
    assert in_vae.wait(TIMEOUT)
    b.start()
    for name, worker in (("a", a), ("b", b)):
        image, seed, steps = worker.result()
        np.testing.assert_array_equal(image, expected[name])
        assert (seed, steps) == (calls[name]["seed"], calls[name]["num_inference_steps"]), name
    assert pipe.last_seed == 2 and len(pipe.last_timings["unet_steps"]) == 3  # untouched by the other threads


# --- GPU sessions: fixed device buffers, one run at a time ---------------------------------------------


class _SpyLock:
    """Stands in for a session's run lock: sets `waiting` when `thread` is about to take it."""

    def __init__(self):
        self.lock, self.waiting, self.thread = threading.Lock(), threading.Event(), None

    def __enter__(self):
        if threading.current_thread() is self.thread:
            self.waiting.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _assert_runs_do_not_mix(session, monkeypatch, holder, method: str):
    """Thread a pauses inside a run (in `holder.method`, after its inputs are in the device buffers)
    until thread b has finished a run of other inputs or waits for the session's lock; a's outputs must be
    those of its own inputs."""
    rng = np.random.default_rng(0)
    feeds = [{name: rng.standard_normal([d if isinstance(d, int) else 1 for d in spec.shape]).astype(spec.dtype)
              for name, spec in session.inputs.items()} for _ in range(2)]
    expected = [session.run(f) for f in feeds]
    spy = _SpyLock()
    monkeypatch.setattr(session, "_run_lock", spy, raising=False)
    a, b = Worker(session.run, feeds[0]), Worker(session.run, feeds[1])
    spy.thread = b
    inside = threading.Event()
    original = getattr(holder, method)

    def paused(*args, **kwargs):
        if threading.current_thread() is a:
            inside.set()
            _blocked_or_done(b, spy.waiting)
        return original(*args, **kwargs)

    monkeypatch.setattr(holder, method, paused)
    a.start()
    assert inside.wait(TIMEOUT)
    b.start()
    for worker, want in ((a, expected[0]), (b, expected[1])):
        got = worker.result()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{worker.name}: {name}")


def test_tensorrt_session_runs_one_at_a_time(gpu_standin_modules, trt_engine_folder, monkeypatch):
    from lcmrt.backends.tensorrt import TensorRTBackend

    vae = TensorRTBackend().load(trt_engine_folder, read_manifest(trt_engine_folder), "vae_decoder")
    _assert_runs_do_not_mix(vae, monkeypatch, vae, "execute")


def test_onnxruntime_cuda_session_runs_one_at_a_time(ort_cuda_standin, tiny_engine, monkeypatch):
    from lcmrt.backends.onnxruntime import OnnxRuntimeBackend

    vae = OnnxRuntimeBackend("cuda").load(tiny_engine, read_manifest(tiny_engine), "vae_decoder")
    assert vae._binding is not None
    _assert_runs_do_not_mix(vae, monkeypatch, vae._session, "run_with_iobinding")
