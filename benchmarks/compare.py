"""Benchmark lcmrt against diffusers, Optimum, optimum-intel and OpenVINO GenAI on the same random weights with
the same fused LCM-LoRA.

    python -m benchmarks.compare --arch sd15 --size full --height 512 --width 512 --steps 4 --guidance 1.0

Contenders: lcmrt on every backend this machine has (and "auto" where the folder's build chose different CPU
backends for its components); diffusers eager StableDiffusionPipeline + LCMScheduler
at the same steps; diffusers eager with the model's default scheduler at --baseline-steps (its usual way of
running, guidance --baseline-guidance); Optimum's ORTStableDiffusionPipeline + LCMScheduler on Optimum's
own ONNX export of the same fused model; optimum-intel's OVDiffusionPipeline + LCMScheduler and OpenVINO
GenAI's Text2ImagePipeline (LCM) on optimum-intel's OpenVINO export of it, static shapes, fp32 (the last
three each in a venv of their own, `benchmarks/prepare.py`). Each contender runs in a child process per round
(its peak RSS is the child's), doing a cold generation (the warm-up) and a warm one; rounds alternate the
contenders, so machine noise hits all alike, and speed-ups are quoted per round as ratios. The fp32 GEMM
peak is measured between rounds (numpy and ONNX Runtime MatMul, the best of all), and the UNet step and VAE
decode are reported as a fraction of the roofline: FLOPs (from the engine folder's manifest) / (time * peak).

Writes RESULTS/compare.json, RESULTS/stages.png and RESULTS/summary.png, and prints a compact table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lcmrt import bench
from lcmrt.backends import BACKEND_NAMES, get_backend
from lcmrt.errors import BackendError
from lcmrt.manifest import read_manifest

from . import prepare

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
PROMPT = "a lighthouse on a cliff at sunset, oil painting"

# The targets for full SD1.5, 512x512, 4 steps, guidance 1, batch 1, fp32, for each lcmrt backend.
GOALS = {
    "e2e_speedup_vs_diffusers_lcm": (">=", 2.0),
    "e2e_speedup_vs_optimum": (">=", 1.15),
    "e2e_speedup_vs_fastest_openvino": (">=", 1.0),
    "unet_step_roofline_fraction": (">=", 0.8),
    "vae_decode_roofline_fraction": (">=", 0.8),
    "overhead_fraction_of_step": ("<", 0.01),
    "peak_rss_over_diffusers": ("<=", 1.0),
    "cold_start_over_warm": ("<=", 1.3),
}
OPENVINO_CONTENDERS = ("optimum-intel/lcm", "openvino-genai/lcm")

@dataclass(frozen=True)
class Peer:
    """A contender that runs in its own venv, on an export of the fused model made with that venv."""

    contender: str  # its name in --contenders
    case: str  # its name in the report
    kind: str  # worker runner
    venv: prepare.PeerVenv
    export_step: str  # prepare.py step
    export_dir: str  # under WORKDIR


PEERS = (
    Peer("optimum", "optimum/lcm", "optimum", prepare.OPTIMUM, "optimum-export", "optimum-onnx"),
    Peer("optimum-intel", "optimum-intel/lcm", "optimum_intel", prepare.OPENVINO, "openvino-export", "openvino-ir"),
    Peer("openvino-genai", "openvino-genai/lcm", "openvino_genai", prepare.OPENVINO, "openvino-export",
         "openvino-ir"),
)
PEER_NAMES = tuple(p.contender for p in PEERS)


@dataclass
class Case:
    """One contender at one batch size."""

    name: str
    kind: str  # worker runner (worker.RUNNERS)
    batch: int
    config: dict
    python: str = sys.executable
    repeats: int = 1
    results: list = field(default_factory=list)
    peak_rss: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lcmrt_backends(folder: Path | None = None) -> list[str]:
    """Every lcmrt backend that can start here (aliases of one another left out), and "auto" where it runs
    `folder`'s components on different backends (the build's backend choice)."""
    found, seen = [], set()
    for name in BACKEND_NAMES:
        if name in ("auto", "onnxruntime"):
            continue
        try:
            backend = get_backend(name)
        except BackendError:
            continue
        if backend.name not in seen:
            seen.add(backend.name)
            found.append(name)
    if folder is not None:
        from lcmrt.backends.chosen import folder_backend

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # another CPU: "auto" is then ONNX Runtime, measured already
            if folder_backend(folder, read_manifest(folder), "auto", {}).name.startswith("auto("):
                found.append("auto")
    return found


# --- the GEMM peak -------------------------------------------------------------------------------------

def gemm_peaks(size: int) -> dict:
    return {"numpy": bench.numpy_gemm_peak(size), "onnxruntime": bench.ort_gemm_peak(size)}


# --- preparation ---------------------------------------------------------------------------------------

def run_step(cmd: list[str], what: str) -> None:
    log(what)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")


def prepare_inputs(args) -> dict:
    work = args.workdir
    model_dir = work / args.arch
    paths = {"model": model_dir / "model", "lcm_lora": model_dir / "lcm-lora.safetensors", "folders": {}}
    if not (paths["model"] / "model_index.json").is_file():
        run_step([sys.executable, "-m", "lcmrt", "random-model", model_dir, "--arch", args.arch, "--size",
                  args.size, "--seed", "0", "--overwrite"], f"writing the random {args.size} model to {model_dir}")
    mode = "cfg" if args.guidance > 1 else "none"
    for batch in args.batch_sizes:
        folder = work / ("fused" if batch == 1 else f"fused-b{batch}")
        if not prepare.engine_folder_ok(folder, args.height, args.width, batch, mode):
            run_step([sys.executable, "-m", "lcmrt", "build", paths["model"], "--lcm-lora", paths["lcm_lora"],
                      "--height", args.height, "--width", args.width, "--batch", batch, "--guidance-mode", mode,
                      "--out", folder, "--overwrite", "--quiet"], f"building the engine folder {folder}")
        paths["folders"][batch] = folder
    # the fused model as a diffusers folder: what the diffusers contenders load and Optimum exports
    paths["fused"] = fused = work / "fused-diffusers"
    if any(c.startswith("diffusers") or c in PEER_NAMES for c in args.contenders) and \
            not (fused / "model_index.json").is_file():
        run_step([sys.executable, HERE / "prepare.py", "fused-diffusers", paths["model"], paths["lcm_lora"],
                  fused], f"saving the model with the LCM-LoRA fused as a diffusers folder to {fused}")
    exports, venvs = {}, {}  # one export per folder, one install per venv, whichever contenders share them
    paths["peers"] = {}  # contender -> (export folder, None) or (None, why it is left out)
    for peer in PEERS:
        if peer.contender not in args.contenders:
            continue
        if peer.venv.name not in venvs:
            venvs[peer.venv.name] = prepare.ensure_venv(peer.venv, log)
        export = work / peer.export_dir
        if export not in exports:
            exports[export] = venvs[peer.venv.name]
            if exports[export] is None and not (export / "model_index.json").is_file():
                try:
                    run_step([peer.venv.python, HERE / "prepare.py", peer.export_step, fused, export],
                             f"exporting the fused model with {peer.venv.name} to {export}")
                except SystemExit as e:
                    exports[export] = f"the export failed: {str(e)[-500:]}"
        why = exports[export]
        paths["peers"][peer.contender] = (None, why) if why else (export, None)
    return paths


def make_cases(args, paths) -> tuple[list[Case], list[str]]:
    notes = []
    common = dict(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, warm_runs=1)
    cases = []
    for batch in args.batch_sizes:
        if "lcmrt" in args.contenders:
            for backend in lcmrt_backends(paths["folders"][batch]):
                cases.append(Case(f"lcmrt/{backend}", "lcmrt", batch, dict(
                    common, folder=str(paths["folders"][batch]), backend=backend, num_images=batch),
                    repeats=args.repeats))
        if "diffusers-lcm" in args.contenders:
            cases.append(Case("diffusers/lcm", "diffusers", batch, dict(
                common, model=str(paths["fused"]), scheduler="lcm",
                num_images=batch), repeats=args.repeats))
        for peer in PEERS:
            if peer.contender not in paths["peers"]:
                continue
            export, why = paths["peers"][peer.contender]
            if why:
                if batch == args.batch_sizes[0]:
                    notes.append(f"{peer.case} not measured: {why}")
            else:
                cases.append(Case(peer.case, peer.kind, batch, dict(
                    common, export=str(export), num_images=batch, height=args.height, width=args.width),
                    python=str(peer.venv.python), repeats=args.repeats))
    if "diffusers-default" in args.contenders:
        # the usual way to run the model without LCM; its warm-up is one step (eager torch captures nothing)
        cases.append(Case(f"diffusers/default-{args.baseline_steps}", "diffusers", 1, dict(
            common, model=str(paths["fused"]), scheduler="default",
            steps=args.baseline_steps, guidance=args.baseline_guidance, warmup_steps=1, num_images=1),
            repeats=args.baseline_repeats))
    return cases, notes


# --- measuring -----------------------------------------------------------------------------------------

def run_case(case: Case, timeout: float, round_index: int = 0) -> None:
    """One child process: its result and its own peak RSS (wait4 reports the child's rusage)."""
    with tempfile.TemporaryDirectory(prefix="lcmrt-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cfg = dict(case.config, kind=case.kind, out=str(out))
        env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
        err = open(Path(tmp) / "stderr", "w+")
        proc = subprocess.Popen([case.python, str(WORKER), json.dumps(cfg)], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode == 0 and out.is_file():
            case.results.append(dict(json.loads(out.read_text()), round=round_index))
            case.peak_rss.append(usage.ru_maxrss * 1024)  # KiB on Linux
        else:
            err.seek(0)
            tail = err.read()[-2000:]
            case.errors.append(f"exit {proc.returncode}: {tail}")
            log(f"{case.name} (batch {case.batch}) failed: {tail[-400:]}")
        err.close()


def run_rounds(cases: list[Case], repeats: int, timeout: float, between_rounds) -> None:
    rounds = max([repeats] + [c.repeats for c in cases])
    for r in range(rounds):
        between_rounds()
        order = cases[r % len(cases):] + cases[:r % len(cases)]  # rotate, so no contender always goes first
        for case in order:
            if r < case.repeats:
                log(f"round {r + 1}/{rounds}: {case.name} batch {case.batch}")
                start = time.perf_counter()
                run_case(case, timeout, r)
                log(f"  {time.perf_counter() - start:.1f} s")
    between_rounds()


# --- reporting -----------------------------------------------------------------------------------------

def base_flops(manifest) -> dict:
    """FLOPs of one image, UNet unguided (the manifest's graphs are at the folder's batch); `manifest`: a Manifest."""
    f = bench.stage_flops(manifest, guided=False)
    batch = manifest.shapes.batch
    return {"unet_step": f["unet_step"] / batch, "vae_decode": f["vae_decode"] / batch}


def case_flops(case: Case, per_image: dict) -> dict:
    guided = 2 if case.config["guidance"] > 1 else 1
    n = case.config["num_images"]
    return {"unet_step": per_image["unet_step"] * n * guided, "vae_decode": per_image["vae_decode"] * n}


def summarize_case(case: Case, per_image: dict, gflops: float) -> dict:
    warm = [rec for res in case.results for rec in res["warm"]]
    cold = [res["import_s"] + res["load_s"] + res["first"]["e2e"] for res in case.results]
    summary = bench.summarize(warm, cold, case_flops(case, per_image), gflops,
                              max(case.peak_rss) if case.peak_rss else None)
    first = case.results[0] if case.results else {}
    return {
        "contender": case.name, "batch": case.batch, "steps": case.config["steps"],
        "guidance": case.config["guidance"], "backend": first.get("backend"), "rounds": len(case.results),
        "import_s": bench.stats(r["import_s"] for r in case.results),
        "load_s": bench.stats(r["load_s"] for r in case.results),
        "first_image_s": bench.stats(r["first"]["e2e"] for r in case.results),
        **summary, "errors": case.errors, "records": case.results,
    }


def paired_ratios(ref: Case, other: Case) -> dict:
    """other / lcmrt per round (both ran in the same round), for e2e and each stage: lcmrt's speed-up."""
    out = {}
    for key in ("e2e", "text_encoder", "unet_step", "vae_decode"):
        ratios = []
        theirs = {r["round"]: r for r in other.results}
        for a in ref.results:
            b = theirs.get(a["round"])
            if b is None:
                continue
            ra, rb = a["warm"][0], b["warm"][0]
            va = np.median(ra["unet_steps"]) if key == "unet_step" else ra[key]
            vb = np.median(rb["unet_steps"]) if key == "unet_step" else rb[key]
            if va > 0:
                ratios.append(vb / va)
        out[key] = bench.stats(ratios)
    return out


def goals(report: dict) -> dict:
    """The targets for each lcmrt backend at batch 1, against the other contenders at batch 1 in the same rounds."""
    rows = {(r["contender"], r["batch"]): r for r in report["contenders"]}
    diffusers = rows.get(("diffusers/lcm", 1))
    out = {}
    for (name, batch), me in rows.items():
        if not name.startswith("lcmrt/") or batch != 1:
            continue
        ratios = report["ratios"].get(name, {})
        e2e = {other: (ratio.get("e2e") or {}).get("median") for other, ratio in ratios.items()}
        openvino = [e2e[c] for c in OPENVINO_CONTENDERS if e2e.get(c) is not None]
        roofline = me.get("roofline_fraction", {})
        value = {
            "e2e_speedup_vs_diffusers_lcm": e2e.get("diffusers/lcm"),
            "e2e_speedup_vs_optimum": e2e.get("optimum/lcm"),
            "e2e_speedup_vs_fastest_openvino": min(openvino) if openvino else None,
            "unet_step_roofline_fraction": roofline.get("unet_step"),
            "vae_decode_roofline_fraction": roofline.get("vae_decode"),
            "overhead_fraction_of_step": me.get("overhead_fraction_of_step"),
            "peak_rss_over_diffusers": me["peak_rss_bytes"] / diffusers["peak_rss_bytes"]
            if diffusers and me.get("peak_rss_bytes") and diffusers.get("peak_rss_bytes") else None,
            "cold_start_over_warm": me.get("cold_over_warm"),
        }
        out[name] = {}
        for goal, (op, target) in GOALS.items():
            v = value[goal]
            met = None if v is None else (v >= target if op == ">=" else v < target if op == "<" else v <= target)
            out[name][goal] = {"value": v, "target": f"{op} {target}", "met": met}
    return out


def build_report(args, cases: list[Case], notes: list[str], peaks: list[dict], manifest) -> dict:
    peak = max(v for p in peaks for v in p.values())
    per_image = base_flops(manifest)
    report = {
        "config": {"arch": args.arch, "size": args.size, "height": args.height, "width": args.width,
                   "steps": args.steps, "guidance": args.guidance, "repeats": args.repeats,
                   "batch_sizes": args.batch_sizes, "baseline_steps": args.baseline_steps,
                   "baseline_guidance": args.baseline_guidance, "prompt": args.prompt, "seed": args.seed,
                   "gemm_size": args.gemm_size,
                   "precision": "fp32"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "gemm_gflops": peaks, "gemm_peak_gflops": peak},
        "flops_per_image": per_image,
        "contenders": [summarize_case(c, per_image, peak) for c in cases if c.results],
        "failed": {c.name: c.errors for c in cases if not c.results},
        "notes": notes,
        "ratios": {},
    }
    for ref in cases:
        if not ref.name.startswith("lcmrt/") or not ref.results:
            continue
        key = ref.name if ref.batch == 1 else f"{ref.name} batch {ref.batch}"
        report["ratios"][key] = {o.name: paired_ratios(ref, o) for o in cases
                                 if o is not ref and o.batch == ref.batch and o.results
                                 and o.config["steps"] == ref.config["steps"]}
        batch1 = next((o for o in cases if o.name.startswith("diffusers/default") and o.results), None)
        if batch1 is not None and ref.batch == 1:  # a different schedule: only end to end compares
            ref_e2e = np.median([r["warm"][0]["e2e"] for r in ref.results])
            report["ratios"][key][batch1.name] = {"e2e": bench.stats(
                [r["warm"][0]["e2e"] / ref_e2e for r in batch1.results])}
    report["goals"] = goals(report)
    return report


def _fmt(stat, scale=1.0, digits=3) -> str:
    return "-" if not stat else f"{stat['median'] * scale:.{digits}f}"


def print_table(report: dict) -> None:
    head = (f"{'contender':<28}{'batch':>5}{'steps':>6}{'e2e s':>9}{'[min-max]':>17}{'text s':>8}{'unet s/st':>10}"
            f"{'vae s':>8}{'img/s':>8}{'cold s':>8}{'RSS GB':>8}{'unet RL':>8}{'vae RL':>8}{'ovh %':>7}")
    print(head)
    print("-" * len(head))
    for r in report["contenders"]:
        e = r["e2e_s"]
        rl = r.get("roofline_fraction", {})
        ovh = r.get("overhead_fraction_of_step")
        spread = f"[{e['min']:.3f}-{e['max']:.3f}]"
        ovh = "-" if ovh is None else f"{100 * ovh:.2f}"
        print(f"{r['contender']:<28}{r['batch']:>5}{r['steps']:>6}{_fmt(e):>9}"
              f"{spread:>17}{_fmt(r['text_encoder_s']):>8}"
              f"{_fmt(r['unet_step_s']):>10}{_fmt(r['vae_decode_s']):>8}{r['images_per_s']:>8.3f}"
              f"{_fmt(r['cold_start_s'], digits=1):>8}{(r['peak_rss_bytes'] or 0) / 1e9:>8.2f}"
              f"{rl.get('unet_step', float('nan')):>8.2f}{rl.get('vae_decode', float('nan')):>8.2f}"
              f"{ovh:>7}")
    m = report["machine"]
    best = {k: max(p[k] for p in m["gemm_gflops"]) for k in m["gemm_gflops"][0]}
    print(f"GEMM peak {m['gemm_peak_gflops']:.1f} GFLOP/s (best of {len(m['gemm_gflops'])} measurements between "
          f"rounds: numpy {best['numpy']:.1f}, onnxruntime {best['onnxruntime']:.1f}); RL = FLOPs / (time x peak)")
    for ref, others in report["ratios"].items():
        for name, ratio in others.items():
            parts = ", ".join(f"{k} {v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]"
                              for k, v in ratio.items() if v)
            print(f"{ref} vs {name}: {parts}")
    for contender, targets in report["goals"].items():
        for name, g in targets.items():
            v = "-" if g["value"] is None else f"{g['value']:.3f}"
            verdict = "n/a" if g["met"] is None else "met" if g["met"] else "NOT met"
            print(f"goal {contender} {name}: {v} (target {g['target']}) {verdict}")
    for note in report["notes"]:
        print(f"note: {note}")
    for name, errors in report["failed"].items():
        print(f"failed: {name}: {errors[-1][-300:] if errors else ''}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--height", type=int, default=None, help="default: 512 full, 128 tiny")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each contender: one cold + one warm run")
    parser.add_argument("--batch-sizes", default="1", help="comma list; each builds an engine folder")
    parser.add_argument("--contenders", default=",".join(("lcmrt", "diffusers-lcm", "diffusers-default") + PEER_NAMES))
    parser.add_argument("--no-peer-venvs", action="store_true",
                        help=f"leave out the contenders that run in venvs of their own ({', '.join(PEER_NAMES)})")
    parser.add_argument("--baseline-steps", type=int, default=25)
    parser.add_argument("--baseline-guidance", type=float, default=7.5, help="diffusers' default")
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="models and engine folders (default results/SIZE)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default WORKDIR/bench)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--gemm-size", type=int, default=bench.GEMM_SIZE, help="N of the N^3 GEMM peak measurement")
    args = parser.parse_args(argv)
    default_res = 512 if args.size == "full" else 128
    args.height, args.width = args.height or default_res, args.width or default_res
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.no_peer_venvs:
        args.contenders = [c for c in args.contenders if c not in PEER_NAMES]
    optimum_sd15_only = args.arch != "sd15" and "optimum" in args.contenders
    if optimum_sd15_only:  # the harness drives Optimum's ORTStableDiffusionPipeline only
        args.contenders.remove("optimum")
    args.workdir = args.workdir or Path("results") / args.size
    args.out = args.out or args.workdir / "bench"

    paths = prepare_inputs(args)
    cases, notes = make_cases(args, paths)
    if args.no_peer_venvs:
        notes.append(f"{', '.join(PEER_NAMES)} left out (--no-peer-venvs)")
    if optimum_sd15_only:
        notes.append(f"Optimum left out: this harness runs its SD1.5 pipeline only, and the model is {args.arch}")
    notes.append("cold start = imports + load + first image, in a fresh process (every contender loads weights "
                 "with the LCM-LoRA already fused); "
                 "the OS page cache holds the model files after the first round")
    peaks = []  # measured between rounds: a busy machine depresses some of them, the best is the peak

    def measure_peak():
        log("measuring the fp32 GEMM peak")
        peaks.append(gemm_peaks(args.gemm_size))

    run_rounds(cases, args.repeats, args.timeout, measure_peak)
    manifest = read_manifest(paths["folders"][1 if 1 in paths["folders"] else args.batch_sizes[0]])
    report = build_report(args, cases, notes, peaks, manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        from .plots import plot_report

        plot_report(report, args.out)
    print_table(report)
    log(f"wrote {args.out / 'compare.json'}")
    return report


if __name__ == "__main__":
    main()
