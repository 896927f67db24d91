"""ONNX graph files shared by the builders: saving with external data, and comparing two graphs' outputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Protobuf cannot hold more than 2 GB: bigger graphs keep their weights in one external data file.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
PSNR_PEAK = 1.0  # images compared in [0, 1], as the pipeline outputs them


def save_graph(model, folder: Path, graph_name: str) -> list[str]:
    """Write `graph_name` (plus `graph_name.data` when its weights pass 2 GB); return the file names."""
    import onnx

    weight_bytes = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data_name = f"{graph_name}.data"
        onnx.save_model(model, str(folder / graph_name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        return [graph_name, data_name]
    onnx.save_model(model, str(folder / graph_name))
    return [graph_name]


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = PSNR_PEAK) -> float:
    """Peak signal-to-noise ratio in dB of `test` against `reference` (images in [0, peak]); inf if equal,
    nan if `test` has NaN or inf."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if not np.all(np.isfinite(test)):
        return math.nan
    mse = float(np.mean((reference - test) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def compare_graphs(reference_path: str | Path, test_path: str | Path, feeds: dict[str, np.ndarray],
                   image_outputs: tuple[str, ...] = ()) -> dict:
    """Run both graphs in ONNX Runtime (CPU) on `feeds`: max abs diff per output (also relative to the
    reference's peak), and the PSNR of outputs that are images in [-1, 1] (mapped to [0, 1] as the pipeline
    does). One session at a time: two full-size UNets would double the memory."""
    import onnxruntime as ort

    runs = []
    for path in (reference_path, test_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        runs.append(dict(zip(names, session.run(names, feeds))))
        del session
    reference, test = runs
    report = {"outputs": {}, "runtime": "onnxruntime-cpu", "finite": True}
    for name, ref in reference.items():
        got = test[name]
        finite = bool(np.all(np.isfinite(got)))
        report["finite"] &= finite
        diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if finite else math.inf
        peak = float(np.max(np.abs(ref)))
        out = {"max_abs_diff": diff, "max_abs_reference": peak, "relative": diff / peak if peak else math.inf}
        if name in image_outputs:
            out["psnr_db"] = psnr(np.clip(ref / 2 + 0.5, 0, 1), np.clip(got / 2 + 0.5, 0, 1))
        report["outputs"][name] = out
    report["max_abs_diff"] = max(o["max_abs_diff"] for o in report["outputs"].values())
    return report
