"""One contender, one process: import, load, a cold generation, then warm ones; writes a JSON result.

Run by `benchmarks/compare.py` as a script (`python benchmarks/worker.py CONFIG_JSON`), with the main venv's
python for lcmrt and diffusers, `benchmarks/.venv-optimum`'s for Optimum and `benchmarks/.venv-openvino`'s
for optimum-intel and OpenVINO GenAI, which have no lcmrt installed: so this file imports only the standard
library at the top.

Every contender returns the same records as `lcmrt.bench.time_generation`: {"e2e", "text_encoder",
"unet_steps": [...], "vae_decode", "unet_run": [...], "num_images"} in seconds.
How stages are timed outside lcmrt (hooks, in the pipeline's own call, output_type="np" for everyone):
  text_encoder  forward pre/post hooks on the text encoder, summed over its calls (two with guidance)
  unet_steps    from the UNet call's start to diffusers' `callback_on_step_end`, which runs right after the
                scheduler step: UNet + guidance + scheduler, what lcmrt's step also covers
  unet_run      the UNet call alone, so unet_steps - unet_run is the framework's overhead per step
  vae_decode    the VAE decode call
OpenVINO GenAI's pipeline runs in C++: its own performance metrics give the same stages (iteration durations
for unet_steps, UNet inference durations for unet_run).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def _record(e2e: float, timer: "_StageTimer", num_images: int) -> dict:
    return {"e2e": e2e, "text_encoder": sum(timer.text), "unet_steps": timer.steps, "vae_decode": sum(timer.vae),
            "unet_run": timer.unet, "num_images": num_images}


class _StageTimer:
    """Collects stage times of one diffusers-style pipeline call (see the module docstring)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.text, self.unet, self.steps, self.vae = [], [], [], []
        self._unet_start = self._text_start = None

    def text_start(self, *_):
        self._text_start = time.perf_counter()

    def text_end(self, *_):
        self.text.append(time.perf_counter() - self._text_start)

    def unet_start(self, *_):
        self._unet_start = time.perf_counter()

    def unet_end(self, *_):
        self.unet.append(time.perf_counter() - self._unet_start)

    def step_end(self, pipe, step, timestep, kwargs):
        self.steps.append(time.perf_counter() - self._unet_start)
        return kwargs

    def wrap(self, fn, sink: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:  # looked up per call: reset() replaces the lists
                getattr(self, sink).append(time.perf_counter() - start)
        return timed

    def wrap_around(self, fn, before, after):
        def timed(*args, **kwargs):
            before()
            try:
                return fn(*args, **kwargs)
            finally:
                after()
        return timed


def _generations(call, timer: _StageTimer, cfg: dict) -> tuple[dict, list[dict]]:
    """The cold generation (warm-up) and cfg["warm_runs"] warm ones."""
    def one(steps):
        timer.reset()
        start = time.perf_counter()
        call(steps)
        return _record(time.perf_counter() - start, timer, cfg["num_images"])

    # A warm-up with fewer steps warms the same kernels as the full schedule (eager frameworks capture nothing).
    first = one(cfg.get("warmup_steps") or cfg["steps"])
    return first, [one(cfg["steps"]) for _ in range(cfg["warm_runs"])]


def run_lcmrt(cfg: dict) -> dict:
    from lcmrt import bench

    import_s = time.perf_counter() - T_START
    raw = bench.measure(cfg["folder"], backend=cfg["backend"], steps=cfg["steps"], guidance=cfg["guidance"],
                        warm_runs=cfg["warm_runs"], num_images=cfg["num_images"], prompt=cfg["prompt"],
                        seed=cfg["seed"])
    return {"import_s": import_s, "load_s": raw["load_s"], "first": raw["first"], "warm": raw["warm"],
            "backend": raw["backend"]}


def _hook_torch_pipeline(pipe, timer: _StageTimer) -> None:
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    encoders[0].register_forward_pre_hook(timer.text_start)  # SDXL runs both, one after the other
    encoders[-1].register_forward_hook(timer.text_end)
    pipe.unet.register_forward_pre_hook(timer.unet_start)
    pipe.unet.register_forward_hook(timer.unet_end)
    pipe.vae.decode = timer.wrap(pipe.vae.decode, "vae")


def _diffusers_call(pipe, timer: _StageTimer, cfg: dict):
    """One generation of a diffusers-style pipeline (diffusers, Optimum, optimum-intel) at `steps`."""
    import torch

    def call(steps):
        with torch.inference_mode():
            pipe(cfg["prompt"], num_inference_steps=steps, guidance_scale=cfg["guidance"],
                 num_images_per_prompt=cfg["num_images"], generator=torch.Generator().manual_seed(cfg["seed"]),
                 output_type="np", callback_on_step_end=timer.step_end)
    return call


def run_diffusers(cfg: dict) -> dict:
    """The model with the LCM-LoRA already fused, saved by `prepare.py` with lcmrt's own verified fuse: the
    same weights as lcmrt's engine folder, loaded the way a diffusers user loads a merged model."""
    import torch
    from diffusers import DiffusionPipeline, LCMScheduler
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    import_s = time.perf_counter() - T_START
    start = time.perf_counter()
    # the folder's own pipeline class: StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL and SSD-1B
    sd15 = json.loads((Path(cfg["model"]) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = DiffusionPipeline.from_pretrained(cfg["model"], dtype=torch.float32,
                                             **({"safety_checker": None} if sd15 else {}))
    pipe.set_progress_bar_config(disable=True)
    if cfg["scheduler"] == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    load_s = time.perf_counter() - start
    timer = _StageTimer()
    _hook_torch_pipeline(pipe, timer)
    first, warm = _generations(_diffusers_call(pipe, timer, cfg), timer, cfg)
    return {"import_s": import_s, "load_s": load_s, "first": first, "warm": warm,
            "backend": f"torch {torch.__version__} eager, {torch.get_num_threads()} threads",
            "scheduler": type(pipe.scheduler).__name__}


def _wrap_exported_pipeline(pipe, timer: _StageTimer) -> None:
    """Optimum's and optimum-intel's models are not torch modules: wrap their forward calls instead of hooking."""
    pipe.text_encoder.forward = timer.wrap_around(pipe.text_encoder.forward, timer.text_start, timer.text_end)
    pipe.unet.forward = timer.wrap_around(pipe.unet.forward, timer.unet_start, timer.unet_end)
    pipe.vae_decoder.forward = timer.wrap(pipe.vae_decoder.forward, "vae")


def run_optimum(cfg: dict) -> dict:
    import onnxruntime
    from diffusers import LCMScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    import_s = time.perf_counter() - T_START
    start = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(cfg["export"], provider="CPUExecutionProvider")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    timer = _StageTimer()
    _wrap_exported_pipeline(pipe, timer)
    first, warm = _generations(_diffusers_call(pipe, timer, cfg), timer, cfg)
    return {"import_s": import_s, "load_s": load_s, "first": first, "warm": warm,
            "backend": f"optimum ORT {onnxruntime.__version__} CPUExecutionProvider"}


# Both OpenVINO contenders compile at fp32: OpenVINO's CPU plugin would run bf16 on CPUs that have it.
OV_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _static_unet_batch(pipe, cfg: dict) -> None:
    """optimum-intel's `reshape` gives the UNet twice the batch (classifier-free guidance) unless the UNet is
    LCM-distilled; a fused LCM-LoRA model unguided needs the batch itself, so set it on the UNet's inputs."""
    batch = cfg["num_images"] * (2 if cfg["guidance"] > 1 else 1)
    shapes = {}
    for port in pipe.unet.model.inputs:
        shape = port.get_partial_shape()
        if port.get_any_name() in ("sample", "encoder_hidden_states"):
            shape[0] = batch
        shapes[port] = shape
    pipe.unet.model.reshape(shapes)


def run_optimum_intel(cfg: dict) -> dict:
    """optimum-intel's pipeline on its own OpenVINO export, reshaped to static shapes before compiling (its
    documented fast path on CPUs) and compiled at fp32."""
    import openvino
    from diffusers import LCMScheduler
    from optimum.intel import OVDiffusionPipeline

    import_s = time.perf_counter() - T_START
    start = time.perf_counter()
    pipe = OVDiffusionPipeline.from_pretrained(cfg["export"], ov_config=OV_FP32, compile=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=cfg["height"], width=cfg["width"], num_images_per_prompt=cfg["num_images"])
    _static_unet_batch(pipe, cfg)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    timer = _StageTimer()
    _wrap_exported_pipeline(pipe, timer)
    first, warm = _generations(_diffusers_call(pipe, timer, cfg), timer, cfg)
    return {"import_s": import_s, "load_s": load_s, "first": first, "warm": warm,
            "backend": f"optimum-intel, OpenVINO {openvino.__version__.split('-')[0]} CPU, static shapes, fp32"}


def run_openvino_genai(cfg: dict) -> dict:
    """OpenVINO GenAI's C++ Text2ImagePipeline on optimum-intel's export, LCM scheduler, static shapes, fp32.
    Stage times come from its own performance metrics (the pipeline runs in C++: nothing to hook)."""
    import openvino_genai as genai

    import_s = time.perf_counter() - T_START
    start = time.perf_counter()
    export = Path(cfg["export"])
    pipe = genai.Text2ImagePipeline(str(export))
    pipe.set_scheduler(genai.Scheduler.from_config(str(export / "scheduler" / "scheduler_config.json"),
                                                   genai.Scheduler.Type.LCM))
    pipe.reshape(cfg["num_images"], cfg["height"], cfg["width"], cfg["guidance"])
    pipe.compile("CPU", **OV_FP32)
    load_s = time.perf_counter() - start

    def one(steps):
        start = time.perf_counter()
        pipe.generate(cfg["prompt"], num_inference_steps=steps, guidance_scale=cfg["guidance"],
                      num_images_per_prompt=cfg["num_images"], rng_seed=cfg["seed"])
        e2e = time.perf_counter() - start
        metrics = pipe.get_performance_metrics()
        raw = metrics.raw_metrics  # microseconds; the getters' durations are milliseconds
        return {"e2e": e2e, "text_encoder": sum(metrics.get_text_encoder_infer_duration().values()) / 1e3,
                "unet_steps": [d / 1e6 for d in raw.iteration_durations], "vae_decode":
                metrics.get_vae_decoder_infer_duration() / 1e3,
                "unet_run": [d / 1e6 for d in raw.unet_inference_durations], "num_images": cfg["num_images"]}

    first = one(cfg.get("warmup_steps") or cfg["steps"])
    warm = [one(cfg["steps"]) for _ in range(cfg["warm_runs"])]
    return {"import_s": import_s, "load_s": load_s, "first": first, "warm": warm,
            "backend": f"OpenVINO GenAI {genai.__version__.split('-')[0]} Text2ImagePipeline CPU, static shapes, fp32"}


RUNNERS = {"lcmrt": run_lcmrt, "diffusers": run_diffusers, "optimum": run_optimum,
           "optimum_intel": run_optimum_intel, "openvino_genai": run_openvino_genai}


def main():
    cfg = json.loads(sys.argv[1])
    result = RUNNERS[cfg["kind"]](cfg)
    Path(cfg["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
