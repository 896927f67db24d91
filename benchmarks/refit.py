"""Adapter swap by refit against a fused folder and against diffusers, on the same weights in one run.

    python -m benchmarks.refit --fused results/full/style-fused --refit results/full/style-refit \
        --model results/full/sd15/model --lcm-lora results/full/sd15/lcm-lora.safetensors \
        --lora results/full/sd15/style-r64.safetensors [--repeats 3] [--json results/refit.json] \
        [--contenders fused,refit-background,refit-factors] [--no-diffusers]

Measures, for a folder built with `--refittable` (style adapter at 0.8) and one with the same style fused:
swap latency of `set_adapters` in each ONNX Runtime refit mode (split into computing the weights and
applying them), the steady-state UNet step of each (rounds reloading each contender in turn, medians),
the outputs' difference, peak RSS of a process holding each folder (separate processes), and diffusers'
own `load_lora_weights + set_adapters + fuse_lora` for the same swap. For refit="background": the seconds
until the session with the weights baked in takes over (after the load, after each swap) and the UNet steps
run meanwhile, which share the 2 cores with that build. refit="factors" likewise, its swap binding low-rank
factors to the refit-factors graph (`lcmrt build --engines-only FOLDER` adds it to an older folder); its
"compute_s" is building those factors. `--contenders` picks the contenders ("fused" always runs: the
reference); peak RSS is measured for those picked.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.refit_strategies import unet_feeds

SWAPS = (0.5, 0.8, 0.0, 0.8)
CONTENDERS = ("fused", "refit-inputs", "refit-session", "refit-background", "refit-factors")


def _load(name: str, fused_dir: str, refit_dir: str):
    """(UNet session, pipeline or None) of one contender: the fused folder's UNet alone, or the refit
    folder's whole pipeline in a refit mode (it applies the built weight, 0.8, while loading)."""
    import lcmrt
    from lcmrt.backends import get_backend
    from lcmrt.manifest import read_manifest

    if name == "fused":
        return get_backend("onnxruntime").load(Path(fused_dir), read_manifest(fused_dir), "unet"), None
    pipe = lcmrt.Pipeline.load(refit_dir, refit=name.removeprefix("refit-"))
    return pipe.sessions["unet"], pipe


def compare_folders(fused_dir: str, refit_dir: str, repeats: int, rounds: int = 2,
                    contenders=CONTENDERS) -> dict:
    """UNet step of the fused folder and of the refit folder in each refit mode, in rounds that reload each
    in turn (holding two full-size folders at once needs ~16 GB), then swap timings per mode."""
    import gc

    from lcmrt.manifest import read_manifest

    feeds = unet_feeds(read_manifest(fused_dir))
    times = {name: [] for name in contenders}
    load_s = {name: [] for name in contenders}
    settle_s = {name: [] for name in contenders}
    outputs, swaps = {}, {}
    for round_index in range(rounds):
        for name in contenders:
            gc.collect()
            start = time.perf_counter()
            unet, pipe = _load(name, fused_dir, refit_dir)
            load_s[name].append(time.perf_counter() - start)
            if pipe is not None:  # refit="background": until the baked-in session takes over
                pipe.settle()
                settle_s[name].append(time.perf_counter() - start)
            unet.run(feeds)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                outputs[name] = unet.run(feeds)["noise_pred"]
                times[name].append(time.perf_counter() - start)
            if pipe is not None and round_index == rounds - 1:
                swaps[name] = _swaps(pipe, feeds, outputs[name])
            del unet, pipe
    step = {name: statistics.median(t) for name, t in times.items()}
    return {
        "load_s": load_s, "load_until_settled_s": settle_s, "unet_step_s": step, "unet_step_runs_s": times,
        "step_vs_fused": {name: step[name] / step["fused"] for name in contenders},
        "max_abs_diff_vs_fused": {name: float(np.abs(outputs[name] - outputs["fused"]).max()) for name in contenders},
        "swaps": swaps,
    }


