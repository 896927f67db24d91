"""img2img latency and real-time stream throughput: lcmrt against diffusers, and the stream against img2img per
frame, on the same random weights with the same fused LCM-LoRA, fp32 on the CPU.

    python -m benchmarks.img2img_stream --size full            # SD1.5 at 512x512: ~10 minutes to prepare once
    python -m benchmarks.img2img_stream --size tiny --rounds 1 --frames 4     # seconds; what CI runs

Contenders (each round runs every one in a fresh child process, in rotating order; a child loads, warms up
with one frame, then times `--frames` frames of a moving test image):

| contender | what runs |
|---|---|
| `lcmrt/img2img`, `lcmrt/img2img-tiny` | `pipe(prompt, image=frame, strength=...)` per frame, with the VAE / the tiny VAE |
| `lcmrt/stream`, `lcmrt/stream-tiny` | `pipe.stream(...)`: one staggered UNet call (batch m) per frame |
| `diffusers/img2img`, `diffusers/img2img-tiny` | diffusers' StableDiffusionImg2ImgPipeline + LCMScheduler (with `vae=AutoencoderTiny`) |

Per contender: seconds per frame (median over the timed frames of every round; for a stream, the pushes once
its batch is full), frames per second, load seconds and the child's peak RSS. Ratios are per round, on the same
machine: the stream's frames/s over img2img's with the same VAE, and lcmrt img2img's speed-up over diffusers'.
Writes RESULTS/img2img_stream.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT = "a lighthouse on a cliff at sunset, oil painting"
CONTENDERS = ("lcmrt/img2img", "lcmrt/img2img-tiny", "lcmrt/stream", "lcmrt/stream-tiny", "diffusers/img2img",
              "diffusers/img2img-tiny")


def frame(k: int, height: int, width: int) -> np.ndarray:
    """Frame k of a camera-like test clip: a textured gradient panning 4 pixels per frame, uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1)
    rgb += 0.1 * np.random.default_rng(0).standard_normal((height, width, 3))
    return (np.clip(np.roll(rgb, 4 * k, axis=1), 0, 1) * 255).astype(np.uint8)


# --- preparation (parent) -----------------------------------------------------------------------------------

def prepare(workdir: Path, size: str, height: int, width: int, stream_batch: int, log) -> dict[str, Path]:
    """The random model with its tiny VAE, the lcmrt engine folder (stream batch, tiny VAE) and the model with
    the LCM-LoRA fused as a diffusers folder; each reused when present."""
    model_dir, folder, fused = workdir / "model", workdir / "engine", workdir / "fused-diffusers"
    py = sys.executable
    if not (model_dir / "taesd").is_dir():
        log(f"writing the random {size} SD1.5 model with a tiny VAE to {model_dir}")
        subprocess.run([py, "-m", "lcmrt", "random-model", str(model_dir), "--size", size, "--taesd", "--overwrite"],
                       check=True)
    if not (folder / "manifest.json").is_file():
        log(f"building {folder} (stream batch {stream_batch}, tiny VAE)")
        subprocess.run([py, "-m", "lcmrt", "build", str(model_dir / "model"), "--lcm-lora",
                        str(model_dir / "lcm-lora.safetensors"), "--size", f"{width}x{height}", "--stream-batch",
                        str(stream_batch), "--tiny-vae", str(model_dir / "taesd"), "--out", str(folder),
                        "--overwrite", "--quiet"], check=True)
    if not fused.is_dir():
        log(f"saving the LCM-fused model for diffusers to {fused}")
        subprocess.run([py, "-m", "benchmarks.prepare", "fused-diffusers", str(model_dir / "model"),
                        str(model_dir / "lcm-lora.safetensors"), str(fused)], check=True, cwd=HERE.parent)
    return {"folder": folder, "fused": fused, "taesd": model_dir / "taesd"}


# --- one contender (child) ------------------------------------------------------------------------------------

def run_contender(name: str, paths: dict, frames: int, steps: int, strength: float) -> dict:
    """Load, warm up with one frame, time `frames` frames; seconds per frame and the process's peak RSS."""
    start = time.perf_counter()
    kind, variant = name.split("/")
    tiny = variant.endswith("-tiny")
    if kind == "lcmrt":
        from lcmrt import Pipeline

        pipe = Pipeline.load(paths["folder"])
        height, width = pipe.shapes.height, pipe.shapes.width
        if variant.startswith("stream"):
            step = _lcmrt_stream(pipe, tiny, steps, strength)
        else:
            def step(image):
                return pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, seed=0,
                            tiny_vae=tiny, output="np")
    else:
        step, height, width = _diffusers_img2img(paths, tiny, steps, strength)
    load_s = time.perf_counter() - start
    clip = [frame(k, height, width) for k in range(frames + 1)]
    step(clip[0])  # warm-up (a stream's batch starts to fill)
    seconds = []
    for image in clip[1:]:
        t = time.perf_counter()
        step(image)
        seconds.append(time.perf_counter() - t)
    if kind == "lcmrt" and variant.startswith("stream"):
        # pushes 2 .. m - 1 of a batch of m still fill it (no decode): time only the pushes that return a frame
        seconds = seconds[max(step.batch - 2, 0):]
    from lcmrt.bench import peak_rss_bytes

    return {"load_s": load_s, "frame_s": seconds, "peak_rss_bytes": peak_rss_bytes()}


