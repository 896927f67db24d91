"""Each TensorRT engine of an engine folder against ONNX Runtime (CPU, the fp32 graph) on the same seeded
inputs, through Polygraphy's Comparator; prints one table, exits non-zero when an engine is off.

    python -m benchmarks.trt_compare FOLDER [--atol 0.05] [--rtol 0.05]

Run by benchmarks/gpu_check.sh on a GPU machine, after `lcmrt build --engines-only FOLDER --backend tensorrt`.
The tolerances are for fp16 engines (the build's own fp16-vs-fp32 fidelity on the CPU is printed next to
each row); fp32 engines should be far inside them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_TOLERANCE = 0.05  # relative to each output's peak: fp16 UNet/text encoder measured ~1e-3 on the CPU


def compare_engines(folder: Path, atol: float, rtol: float) -> list[dict]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from lcmrt.backends.engine_keys import select_engine
    from lcmrt.engines.fp16 import _vocab_size, example_inputs
    from lcmrt.engines.tensorrt import current_key
    from lcmrt.manifest import read_manifest

    manifest = read_manifest(folder)
    key = current_key()
    rows = []
    for component, entry in manifest.components.items():
        if not any(e.component == component for e in manifest.engines):
            continue
        engine = select_engine(folder, manifest, component, key)
        feeds = example_inputs(manifest, component, vocab_size=_vocab_size(folder, manifest))
        runners = [TrtRunner(EngineFromBytes((folder / engine.file).read_bytes()), name="tensorrt"),
                   OnnxrtRunner(SessionFromOnnx(str(folder / entry.file)), name="onnxruntime-cpu")]
        results = Comparator.run(runners, data_loader=[feeds])
        passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
        (_, [trt_out]), (_, [ort_out]) = results.items()
        build_fidelity = entry.graph(engine.precision).data.get("fidelity", {})
        for name in ort_out.keys():
            reference = np.asarray(ort_out[name], np.float64)
            diff = float(np.abs(np.asarray(trt_out[name], np.float64) - reference).max())
            peak = float(np.abs(reference).max())
            rows.append({"component": component, "output": name, "precision": engine.precision,
                         "max_abs_diff": diff, "relative": diff / peak if peak else float("inf"),
                         "cpu_fp16_relative": build_fidelity.get("outputs", {}).get(name, {}).get("relative"),
                         "passed": passed})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--atol", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--rtol", type=float, default=DEFAULT_TOLERANCE)
    args = parser.parse_args()
    rows = compare_engines(args.folder, args.atol, args.rtol)
    print(f"{'component':<14}{'output':<20}{'precision':<11}{'max abs diff':>14}{'of peak':>10}"
          f"{'CPU fp16 of peak':>18}  polygraphy")
    for r in rows:
        cpu = f"{r['cpu_fp16_relative']:.2%}" if r["cpu_fp16_relative"] is not None else "-"
        print(f"{r['component']:<14}{r['output']:<20}{r['precision']:<11}{r['max_abs_diff']:>14.3e}"
              f"{r['relative']:>10.2%}{cpu:>18}  {'PASS' if r['passed'] else 'FAIL'}")
    (args.folder / "trt_compare.json").write_text(json.dumps(rows, indent=2))
    worst = max(rows, key=lambda r: r["relative"], default=None)
    ok = bool(rows) and all(r["passed"] for r in rows)
    print(f"{len(rows)} engine outputs {'within' if ok else 'NOT within'} atol/rtol {args.atol}/{args.rtol}"
          + (f"; worst {worst['component']}.{worst['output']} {worst['relative']:.2%} of peak" if worst else ""))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