def _swaps(pipe, feeds, output_at_08) -> dict:
    """set_adapters through SWAPS, split into computing the weights and applying them."""
    runs = []
    unet = pipe.sessions["unet"]
    for weight in SWAPS:
        start = time.perf_counter()
        if unet.factor_inputs:
            pipe._bank.factors_for({"style": weight}, "unet", unet.factor_inputs)
        else:
            pipe._bank.weights_for(pipe._active, {"style": weight})
        compute = time.perf_counter() - start
        start = time.perf_counter()
        pipe.set_adapters({"style": weight})
        swapped = time.perf_counter()
        steps_meanwhile = []  # refit="background"/"factors": UNet steps while the baked-in session is being built
        while not pipe.settle(timeout=0):
            step_start = time.perf_counter()
            pipe.sessions["unet"].run(feeds)
            steps_meanwhile.append(time.perf_counter() - step_start)
        runs.append({"weight": weight, "compute_s": compute, "total_s": swapped - start,
                     "settled_s": time.perf_counter() - start, "steps_meanwhile_s": steps_meanwhile})
    back = pipe.sessions["unet"].run(feeds)["noise_pred"]
    return {"runs": runs, "median_s": statistics.median(r["total_s"] for r in runs),
            "back_to_0.8_bitwise": bool(np.array_equal(back, output_at_08))}


def peak_rss_gb(folder: str, swap: bool = False, **load_options) -> float:
    """Peak RSS (VmHWM) of a fresh process that loads `folder` with `load_options` (`Pipeline.load`'s), runs
    one UNet step and optionally one swap (each waiting for a background build to finish). VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss over fork
    and exec."""
    code = ("import json, sys, lcmrt; from benchmarks.refit_strategies import unet_feeds; "
            "p = lcmrt.Pipeline.load(sys.argv[1], **json.loads(sys.argv[2])); p.settle(); "
            "p.sessions['unet'].run(unet_feeds(p.manifest)); "
            "sys.argv[3] == '1' and (p.set_adapters({'style': 0.5}), p.settle()); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    out = subprocess.run([sys.executable, "-c", code, folder, json.dumps(load_options), "1" if swap else "0"],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 2**20


def diffusers_swap(model: str, lcm_lora: str, lora: str) -> dict:
    """diffusers' own way to the same states: LCM fused, then the style LoRA loaded and fused at 0.8, then
    re-fused at 0.5 (unfuse + set_adapters + fuse)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.load_lora_weights(lcm_lora, adapter_name="lcm")
    pipe.fuse_lora(adapter_names=["lcm"])
    pipe.unload_lora_weights()
    start = time.perf_counter()
    pipe.load_lora_weights(lora, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    pipe.fuse_lora(adapter_names=["style"])
    first = time.perf_counter() - start
    start = time.perf_counter()
    pipe.unfuse_lora()
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    pipe.fuse_lora(adapter_names=["style"])
    reweight = time.perf_counter() - start
    return {"load_set_fuse_s": first, "unfuse_set_fuse_s": reweight}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", required=True)
    parser.add_argument("--refit", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lcm-lora", required=True)
    parser.add_argument("--lora", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated, of {', '.join(CONTENDERS)}")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' own swap")
    args = parser.parse_args()
    contenders = ("fused", *[c for c in args.contenders.split(",") if c != "fused"])
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {', '.join(sorted(unknown))}; choose from {', '.join(CONTENDERS)}")

    # peak RSS first, while this process is small
    result = {"peak_rss_gb": {"fused": peak_rss_gb(args.fused, backend="onnxruntime"),  # the UNet compare_folders times
                              **{f"{name}{' + swap' if swap else ''}":
                                 peak_rss_gb(args.refit, swap, refit=name.removeprefix("refit-"))
                                 for name in contenders[1:] for swap in (False, True)}}}
    result["folders"] = compare_folders(args.fused, args.refit, args.repeats, contenders=contenders)
    if not args.no_diffusers:
        result["diffusers"] = diffusers_swap(args.model, args.lcm_lora, args.lora)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
