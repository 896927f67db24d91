"""The engine folder's `manifest.json`: reading, writing and checking it (see DESIGN.md, "The engine folder").

The manifest is a plain JSON document; this module owns its format version and the checks every loader
runs: the folder is an engine folder, its format is one this runtime reads, and each graph file is the
one the build wrote (sha256).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import EngineFolderError

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
ADAPTER_DIR = "adapters"  # adapters/NAME.safetensors: one refittable adapter's low-rank factors
# Graph variants of a component (components[c]["variants"][NAME]), each a file `<component>.<NAME>.onnx`.
FP32, FP16, INT8 = "fp32", "fp16", "int8"
GRAPH_PRECISIONS = (FP32, FP16, INT8)  # a component without a variant runs its fp32 graph
PRE_OPTIMIZED = "ort-cpu"  # written by lcmrt.engines.ort_optimize: ONNX Runtime's CPU optimizations applied
REFIT_INPUTS = "refit-inputs"  # written by lcmrt.export.adapters: refit weights declared as graph inputs
FP16_SUFFIX = f".{FP16}.onnx"
INT8_SUFFIX = f".{INT8}.onnx"
# TensorRT engines: trt/sm<major><minor>-<trt version>/<component>.plan, with the key's timing cache and
# refit bases beside them (lcmrt.backends.engine_keys); ONNX Runtime's TensorRT provider caches its own.
TRT_DIR = "trt"
PLAN_SUFFIX = ".plan"
REFIT_BASE_SUFFIX = ".refit-base.safetensors"
TIMING_CACHE_NAME = "timing.cache"
TRT_CACHE_DIR = "ort-trt-cache"  # TensorRT engines belong to one GPU and version
# Files already hashed on this machine, keyed by path with (device, inode, size, mtime): a later load only
# stats them. Hashing a full-size folder's 4 GB takes seconds; a modified file gets a new mtime.
VERIFIED_CACHE = Path(os.environ.get("LCMRT_CACHE_DIR", Path.home() / ".cache" / "lcmrt")) / "verified.json"
# Bump when a reader of the previous format would misread a new folder.
FORMAT_VERSION = 1
_HASH_CHUNK = 16 << 20


def variant_file(component: str, variant: str) -> str:
    """The graph file of a component's variant, e.g. `unet.fp16.onnx`."""
    return f"{component}.{variant}.onnx"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _matches(path: Path, expected: str) -> bool:
    """Does the file hash to `expected`? Answered from the cache of verified files when it is unchanged."""
    try:
        cache = json.loads(VERIFIED_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    key, stamp = str(path.resolve()), [_stat_key(path), expected]
    if cache.get(key) == stamp:
        return True
    if file_sha256(path) != expected:
        return False
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}
    cache[key] = stamp
    try:  # a cache that cannot be written only costs the next load a re-hash
        VERIFIED_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = VERIFIED_CACHE.with_name(f".{VERIFIED_CACHE.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, VERIFIED_CACHE)
    except OSError:
        pass
    return True


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write (or replace) the manifest atomically: readers see the old or the new one, never half of one."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise EngineFolderError(
            f"{folder} is not a folder. Pass the folder written by `lcmrt build ... --out DIR`.")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise EngineFolderError(
            f"{folder} is not an lcmrt engine folder: it has no {MANIFEST_NAME}. "
            "Build one with `lcmrt build MODEL --lcm-lora LORA --out DIR`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineFolderError(f"{path} is not valid JSON ({e}). Rebuild the folder with `lcmrt build`.") from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise EngineFolderError(f"{path} has no integer format_version; it was not written by `lcmrt build`.")
    if version > FORMAT_VERSION:
        raise EngineFolderError(
            f"{folder} was built with engine folder format {version}, but this lcmrt reads format "
            f"{FORMAT_VERSION} at most. Upgrade lcmrt (`pip install -U lcmrt`) or rebuild the folder with this version.")
    return manifest


def component_entry(manifest: dict, component: str, precision: str = "fp32") -> dict:
    """A component's graph entry at `precision`: its fp16 variant where one was built, else the fp32 graph."""
    entry = manifest["components"][component]
    return entry if precision == "fp32" else entry.get("variants", {}).get(precision, entry)


def verify_component(folder: str | Path, manifest: dict, component: str, precision: str = "fp32") -> Path:
    """Check that a component's files exist and hash to what the build recorded; return the graph path."""
    folder = Path(folder)
    if component not in manifest["components"]:
        raise EngineFolderError(
            f"{folder} has no {component!r} component (it has {', '.join(manifest['components'])}). "
            "Rebuild the folder with `lcmrt build`.")
    entry = component_entry(manifest, component, precision)
    for name, expected in entry["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise EngineFolderError(
                f"{path} is missing from the engine folder. Rebuild the folder with `lcmrt build`.")
        if not _matches(path, expected):
            raise EngineFolderError(
                f"{path} does not match the hash recorded at build time: the file was modified or "
                "truncated. Rebuild the folder with `lcmrt build`.")
    return folder / entry["file"]
