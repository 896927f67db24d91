"""The engine folder's contract (see DESIGN.md, "The engine folder"): the names of its files and graph
variants, and its `manifest.json`, read, checked and written here only.

The manifest is a plain JSON document; `Manifest` wraps it (unchanged, as `.data`) with typed, read-only
views of its parts (components and their graph variants, shapes, adapters, refit map, engines), each
checked where it is read: a part of the wrong shape is an EngineFolderError that names the key and the
command that fixes it, never a KeyError deep in a backend. `read_manifest` also checks that the folder is
an engine folder of a format this runtime reads; `verify_component` that each graph file is the one the
build wrote (sha256). Producers edit a Manifest through its few setters and write it with `write_manifest`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import EngineFolderError

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer the runtime reads (the folder also keeps the vocab files)
ADAPTER_DIR = "adapters"  # adapters/NAME.safetensors: one refittable adapter's low-rank factors
# Graph variants of a component (components[c]["variants"][NAME]), each a file `<component>.<NAME>.onnx`.
FP32, FP16, INT8 = "fp32", "fp16", "int8"
GRAPH_PRECISIONS = (FP32, FP16, INT8)  # a component without a variant runs its fp32 graph
PRE_OPTIMIZED = "ort-cpu"  # written by lcmrt.engines.ort_optimize: ONNX Runtime's CPU optimizations applied
REFIT_INPUTS = "refit-inputs"  # written by lcmrt.export.adapters: refit weights declared as graph inputs
# written by lcmrt.engines.refit_factors: each refittable module with a low-rank branch whose factors are graph
# inputs (`factors`: module -> its down and up input names and total rank; lcmrt.engines.lowrank_graph)
REFIT_FACTORS = "refit-factors"
# written by lcmrt.engines.openvino_ir: the fp32 graph in OpenVINO's own format, `<component>.openvino.xml`
# with its weights in `.bin` beside it; and by lcmrt.engines.openvino_int8: that model with int8 weights
OPENVINO = "openvino"
OPENVINO_INT8 = f"{OPENVINO}-{INT8}"
FP16_SUFFIX = f".{FP16}.onnx"
INT8_SUFFIX = f".{INT8}.onnx"
# TensorRT engines: trt/sm<major><minor>-<trt version>/<component>.plan, with the key's timing cache and
# refit bases beside them (lcmrt.backends.engine_keys); ONNX Runtime's TensorRT provider caches its own.
TRT_DIR = "trt"
PLAN_SUFFIX = ".plan"
REFIT_BASE_SUFFIX = ".refit-base.safetensors"
TIMING_CACHE_NAME = "timing.cache"
TRT_CACHE_DIR = "ort-trt-cache"  # TensorRT engines belong to one GPU and version
MAX_NAME_BYTES = 255  # one part of a file name, as ext4, APFS and NTFS allow
# Files already hashed on this machine, keyed by path with (device, inode, size, mtime): a later load only
# stats them. Hashing a full-size folder's 4 GB takes seconds; a modified file gets a new mtime.
VERIFIED_CACHE = Path(os.environ.get("LCMRT_CACHE_DIR", Path.home() / ".cache" / "lcmrt")) / "verified.json"
# Upper bounds of a folder's static shapes: beyond any model lcmrt builds, low enough that a damaged manifest
# cannot make the runtime allocate absurd arrays. Every SD family's VAE scales images by 8 to latents.
SHAPE_LIMITS = {"batch": 64, "height": 8192, "width": 8192, "latent_channels": 64, "latent_height": 1024,
                "latent_width": 1024, "text_length": 1024}
LATENT_SCALE = 8
# Bump when a reader of the previous format would misread a new folder. 2: the UNet's timestep is per sample
# ([unet_batch], was [1]), and shapes may name a stream batch.
FORMAT_VERSION = 2
_HASH_CHUNK = 16 << 20
REBUILD = "Rebuild the folder with `lcmrt build`."
REFIT_FIX = ("Rebuild the folder with `lcmrt build ... --refittable`, or re-add the adapter with "
             "`lcmrt adapter add`.")


def variant_files(component: str, variant: str) -> tuple[str, str]:
    """The graph file of a component's variant and the weight file it may have beside it, e.g. `unet.fp16.onnx`
    and `unet.fp16.onnx.data`; an OpenVINO model's are `unet.openvino.xml` and `unet.openvino.bin`."""
    if variant.split("-")[0] == OPENVINO:
        return f"{component}.{variant}.xml", f"{component}.{variant}.bin"
    return f"{component}.{variant}.onnx", f"{component}.{variant}.onnx.data"


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


