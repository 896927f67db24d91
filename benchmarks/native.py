"""The native runtime (lcmrt-generate) against the Python runtime on the same engine folder, in one run.

    make native    # once: build/native/lcmrt-generate
    python -m benchmarks.native results/full/fused [--rounds 3] [--repeat 3] [--steps 4] [--json FILE]

Each round starts one fresh process per runtime, in alternating order (the machine is shared: compare the
per-round ratios). A process loads the folder on ONNX Runtime's CPU provider and generates `--repeat` times
(same prompt and seed, 512x512 for an SD1.5 folder, no guidance): the first generation gives the cold start
(process start to the first image, imports and load included), the others the warm per-stage times. Peak RSS
is the process's ru_maxrss (this driver stays small, so the floor Linux carries over fork is negligible). Also
reports the native runtime's binary and dependency sizes, and checks that both wrote the same image.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a watercolor fox in the snow"
LINE = re.compile(r"load (?P<load>[\d.]+) s \| text encoder (?P<text_encoder>[\d.]+) s \| UNet (?P<unet_step>[\d.]+) "
                  r"s/step x \d+ \| VAE decode (?P<vae_decode>[\d.]+) s \| total (?P<total>[\d.]+) s")
# The Python runtime's side: import, load and generate in one fresh process, printing lcmrt-generate's timing line.
PYTHON_RUN = """
import sys, time
import numpy as np
from lcmrt import Pipeline
from lcmrt.images import save_png
folder, steps, repeat, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
pipe = Pipeline.load(folder, backend="onnxruntime")
load = time.perf_counter() - start
for _ in range(repeat):
    image = pipe(%r, num_inference_steps=steps, seed=0)[0]
    t = pipe.last_timings
    print(f"load {load:.2f} s | text encoder {t['text_encoder']:.3f} s | UNet {np.mean(t['unet_steps']):.3f} s/step "
          f"x {steps} | VAE decode {t['vae_decode']:.3f} s | total {t['total']:.2f} s", file=sys.stderr, flush=True)
save_png(image, out, {"prompt": %r})
""" % (PROMPT, PROMPT)


def run(command: list[str]) -> dict:
    """Timings of one process: cold start, the timing line of each generation, peak RSS."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, cold = [], None
    for text in process.stderr:
        match = LINE.search(text)
        if match:
            cold = cold if cold is not None else time.perf_counter() - start
            lines.append({k: float(v) for k, v in match.groupdict().items()})
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed (status {status})")
    return {"cold_start": cold, "runs": lines, "peak_rss_gb": usage.ru_maxrss / 2**20}


def summary(processes: list[dict]) -> dict:
    warm = [r for p in processes for r in p["runs"][1:]] or [p["runs"][0] for p in processes]
    stats = {key: statistics.median(r[key] for r in warm) for key in ("text_encoder", "unet_step", "vae_decode", "total")}
    stats["load"] = statistics.median(p["runs"][0]["load"] for p in processes)
    stats["cold_start"] = statistics.median(p["cold_start"] for p in processes)
    stats["cold_over_warm"] = stats["cold_start"] / stats["total"]
    stats["peak_rss_gb"] = statistics.median(p["peak_rss_gb"] for p in processes)
    return stats


def native_sizes(build: Path) -> dict:
    """Bytes of the native runtime and of each shared library it loads (ldd), resolved to files."""
    binary, library = build / "lcmrt-generate", build / "liblcmrt.so"
    sizes = {"lcmrt-generate": binary.stat().st_size, "liblcmrt.so": library.resolve().stat().st_size}
    for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > 2 and parts[2].startswith("/") and "liblcmrt" not in parts[0]:
            sizes[parts[0]] = Path(parts[2]).resolve().stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--build", default="build/native")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    build = Path(args.build)
    out = Path(tempfile.mkdtemp(prefix="lcmrt-native-bench-"))
    commands = {
        "native": [str(build / "lcmrt-generate"), args.folder, PROMPT, "--steps", str(args.steps), "--seed", "0",
                   "--repeat", str(args.repeat), "-o", str(out / "native.png")],
        "python": [sys.executable, "-c", PYTHON_RUN, args.folder, str(args.steps), str(args.repeat),
                   str(out / "python.png")],
    }
    processes = {name: [] for name in commands}
    ratios = []
    for round_ in range(args.rounds):
        order = list(commands) if round_ % 2 == 0 else list(commands)[::-1]
        for name in order:
            processes[name].append(run(commands[name]))
            print(f"round {round_ + 1} {name}: {processes[name][-1]}", file=sys.stderr, flush=True)
        per_round = [summary([processes[name][-1]]) for name in ("python", "native")]
        ratios.append({k: per_round[0][k] / per_round[1][k] for k in ("total", "unet_step", "vae_decode", "cold_start")})
    from PIL import Image
    import numpy as np

    with Image.open(out / "native.png") as a, Image.open(out / "python.png") as b:
        image_difference = int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
    result = {"folder": args.folder, "steps": args.steps, "rounds": args.rounds, "repeat": args.repeat,
              "summary": {name: summary(p) for name, p in processes.items()},
              "python_over_native_per_round": ratios, "image_max_difference_levels": image_difference,
              "native_sizes_bytes": native_sizes(build), "processes": processes}
    print(json.dumps({k: v for k, v in result.items() if k != "processes"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
