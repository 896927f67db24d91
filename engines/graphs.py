"""ONNX graph files shared by the builders: saving with external data, and comparing two graphs' outputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# Protobuf cannot hold more than 2 GB: bigger graphs keep their weights in one external data file.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
PSNR_PEAK = 1.0  # images compared in [0, 1], as the pipeline outputs them


DATA_ALIGNMENT = 4096  # external tensors start on a page, so readers may memory-map them
_COPY_CHUNK = 64 << 20


def save_graph(model, folder: Path, graph_name: str, data_dir: Path | None = None) -> list[str]:
    """Write `graph_name` (plus `graph_name.data` when its weights pass 2 GB); return the file names.

    A `model` loaded without its external data (from `data_dir`, where an exporter scattered it over many
    files) has that data streamed into the one data file, so no copy of the weights is ever in memory."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    if data_dir is not None and any(uses_external_data(t) for t in model.graph.initializer):
        data_name = f"{graph_name}.data"
        gather_external_data(model, Path(data_dir), folder / data_name, data_name)
        onnx.save_model(model, str(folder / graph_name))
        return [graph_name, data_name]
    weight_bytes = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data_name = f"{graph_name}.data"
        onnx.save_model(model, str(folder / graph_name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        return [graph_name, data_name]
    onnx.save_model(model, str(folder / graph_name))
    return [graph_name]


def gather_external_data(model, data_dir: Path, out: Path, location: str) -> None:
    """Copy every external tensor of `model` (stored under `data_dir`) into the file `out`, each at an offset
    aligned to DATA_ALIGNMENT, and point the model's entries at it as `location`. Streams file to file."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    with open(out, "wb") as dst:
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            source = (data_dir / info.location).resolve()
            if data_dir.resolve() not in source.parents:
                raise ValueError(f"external data {info.location!r} of {tensor.name} is outside {data_dir}")
            dst.write(b"\0" * (-dst.tell() % DATA_ALIGNMENT))
            offset = dst.tell()
            with open(source, "rb") as src:
                src.seek(info.offset or 0)
                left = info.length  # None: the rest of the file
                while left is None or left > 0:
                    chunk = src.read(_COPY_CHUNK if left is None else min(_COPY_CHUNK, left))
                    if not chunk:
                        break
                    dst.write(chunk)
                    left = None if left is None else left - len(chunk)
            if left:
                raise ValueError(f"external data of {tensor.name} in {info.location} is {left} bytes short")
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", dst.tell() - offset)):
                tensor.external_data.add(key=key, value=str(value))


def example_inputs(inputs, dims: dict[str, int], seed: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Seeded inputs for a graph, each in the range the pipeline feeds it: `inputs` are (name, shape, dtype)
    triples whose named dimensions take their values from `dims`."""
    from ..families import TIME_IDS
    from ..guidance import TIMESTEP_COND

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape, dtype in inputs:
        shape, dtype = tuple(dims[d] if isinstance(d, str) else d for d in shape), np.dtype(dtype)
        if dtype.kind in "iu":  # token ids
            value = rng.integers(0, vocab_size, size=shape)
        elif name == "timestep":
            value = rng.integers(0, 1000, size=shape)
        elif name == TIME_IDS:  # sizes and crop offsets in pixels
            value = rng.integers(0, 1024, size=shape)
        elif name in ("image", TIMESTEP_COND):  # pixels in [-1, 1]; sines and cosines
            value = rng.uniform(-1, 1, size=shape)
        else:
            value = rng.standard_normal(shape)
        arrays[name] = value.astype(dtype)
    return arrays


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
    """Run both graphs in ONNX Runtime (CPU) on `feeds` and compare their outputs (`compare_outputs`). One
    session at a time: two full-size UNets would double the memory."""
    return compare_outputs(run_onnxruntime(reference_path, feeds), run_onnxruntime(test_path, feeds),
                           image_outputs, "onnxruntime-cpu")


def run_onnxruntime(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the graph at `path` on `feeds`, by name (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def compare_outputs(reference: dict[str, np.ndarray], test: dict[str, np.ndarray], image_outputs: tuple[str, ...],
                    runtime: str) -> dict:
    """Max abs diff per output of `test` against `reference` (also relative to the reference's peak), and the
    PSNR of outputs that are images in [-1, 1] (mapped to [0, 1] as the pipeline does); `runtime` ran both."""
    report = {"outputs": {}, "runtime": runtime, "finite": True}
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