def write_manifest(folder: str | Path, manifest: "Manifest | dict") -> Path:
    """Check, then write (or replace) the manifest atomically: readers see the old or the new one, never
    half of one."""
    data = Manifest.of(manifest).validate().data
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | Path) -> "Manifest":
    """The folder's manifest, checked: a folder of another format or of the wrong shape is an EngineFolderError
    that says what is wrong and what to do."""
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
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an integer too long to read
        raise EngineFolderError(f"{path} is not valid JSON ({str(e)[:200]}). "
                                "Rebuild the folder with `lcmrt build`.") from None
    try:  # a lone surrogate ("\\ud800") is valid JSON but no text: it could not be printed or used as a name
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise EngineFolderError(f"{path} holds a string that is not valid Unicode (a lone surrogate escape). "
                                "Rebuild the folder with `lcmrt build`.") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not _KINDS[int][1](version):
        raise EngineFolderError(f"{path} has no integer format_version; it was not written by `lcmrt build`.")
    if version > FORMAT_VERSION:
        raise EngineFolderError(
            f"{folder} was built with engine folder format {version}, but this lcmrt reads format "
            f"{FORMAT_VERSION} at most. Upgrade lcmrt (`pip install -U lcmrt`) or rebuild the folder with this version.")
    return Manifest(data).validate()


def load_manifest(folder: str | Path) -> dict:
    """The checked manifest as its JSON document (for scripts and tests; lcmrt reads `read_manifest`)."""
    return read_manifest(folder).data


def folder_file(folder: str | Path, name: str) -> Path:
    """The path of `name` inside the engine folder, refusing one that leads out of it through a symlink
    (manifest names are already checked to be plain relative names)."""
    folder = Path(folder)
    path = folder / _inside(name, "a file name", REBUILD)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise EngineFolderError(f"{path} is a link to {path.resolve()}, outside the engine folder: lcmrt reads only "
                                f"files inside it. Replace the link with the file itself. {REBUILD}")
    return path


def verify_files(folder: str | Path, hashes: dict[str, str], fix: str = REBUILD) -> None:
    """Check that each file exists inside the folder and hashes to what the build recorded."""
    for name, expected in hashes.items():
        path = folder_file(folder, name)
        if not path.is_file():
            raise EngineFolderError(f"{path} is missing from the engine folder. {fix}")
        if not _matches(path, expected):
            raise EngineFolderError(
                f"{path} does not match the hash recorded at build time: the file was modified or truncated. {fix}")


def verify_component(folder: str | Path, manifest: "Manifest | dict", component: str, variant: str = FP32) -> Path:
    """Check that a component's graph files exist and hash to what the build recorded; return the graph path."""
    graph = Manifest.of(manifest).component(component).graph(variant)
    verify_files(folder, graph.sha256)
    return folder_file(folder, graph.file)


# --- typed, read-only view ------------------------------------------------------------------------------
_REQUIRED = object()
_KINDS = {  # JSON type -> (words for an error, check); bool is not a number in the manifest
    str: ("a string", lambda v: isinstance(v, str)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    dict: ("an object", lambda v: isinstance(v, dict)),
    list: ("a list", lambda v: isinstance(v, list)),
}


def _finite(number: int | float) -> bool:
    """A number that converts to a finite float (a JSON integer may be too large for one)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _error(path: str, problem: str, fix: str) -> EngineFolderError:
    return EngineFolderError(f"{MANIFEST_NAME}: {path} {problem}. {fix}")


def _check(value, kind, path: str, fix: str = REBUILD):
    words, ok = _KINDS[kind]
    if not ok(value):
        raise _error(path, f"is {json.dumps(value)[:60]}, expected {words}", fix)
    return value


def _field(obj: dict, key: str, kind, path: str, default=_REQUIRED, fix: str = REBUILD):
    """obj[key] checked to be of `kind` (`default` where absent and one is given)."""
    _check(obj, dict, path, fix)
    if key not in obj or (obj[key] is None and default is None):
        if default is _REQUIRED:
            raise _error(path, f"has no {key!r}", fix)
        return default
    return _check(obj[key], kind, f"{path}.{key}", fix)


def _list_of(obj: dict, key: str, kind, path: str, default=_REQUIRED, fix: str = REBUILD) -> tuple:
    items = _field(obj, key, list, path, default, fix)
    return tuple(_check(v, kind, f"{path}.{key}[{i}]", fix) for i, v in enumerate(items))


def _inside(name: str, path: str, fix: str) -> str:
    """A file name inside the engine folder: relative, never leaving it, no empty or current-folder parts, each
    part a name the file system can hold (UTF-8, at most 255 bytes)."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or not _storable(p) for p in parts) or "\\" in name or "\0" in name \
            or Path(name).is_absolute():
        raise _error(path, f"is {json.dumps(name)[:80]}, not a plain file name inside the engine folder", fix)
    return name


def _storable(part: str) -> bool:
    try:
        return len(part.encode()) <= MAX_NAME_BYTES
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON) names no file
        return False