def _lcmrt_stream(pipe, tiny: bool, steps: int, strength: float):
    stream = pipe.stream(PROMPT, num_inference_steps=steps, strength=strength, seed=0, tiny_vae=tiny, output="np")

    def push(image):
        return stream.push(image)

    push.batch = stream.batch
    return push


def _diffusers_img2img(paths: dict, tiny: bool, steps: int, strength: float):
    import torch
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(paths["fused"]), torch_dtype=torch.float32,
                                                          safety_checker=None, requires_safety_checker=False)
    if tiny:
        pipe.vae = AutoencoderTiny.from_pretrained(str(paths["taesd"]), torch_dtype=torch.float32)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)

    def step(image):
        with torch.no_grad():
            return pipe(PROMPT, image=image.astype(np.float32) / 255, strength=strength, num_inference_steps=steps,
                        guidance_scale=1.0, generator=generator, output_type="np").images

    return step, size, size


# --- the harness (parent) -------------------------------------------------------------------------------------

def summarize(rounds: list[dict]) -> dict:
    by_name = {name: [r[name] for r in rounds if name in r] for name in CONTENDERS}
    result = {}
    for name, runs in by_name.items():
        if not runs:
            continue
        frame_s = [s for run in runs for s in run["frame_s"]]
        result[name] = {"frame_s_median": float(np.median(frame_s)), "frames_per_s": 1 / float(np.median(frame_s)),
                        "load_s_median": float(np.median([r["load_s"] for r in runs])),
                        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}

    def ratios(numerator: str, denominator: str) -> dict | None:
        """Per round: numerator's frames/s over denominator's (from each round's median frame time)."""
        values = [float(np.median(r[denominator]["frame_s"]) / np.median(r[numerator]["frame_s"]))
                  for r in rounds if numerator in r and denominator in r]
        return {"median": float(np.median(values)), "min": min(values), "max": max(values)} if values else None

    result["ratios"] = {
        "stream_over_img2img": ratios("lcmrt/stream", "lcmrt/img2img"),
        "stream_tiny_over_img2img_tiny": ratios("lcmrt/stream-tiny", "lcmrt/img2img-tiny"),
        "lcmrt_img2img_over_diffusers": ratios("lcmrt/img2img", "diffusers/img2img"),
        "lcmrt_img2img_tiny_over_diffusers_tiny": ratios("lcmrt/img2img-tiny", "diffusers/img2img-tiny"),
    }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--height", type=int, default=None, help="default: 512 (full), 128 (tiny)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--frames", type=int, default=8, help="timed frames per contender and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--workdir", type=Path, default=None, help="default: results/SIZE/img2img")
    parser.add_argument("--results", type=Path, default=None, help="default: WORKDIR/bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
        print(json.dumps(run_contender(args.child, paths, args.frames, args.steps, args.strength)))
        return None
    default = 512 if args.size == "full" else 128
    height, width = args.height or default, args.width or default
    workdir = args.workdir or Path("results") / args.size / "img2img"
    results = args.results or workdir / "bench"
    results.mkdir(parents=True, exist_ok=True)
    from lcmrt.sampler import img2img_start

    stream_batch = args.steps - img2img_start(args.steps, args.strength)
    paths = prepare(workdir, args.size, height, width, stream_batch, log=print)
    contenders = [c for c in args.contenders.split(",") if c]
    rounds = []
    for i in range(args.rounds):
        order = contenders[i % len(contenders):] + contenders[:i % len(contenders)]
        row = {}
        for name in order:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.img2img_stream", "--child", name, "--paths",
                                   json.dumps({k: str(v) for k, v in paths.items()}), "--frames", str(args.frames),
                                   "--steps", str(args.steps), "--strength", str(args.strength)],
                                  capture_output=True, text=True, cwd=HERE.parent)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            row[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {i + 1} {name}: {np.median(row[name]['frame_s']):.3f} s/frame, "
                  f"peak RSS {row[name]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        rounds.append(row)
    from lcmrt.cpu import cpu_description

    report = {"machine": {"cpu": _cpu_model(), "isa": cpu_description()["isa"], "platform": platform.platform(),
                          "cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": {"size": args.size, "height": height, "width": width, "steps": args.steps,
                           "strength": args.strength, "stream_batch": stream_batch, "frames": args.frames,
                           "rounds": args.rounds, "guidance": 1.0, "precision": "fp32"},
              "summary": summarize(rounds), "rounds": rounds}
    (results / "img2img_stream.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    return report


def _print_table(report: dict) -> None:
    s = report["summary"]
    print(f"\n{report['settings']['size']} SD1.5 {report['settings']['width']}x{report['settings']['height']}, "
          f"{report['settings']['steps']} steps at strength {report['settings']['strength']} "
          f"(stream batch {report['settings']['stream_batch']}), {report['machine']['cpu']}")
    print(f"{'contender':26} {'s/frame':>8} {'frames/s':>9} {'load s':>7} {'peak RSS GiB':>13}")
    for name in CONTENDERS:
        if name in s:
            r = s[name]
            print(f"{name:26} {r['frame_s_median']:8.3f} {r['frames_per_s']:9.2f} {r['load_s_median']:7.1f} "
                  f"{r['peak_rss_bytes'] / 2**30:13.2f}")
    for key, value in s["ratios"].items():
        if value:
            print(f"{key}: {value['median']:.2f}x (rounds {value['min']:.2f}..{value['max']:.2f})")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