def _hashes(obj: dict, key: str, path: str, fix: str = REBUILD) -> dict[str, str]:
    """{file name inside the folder: sha256 hex digest}."""
    hashes = _field(obj, key, dict, path, fix=fix)
    for name, digest in hashes.items():
        _inside(name, f"{path}.{key} key", fix)
        _digest(digest, f"{path}.{key}.{name}", fix)
    return dict(hashes)


def _digest(value, path: str, fix: str = REBUILD) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise _error(path, f"is {json.dumps(value)[:80]}, not a sha256 hex digest", fix)
    return value


def _relative_file(obj: dict, key: str, path: str, default=_REQUIRED, fix: str = REBUILD) -> str | None:
    name = _field(obj, key, str, path, default, fix)
    return None if name is None else _inside(name, f"{path}.{key}", fix)


@dataclass(frozen=True)
class Tensor:
    """A graph input or output: a dimension is a size or the name of a dimension that varies (`dim_values`)."""
    name: str
    shape: tuple
    dtype: str

    @classmethod
    def parse(cls, d, path: str) -> "Tensor":
        shape = _field(d, "shape", list, path)
        for i, n in enumerate(shape):
            if not (_KINDS[int][1](n) or isinstance(n, str)):
                raise _error(f"{path}.shape[{i}]", f"is {json.dumps(n)[:60]}, expected a size or a dimension name",
                             REBUILD)
        return cls(_field(d, "name", str, path), tuple(shape), _field(d, "dtype", str, path))


@dataclass(frozen=True)
class Variant:
    """One graph file of a component (its fp32 graph or a variant) and the files it reads, with their sha256."""
    name: str
    file: str
    sha256: dict
    precision: str
    weight_inputs: tuple[str, ...]  # refit-inputs: the graph weights declared as inputs
    factors: dict  # refit-factors: module -> FactorInputs
    key: dict | None  # ort-cpu: the ONNX Runtime version and CPU the graph was optimized for
    data: dict  # the raw entry: a variant's other fields (fidelity, quantization) are read by its maker

    @classmethod
    def parse(cls, name: str, d, path: str, precision: str) -> "Variant":
        file = _relative_file(d, "file", path)
        hashes = _hashes(d, "sha256", path)
        if file not in hashes:
            raise _error(f"{path}.sha256", f"has no hash of its graph {file!r}", REBUILD)
        factors = {module: FactorInputs.parse(e, f"{path}.factors.{module}")
                   for module, e in _field(d, "factors", dict, path, {}).items()}
        return cls(name, file, hashes, _field(d, "precision", str, path, precision),
                   _list_of(d, "weight_inputs", str, path, ()), factors, _field(d, "key", dict, path, None), d)


@dataclass(frozen=True)
class FactorInputs:
    """The graph inputs of one module's low-rank branch in a refit-factors graph and its total rank R. Layouts:
    Linear down [in, R], up [R, out]; Conv2d down [R, in, kh, kw], up [out, R, 1, 1]."""
    down: str
    up: str
    rank: int

    @classmethod
    def parse(cls, d, path: str) -> "FactorInputs":
        rank = _field(d, "rank", int, path)
        if rank < 1:
            raise _error(f"{path}.rank", f"is {rank}; a low-rank branch has rank >= 1", REBUILD)
        return cls(_field(d, "down", str, path), _field(d, "up", str, path), rank)


@dataclass(frozen=True)
class Component:
    name: str
    graph_fp32: Variant
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    variants: dict  # variant name -> Variant
    data: dict  # the raw entry (parameters, flops, validation, dim_values, source)

    @classmethod
    def parse(cls, name: str, d, path: str) -> "Component":
        graph = Variant.parse(FP32, d, path, FP32)
        variants = _field(d, "variants", dict, path, {})
        return cls(name, graph,
                   tuple(Tensor.parse(t, f"{path}.inputs[{i}]") for i, t in enumerate(_field(d, "inputs", list, path, []))),
                   tuple(Tensor.parse(t, f"{path}.outputs[{i}]") for i, t in enumerate(_field(d, "outputs", list, path, []))),
                   {v: Variant.parse(v, e, f"{path}.variants.{v}", v if v in GRAPH_PRECISIONS else graph.precision)
                    for v, e in variants.items()}, d)

    @property
    def file(self) -> str:
        return self.graph_fp32.file

    @property
    def dim_values(self) -> dict[str, tuple[int, ...]]:
        """Dimension name -> the sizes it takes (the UNet's batch: with and without guidance)."""
        path = f"components.{self.name}.dim_values"
        values = _field(self.data, "dim_values", dict, f"components.{self.name}", {})
        values = {d: _list_of(values, d, int, path) for d in values}
        named = {d for t in (*self.inputs, *self.outputs) for d in t.shape if isinstance(d, str)}
        missing = sorted(named - {d for d, sizes in values.items() if sizes})
        if missing:
            raise _error(path, f"lacks the sizes of {', '.join(missing)}", REBUILD)
        return values

    @property
    def precision(self) -> str:
        return self.graph_fp32.precision

    def graph(self, variant: str = FP32) -> Variant:
        """The graph of `variant` where one was built, else the fp32 graph."""
        return self.graph_fp32 if variant == FP32 else self.variants.get(variant, self.graph_fp32)

    def number(self, key: str) -> float | None:
        """An optional statistic of the export (parameters, flops)."""
        return _field(self.data, key, float, f"components.{self.name}", None)


# Names of the graph dimensions that follow the image size in a folder built for several sizes.
HEIGHT, WIDTH, LATENT_HEIGHT, LATENT_WIDTH = "height", "width", "latent_height", "latent_width"
MAX_SIZES = 16  # sizes of one folder: SDXL's training buckets and their transposes are 7


def size_dims(height: int, width: int) -> dict[str, int]:
    """The size-dependent graph dimensions of an image size."""
    return {HEIGHT: height, WIDTH: width, LATENT_HEIGHT: height // LATENT_SCALE, LATENT_WIDTH: width // LATENT_SCALE}


def with_size_dims(dims: dict[str, int]) -> dict[str, int]:
    """`dims` (named dimension -> size) plus the size dimensions that follow from them: an image's height from
    its latents' and back, as a graph's outputs (the VAE decoder's image) follow its inputs."""
    dims = dict(dims)
    for image, latent in ((HEIGHT, LATENT_HEIGHT), (WIDTH, LATENT_WIDTH)):
        if latent in dims:
            dims.setdefault(image, dims[latent] * LATENT_SCALE)
        if image in dims:
            dims.setdefault(latent, dims[image] // LATENT_SCALE)
    return dims


@dataclass(frozen=True)
class Shapes:
    """The static shape profiles: one image batch at each of the folder's sizes (the first is the default, and
    `height`/`width` are its); the UNet also runs twice the batch with CFG."""
    batch: int
    height: int
    width: int
    latent_channels: int
    latent_height: int
    latent_width: int
    text_length: int
    unet_batch_sizes: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]  # (height, width) of every size the folder serves
    stream_batch: int | None = None  # samples of a stream's staggered UNet call (`lcmrt build --stream-batch`)

    @classmethod
    def parse(cls, d) -> "Shapes":
        ints = {f.name: _field(d, f.name, int, "shapes") for f in fields(cls)
                if f.name not in ("unet_batch_sizes", "sizes", "stream_batch")}
        stream = _field(d, "stream_batch", int, "shapes", None)
        if stream is not None and not 1 <= stream <= SHAPE_LIMITS["batch"]:
            raise _error("shapes.stream_batch", f"is {stream}, outside 1..{SHAPE_LIMITS['batch']}", REBUILD)
        unet = _list_of(d, "unet_batch_sizes", int, "shapes")
        for name, value in (*ints.items(), *((f"unet_batch_sizes[{i}]", n) for i, n in enumerate(unet))):
            top = SHAPE_LIMITS.get(name, SHAPE_LIMITS["batch"] * 2 if name.startswith("unet") else None)
            if not 1 <= value <= top:
                raise _error(f"shapes.{name}", f"is {value}, outside 1..{top}", REBUILD)
        default = (ints["height"], ints["width"])
        sizes = tuple(_size(pair, f"shapes.sizes[{i}]")
                      for i, pair in enumerate(_field(d, "sizes", list, "shapes", [list(default)])))
        if not 1 <= len(sizes) <= MAX_SIZES or sizes[0] != default or len(set(sizes)) != len(sizes):
            raise _error("shapes.sizes", f"is {[list(s) for s in sizes][:MAX_SIZES + 1]}; expected 1 to {MAX_SIZES} "
                                         f"different [height, width] pairs, the first {list(default)}", REBUILD)
        shapes = cls(**ints, unet_batch_sizes=unet, sizes=sizes, stream_batch=stream)
        if (shapes.latent_height * LATENT_SCALE, shapes.latent_width * LATENT_SCALE) != (shapes.height, shapes.width):
            raise _error("shapes", f"has latents {shapes.latent_height}x{shapes.latent_width} for a "
                                   f"{shapes.height}x{shapes.width} image (the VAE scales by {LATENT_SCALE})", REBUILD)
        batches = {shapes.batch, stream or shapes.batch}
        if not unet or not set(unet) <= {k * b for b in batches for k in (1, 2)}:
            raise _error("shapes.unet_batch_sizes", f"is {list(unet)}; a batch of {shapes.batch} runs the UNet at "
                                                    f"{shapes.batch} and, with guidance, {2 * shapes.batch}"
                                                    + (f" (a stream batch of {stream}: {stream} and {2 * stream})"
                                                       if stream else ""), REBUILD)
        return shapes

    def at(self, height: int, width: int) -> "Shapes":
        """The profile at `height` x `width`, which the caller has checked is one of `sizes`."""
        return replace(self, height=height, width=width, latent_height=height // LATENT_SCALE,
                       latent_width=width // LATENT_SCALE)

    @property
    def size_names(self) -> str:
        """The folder's sizes as WIDTHxHEIGHT, for messages."""
        return ", ".join(f"{w}x{h}" for h, w in self.sizes)


def _size(pair, path: str) -> tuple[int, int]:
    if not (isinstance(pair, list) and len(pair) == 2 and all(_KINDS[int][1](n) for n in pair)):
        raise _error(path, f"is {json.dumps(pair)[:60]}, expected [height, width]", REBUILD)
    for name, value in zip((HEIGHT, WIDTH), pair):
        if not (1 <= value <= SHAPE_LIMITS[name] and value % LATENT_SCALE == 0):
            raise _error(path, f"has {name} {value}, not a multiple of {LATENT_SCALE} in 8..{SHAPE_LIMITS[name]}",
                         REBUILD)
    return tuple(pair)


@dataclass(frozen=True)
class Adapter:
    """A LoRA of the folder: fused into the graphs at `weight`, or refittable from its pack."""
    name: str
    weight: float
    fused: bool
    targets: tuple[str, ...]  # modules it changes (refittable adapters: keys of the refit map)
    pack: str | None  # adapters/NAME.safetensors, refittable adapters only
    pack_sha256: str | None
    data: dict  # the raw record (role, path, format, modules, ranks)

    @classmethod
    def parse(cls, d, path: str) -> "Adapter":
        fused = _field(d, "fused", bool, path, fix=REFIT_FIX)
        name = _field(d, "name", str, path, fix=REFIT_FIX)
        if problem := adapter_name_problem(name):
            raise _error(f"{path}.name", problem, REFIT_FIX)
        pack = _relative_file(d, "pack", path, None, REFIT_FIX)
        digest = None if pack is None else _digest(_field(d, "pack_sha256", str, path, fix=REFIT_FIX),
                                                   f"{path}.pack_sha256", REFIT_FIX)
        return cls(name, float(_field(d, "weight", float, path, fix=REFIT_FIX)), fused,
                   _list_of(d, "targets", str, path, (), REFIT_FIX), pack, digest, d)


MAX_ADAPTER_NAME = 100


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter (it names its pack file and appears in `NAME:WEIGHT` options), or None."""
    if not 0 < len(name) <= MAX_ADAPTER_NAME:
        return f"is {len(name)} characters long; an adapter name has 1 to {MAX_ADAPTER_NAME}"
    if not (name[0].isalnum() or name[0] == "_") or not all(c.isalnum() or c in "_.+- " for c in name):
        return (f"is {name!r}; an adapter name starts with a letter, digit or _ and has only letters, digits, "
                "spaces and _ . + -")
    return None


@dataclass(frozen=True)
class RefitEntry:
    """Where a LoRA module's weight lives in a graph: the initializer, whether the exporter stored it
    transposed, and (for the runtime's pristine base) its bytes in the graph's external data."""
    module: str
    component: str
    weight: str
    transpose: bool
    shape: tuple[int, ...] | None = None  # the module's weight shape (before any transpose)
    file: str | None = None
    offset: int | None = None
    length: int | None = None
    dtype: str | None = None
    file_sha256: str | None = None  # of `file`, as the component's graph records it

    @classmethod
    def parse(cls, module: str, d, components: dict) -> "RefitEntry":
        path = f"refit_map.{module}"
        component = _field(d, "component", str, path, fix=REFIT_FIX)
        if component not in components:
            raise _error(f"{path}.component", f"is {component!r}, which is not a component of the folder", REFIT_FIX)
        entry = cls(module, component, _field(d, "weight", str, path, fix=REFIT_FIX),
                    _field(d, "transpose", bool, path, fix=REFIT_FIX))
        if not entry.weight:
            raise _error(f"{path}.weight", "names no graph weight", REFIT_FIX)
        file = _relative_file(d, "file", path, None, REFIT_FIX)
        if file is None:
            return entry  # a map without locations (TensorRT refit reads the weights from the graph)
        graph_files = _hashes(components[component], "sha256", f"components.{component}")
        if file not in graph_files:
            raise _error(f"{path}.file", f"is {file!r}, which is not a file of the {component} graph", REFIT_FIX)
        shape = _list_of(d, "shape", int, path, fix=REFIT_FIX)
        dtype = _field(d, "dtype", str, path, fix=REFIT_FIX)
        offset, length = _field(d, "offset", int, path, fix=REFIT_FIX), _field(d, "length", int, path, fix=REFIT_FIX)
        if dtype not in REFIT_DTYPES or not 1 <= len(shape) <= 4 or min(shape) < 1 or offset < 0 \
                or length != math.prod(shape) * REFIT_DTYPES[dtype]:
            raise _error(path, f"locates a {dtype} weight of shape {list(shape)} at bytes {offset}+{length}, which "
                               "is not a weight's layout", REFIT_FIX)
        return cls(module, component, entry.weight, entry.transpose, shape, file, offset, length, dtype,
                   graph_files[file])


REFIT_DTYPES = {"float32": 4, "float16": 2}  # element sizes of the weights a refit map locates


@dataclass(frozen=True)
class Engine:
    """A built TensorRT engine: the GPU and TensorRT version it runs on and the graph it was built from."""
    backend: str
    component: str
    file: str
    sha256: str
    compute_capability: str
    backend_version: str
    precision: str
    source_file: str
    source_sha256: str
    refit_base: str | None  # an engine with refittable weights: their pristine values (safetensors)
    refit_base_sha256: str | None
    data: dict

    @classmethod
    def parse(cls, d, path: str) -> "Engine":
        cmd = "Rebuild the engines with `lcmrt build --engines-only FOLDER --backend tensorrt`."
        device, source = _field(d, "device", dict, path, fix=cmd), _field(d, "source", dict, path, fix=cmd)
        refit = _field(d, "refit", dict, path, None, cmd)
        return cls(_field(d, "backend", str, path, fix=cmd), _field(d, "component", str, path, fix=cmd),
                   _relative_file(d, "file", path, fix=cmd), _digest(_field(d, "sha256", str, path, fix=cmd),
                                                                      f"{path}.sha256", cmd),
                   _field(device, "compute_capability", str, f"{path}.device", fix=cmd),
                   _field(d, "backend_version", str, path, fix=cmd), _field(d, "precision", str, path, FP32, cmd),
                   _relative_file(source, "file", f"{path}.source", fix=cmd),
                   _field(source, "sha256", str, f"{path}.source", fix=cmd),
                   None if refit is None else _relative_file(refit, "base", f"{path}.refit", fix=cmd),
                   None if refit is None else _digest(_field(refit, "sha256", str, f"{path}.refit", fix=cmd),
                                                      f"{path}.refit.sha256", cmd), d)


CHOICE_FIX = "Measure again with `lcmrt build --engines-only FOLDER --choose-backends`."


@dataclass(frozen=True)
class ComponentChoice:
    """The CPU backend a component runs on under backend "auto", and what the build measured per backend:
    seconds per run (median), time over ONNX Runtime's (median of per-round ratios), the largest difference
    from ONNX Runtime's output and the resident memory its session added."""
    backend: str
    seconds: dict[str, float]
    ratios: dict[str, float]
    max_abs_diff: dict[str, float]
    resident_bytes: dict[str, float]  # memory a loaded session added


@dataclass(frozen=True)
class BackendChoice:
    """The build's choice of CPU backend per component (`lcmrt.engines.backend_choice`): valid on a CPU of the
    class it was measured on (`lcmrt.cpu.cpu_class`)."""
    cpu: dict  # machine, model, isa
    components: dict[str, ComponentChoice]
    data: dict  # the raw entry: versions, runs, threads are shown by `lcmrt info`

    @classmethod
    def parse(cls, d, components: dict) -> "BackendChoice":
        path, fix = "backend_choice", CHOICE_FIX
        cpu = _field(d, "cpu", dict, path, fix=fix)
        chosen = {}
        for name, entry in _field(d, "components", dict, path, fix=fix).items():
            where = f"{path}.components.{name}"
            if name not in components:
                raise _error(where, "names no component of this folder", fix)
            seconds = {b: _check(v, float, f"{where}.seconds.{b}", fix)
                       for b, v in _field(entry, "seconds", dict, where, fix=fix).items()}
            ratios, diffs = ({b: _check(v, float, f"{where}.{key}.{b}", fix)
                              for b, v in _field(entry, key, dict, where, {}, fix).items()}
                             for key in ("ratios", "max_abs_diff"))
            held = {b: _check(v, float, f"{where}.resident_bytes.{b}", fix)
                    for b, v in _field(entry, "resident_bytes", dict, where, {}, fix).items()}
            backend = _field(entry, "backend", str, where, fix=fix)
            if backend not in seconds:
                raise _error(f"{where}.backend", f"is {backend!r}, which the build did not measure", fix)
            chosen[name] = ComponentChoice(backend, seconds, ratios, diffs, held)
        return cls(cpu, chosen, d)


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # the tokenizer folder
    file: str  # tokenizer/tokenizer.json: the one file the runtime's tokenizer reads
    sha256: str
    max_length: int
    pad_token_id: int


class Manifest:
    """Typed access to a manifest's parts, each checked where it is read: a part of the wrong shape is an
    EngineFolderError naming the key and the fix. `data` is the JSON document itself, written unchanged."""

    def __init__(self, data: dict):
        self.data = _check(data, dict, "the document")

    @classmethod
    def of(cls, manifest: "Manifest | dict") -> "Manifest":
        return manifest if isinstance(manifest, Manifest) else cls(manifest)

    def __getitem__(self, key: str):
        """The raw JSON of a top-level key, for scripts; lcmrt's own code reads the typed properties."""
        return self.data[key]

    def validate(self) -> "Manifest":
        """Read every part once, so that a folder of the wrong shape fails on load, not mid-generation."""
        _field(self.data, "format_version", int, "the document")
        _ = (self.family, self.guidance_mode, self.shapes, self.scheduler_config, self.tokenizers,
             self.force_zeros_for_empty_prompt,
             self.vae_scaling_factor, self.adapters, self.refit_map, self.engines, self.refittable, self.model_configs,
             [component.dim_values for component in self.components.values()])
        return self

    @property
    def family(self) -> str:
        return self.family_info.name

    @property
    def family_info(self):
        """The folder's model family (lcmrt.families.Family): its components and how prompts condition the UNet."""
        from .families import FAMILIES

        name = _field(self.data, "family", str, "the document")
        if name not in FAMILIES:
            raise _error("family", f"is {json.dumps(name)[:60]}, a model family this lcmrt does not know "
                                   f"({', '.join(FAMILIES)})", "Upgrade lcmrt, or rebuild the folder with this version.")
        return FAMILIES[name]

    @property
    def guidance_mode(self) -> str:
        return _field(self.data, "guidance_mode", str, "the document")

    @property
    def shapes(self) -> Shapes:
        return Shapes.parse(_field(self.data, "shapes", dict, "the document"))

    @property
    def scheduler_config(self) -> dict:
        return _field(_field(self.data, "scheduler", dict, "the document"), "config", dict, "scheduler")

    @property
    def tokenizer(self) -> TokenizerInfo:
        """The first text encoder's tokenizer."""
        return self._tokenizer_info(TOKENIZER_DIR)

    @property
    def tokenizers(self) -> dict[str, TokenizerInfo]:
        """{text encoder component: its tokenizer}, for every text encoder of the folder's family."""
        from .families import tokenizer_key

        return {encoder: self._tokenizer_info(tokenizer_key(encoder)) for encoder in self.family_info.text_encoders}

    def _tokenizer_info(self, key: str) -> TokenizerInfo:
        tok = _field(self.data, key, dict, "the document")
        folder = _relative_file(tok, "path", key)
        file = f"{folder}/{TOKENIZER_FILE}"
        hashes = _hashes(tok, "sha256", key)
        if file not in hashes:
            raise _error(f"{key}.sha256", f"has no hash of {file!r}", REBUILD)
        max_length, pad = _field(tok, "max_length", int, key), _field(tok, "pad_token_id", int, key)
        if not 2 <= max_length <= SHAPE_LIMITS["text_length"] or pad < 0:
            raise _error(key, f"has max_length {max_length} and pad_token_id {pad}; expected 2.."
                              f"{SHAPE_LIMITS['text_length']} and a token id", REBUILD)
        return TokenizerInfo(folder, file, hashes[file], max_length, pad)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL's rule: with guidance and an empty negative prompt, the negative conditioning is zeros."""
        return _field(_field(self.data, "conditioning", dict, "the document", {}), "force_zeros_for_empty_prompt",
                      bool, "conditioning", False)

    @property
    def vae_scaling_factor(self) -> float:
        return _field(_field(self.data, "vae", dict, "the document"), "scaling_factor", float, "vae")

    @property
    def components(self) -> dict[str, Component]:
        return {name: Component.parse(name, entry, f"components.{name}")
                for name, entry in _field(self.data, "components", dict, "the document").items()}

    def component(self, name: str) -> Component:
        components = _field(self.data, "components", dict, "the document")
        if name not in components:
            raise EngineFolderError(f"The engine folder has no {name!r} component (it has "
                                    f"{', '.join(components) or 'none'}). {REBUILD}")
        return Component.parse(name, components[name], f"components.{name}")

    def dims(self, component: str, size: tuple[int, int] | None = None) -> dict[str, int]:
        """Values of a component's named dimensions at one of the folder's sizes (default: the first), with a
        varying batch at its largest: the shapes a graph is validated and measured at."""
        values = self.component(component).dim_values
        dims = {**{d: max(v) for d, v in values.items()}, **size_dims(*(size or self.shapes.sizes[0]))}
        return {d: dims[d] for d in values}

    @property
    def adapters(self) -> tuple[Adapter, ...]:
        return tuple(Adapter.parse(a, f"adapters[{i}]")
                     for i, a in enumerate(_field(self.data, "adapters", list, "the document", [], REFIT_FIX)))

    @property
    def refittable(self) -> bool:
        return _field(self.data, "refittable", bool, "the document", False)

    @property
    def refit_map(self) -> dict[str, RefitEntry]:
        """LoRA module -> where its weight lives; empty for a folder built without --refittable."""
        refit_map = _field(self.data, "refit_map", dict, "the document", {}, REFIT_FIX)
        components = _field(self.data, "components", dict, "the document") if refit_map else {}
        return {module: RefitEntry.parse(module, entry, components) for module, entry in refit_map.items()}

    @property
    def model_configs(self) -> dict | None:
        """The UNet and text encoder configs of a refittable folder (`lcmrt adapter add` rebuilds the modules)."""
        return _field(self.data, "model_configs", dict, "the document", None, REFIT_FIX)

    @property
    def refit_components(self) -> set[str]:
        """Components whose weights may be refit at run time (any adapter added later may target them)."""
        return {entry.component for entry in self.refit_map.values()}

    @property
    def engines(self) -> tuple[Engine, ...]:
        return tuple(Engine.parse(e, f"engines[{i}]")
                     for i, e in enumerate(_field(self.data, "engines", list, "the document", [])))

    @property
    def backend_choice(self) -> BackendChoice | None:
        """The CPU backend per component that the build measured fastest, or None (not measured)."""
        entry = _field(self.data, "backend_choice", dict, "the document", None, CHOICE_FIX)
        return None if entry is None else BackendChoice.parse(entry, self.components)

    # --- producers: the build stage edits a manifest through these, then writes it --------------------
    def set_variant(self, component: str, name: str, entry: dict) -> None:
        self.component(component).data.setdefault("variants", {})[name] = entry

    def drop_variant(self, component: str, name: str) -> None:
        self.component(component).data.get("variants", {}).pop(name, None)

    def add_adapter(self, record: dict) -> None:
        self.data.setdefault("adapters", []).append(record)

    def set_engines(self, entries: list[dict]) -> None:
        self.data["engines"] = list(entries)

    def set_backend_choice(self, entry: dict) -> None:
        self.data["backend_choice"] = entry
