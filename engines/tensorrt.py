"""TensorRT engine builder: one engine per component, FP16, refittable where adapters need it.

The chain for each component: ONNX graph (fp16 from `lcmrt.engines.fp16`, or fp32) -> parse -> mark the
refit map's weights refittable -> build with a persistent timing cache and a capped workspace ->
`trt/<sm>-<version>/<component>.plan` plus the pristine values of its refittable weights
(`<component>.refit-base.safetensors`, so adapter refits always start from the base weights).

What depends on the TensorRT version is decided by pure functions (`build_options`, `parse_size`,
`refit_targets`), tested on the CPU with version strings; the code that touches TensorRT stays thin and
imports it lazily. Facts it relies on (TensorRT 10.x/11.x Python API):
- 11.x is always strongly typed and has no FP16 builder flag: precision comes from the ONNX dtypes. 10.x
  takes the STRONGLY_TYPED network flag for an fp16 graph, or the (deprecated since 10.12) FP16 flag for an
  fp32 graph; precision flags are not allowed together with strong typing.
- REFIT_INDIVIDUAL (10.2+) leaves every weight non-refittable except those marked with
  `network.mark_weights_refittable(name)`, so layers without adapters keep full speed; it cannot be combined
  with REFIT. Before 10.2 only REFIT (the whole engine) exists.
- The ONNX parser names weights after their initializers; `parse_from_file` resolves external data next to
  the graph file.
- A graph with varying dimensions needs optimization profiles (`add_optimization_profile`): a folder of
  several sizes gets one per size, each fixing the size (and ranging over the UNet batches of a cfg folder),
  all in one engine with one set of weights (`extra_memory_target` 0 on the other profiles: no extra
  weight space for them), so a refit updates every size at once. The runtime picks a profile per run
  (`set_optimization_profile_async`).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.engine_keys import (EngineKey, engine_entry, rebuild_command, replace_engine_entries,
                                    source_graph)
from ..errors import BackendError, EngineFolderError, InputError
from ..families import ON_DEMAND_COMPONENTS
from ..folder_update import commit
from ..manifest import FP16, FP32, Manifest, file_sha256, read_manifest, size_dims

MIN_TRT = (10, 0)  # execute_async_v3 / named tensors / build_serialized_network only (GPU-NOTES.md, section 0)
REFIT_INDIVIDUAL_SINCE = (10, 2)
STRONG_TYPING_ALWAYS_SINCE = (11, 0)
# Components the runtime loads; the VAE encoder only serves img2img and is built on request.
# Workspace cap when none is given: enough for SD1.5 UNet tactics at 512x512 while leaving an 8 GB card
# room for the engines themselves; Jetson users should pass a smaller one (README, "Jetson").
DEFAULT_WORKSPACE = 2 << 30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_trt_version(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a TensorRT version string such as "10.3.0" or "11.4.0.106"."""
    parts = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if not parts:
        raise BackendError(f"Cannot read TensorRT version {version!r}.")
    return tuple(int(p) for p in parts.groups(default="0"))


def parse_size(text: str | int | None, default: int = DEFAULT_WORKSPACE) -> int:
    """Bytes from "4G", "512M", "1.5GiB" or an int; None gives `default`."""
    if text is None:
        return default
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise InputError(f"Memory size {text!r} is not a number with an optional unit K, M, G or T "
                             "(e.g. 2G, 512M).")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise InputError(f"Memory size {text!r} must be positive.")
    return value


@dataclass(frozen=True)
class BuildOptions:
    """Which TensorRT switches a build uses: names, so that tests need no TensorRT."""

    strongly_typed_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x; ignored on 11)
    builder_flags: tuple[str, ...]  # BuilderFlag names
    mark_individual: bool  # call network.mark_weights_refittable per target name
    precision: str  # what the engine computes in: "fp16" or "fp32"
    notes: tuple[str, ...] = ()


def build_options(trt_version: str, graph_precision: str, refittable: bool, fp16_flag: bool = True) -> BuildOptions:
    """The flags for building a `graph_precision` ("fp16" or "fp32") ONNX graph with TensorRT `trt_version`.
    `fp16_flag=False` keeps an fp32 graph in fp32 on TensorRT 10 too (the VAE decoder, see lcmrt.engines.fp16)."""
    version = parse_trt_version(trt_version)
    if version[:2] < MIN_TRT:
        raise BackendError(f"TensorRT {trt_version} is too old: lcmrt needs TensorRT {'.'.join(map(str, MIN_TRT))} "
                           "or newer (`pip install -U tensorrt`; on Jetson, JetPack 6.1+).")
    if graph_precision not in ("fp16", "fp32"):
        raise InputError(f"graph precision {graph_precision!r} is not fp16 or fp32.")
    flags, notes = [], []
    if version[:2] >= STRONG_TYPING_ALWAYS_SINCE:
        strongly_typed, precision = False, graph_precision  # always strongly typed; the flag is ignored
        if graph_precision == "fp32":
            notes.append(f"TensorRT {trt_version} has no FP16 flag: an fp32 graph builds an fp32 engine. "
                         "Convert the graphs with --fp16 first.")
    elif graph_precision == "fp16":
        strongly_typed, precision = True, "fp16"  # keeps the graph's fp32 islands as written
    elif not fp16_flag:
        strongly_typed, precision = True, "fp32"
    else:
        strongly_typed, precision = False, "fp16"
        flags.append("FP16")  # TensorRT picks per-layer precision; deprecated since 10.12, gone in 11
    mark = False
    if refittable:
        if version[:2] >= REFIT_INDIVIDUAL_SINCE:
            flags.append("REFIT_INDIVIDUAL")
            mark = True
        else:
            flags.append("REFIT")
            notes.append(f"TensorRT {trt_version} has no REFIT_INDIVIDUAL: every weight is refittable, "
                         "which can cost speed. TensorRT 10.2+ limits refit to the adapter weights.")
    return BuildOptions(strongly_typed, tuple(flags), mark, precision, tuple(notes))


def refit_targets(manifest: Manifest | dict, component: str) -> list[str]:
    """Graph weights of `component` that the folder's swappable adapters touch, in a stable order.

    The refit map covers every Linear/Conv2d weight (so `lcmrt adapter add` can take any LoRA on ONNX
    Runtime), but only the weights adapters target are marked refittable, so that TensorRT keeps full speed
    on the rest; an adapter added later that touches other weights needs `lcmrt build --engines-only`.
    """
    manifest = Manifest.of(manifest)
    targeted = {m for a in manifest.adapters if not a.fused for m in a.targets}
    return sorted({e.weight for m, e in manifest.refit_map.items() if e.component == component and m in targeted})


def check_refit_targets(names: list[str], initializers: dict[str, object]) -> dict[str, list[str]]:
    """Sort refit targets into those the graph has, and the ones it does not, with the usual causes
    separated: PEFT wrapper names (`base_layer`, `lora_A`) that leaked into the map, and names the graph
    lost (constant folding renames a weight it transposes)."""
    found = [n for n in names if n in initializers]
    peft = [n for n in names if n not in initializers and re.search(r"\.(base_layer|lora_[AB]|lora_up|lora_down)\b", n)]
    missing = [n for n in names if n not in initializers and n not in peft]
    return {"found": found, "peft_names": peft, "missing": missing}


@dataclass
class BuildReport:
    component: str
    plan: Path
    seconds: float
    marked: list[str] = field(default_factory=list)
    not_marked: list[str] = field(default_factory=list)  # mark_weights_refittable returned False
    refittable: list[str] = field(default_factory=list)  # Refitter.get_all_weights() of the built engine
    notes: list[str] = field(default_factory=list)


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(
            f"TensorRT is not installed ({e}). Install the GPU extra on the machine with the GPU: "
            '`pip install "lcmrt[gpu]"` (Jetson: use JetPack\'s python3-libnvinfer).') from None
    return trt


def build_engine(onnx_path: Path, plan_path: Path, timing_cache: Path, options: BuildOptions,
                 refit_names: list[str] = (), workspace: int = DEFAULT_WORKSPACE,
                 optimization_level: int | None = None, profiles: list[dict[str, tuple]] = (),
                 verbose: bool = False) -> BuildReport:
    """Build one engine from `onnx_path` into `plan_path` (written atomically). `profiles`: one optimization
    profile per size of the folder, each {input name: (min, opt, max) shapes} for the inputs with a varying
    dimension (the size, the UNet batch of a cfg folder); none for a static graph."""
    trt = _import_trt()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if options.strongly_typed_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (`.onnx.data`) relative to the graph file
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    report = BuildReport(component=plan_path.stem, plan=plan_path, seconds=0.0, notes=list(options.notes))
    if options.mark_individual:
        for name in refit_names:
            (report.marked if network.mark_weights_refittable(name) else report.not_marked).append(name)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    for flag in options.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for i, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if i:  # the other sizes share the first profile's weights: one copy in the plan and on the GPU
            profile.extra_memory_target = 0.0
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)  # (cache, ignore_mismatch)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} (see the log above). If it ran out of "
                           "memory, lower --workspace.")
    _write_atomic(plan_path, plan)
    _write_atomic(timing_cache, config.get_timing_cache().serialize())

    if options.builder_flags and any(f.startswith("REFIT") for f in options.builder_flags):
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        report.refittable = sorted(trt.Refitter(engine, logger).get_all_weights())
    report.seconds = time.perf_counter() - start
    return report


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def save_refit_base(onnx_path: Path, names: list[str], out: Path) -> list[str]:
    """Store the graph's values of `names` (the engine's refittable weights) in a safetensors file;
    return the names the graph does not hold as initializers (weights the parser made up)."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    model = onnx.load(str(onnx_path), load_external_data=True)
    wanted = set(names)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    save_file({k: v.copy() for k, v in tensors.items()}, str(out))
    return sorted(wanted - set(tensors))


def current_key(device_id: int = 0) -> EngineKey:
    trt = _import_trt()
    from ..backends.tensorrt import gpu_compute_capability

    return EngineKey(gpu_compute_capability(device_id), trt.__version__)


def build_engines(folder: str | Path, components: tuple[str, ...] | None = None, precision: str = "fp16",
                  workspace: int | str | None = None, optimization_level: int | None = None,
                  device_id: int = 0, key: EngineKey | None = None, fp16_flag_for_fp32_graphs: bool = False,
                  log=print) -> list[dict]:
    """Build the TensorRT engines of an engine folder on this GPU and record them in its manifest.

    `precision` "fp16" builds from the folder's fp16 graphs (made by `lcmrt.engines.fp16.convert_folder`),
    falling back to an fp32 engine for a component that has none, such as the VAE decoder (or, with
    `fp16_flag_for_fp32_graphs` on TensorRT 10, letting TensorRT choose fp16 layers in it). Returns the new
    manifest entries.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    graphs = manifest.components
    if components is None:  # what generations run, with the image encoders and the tiny VAE where present
        components = (*manifest.family_info.components, *(c for c in ON_DEMAND_COMPONENTS if c in graphs))
    key = key or current_key(device_id)
    trt_version = key.trt_version
    (folder / key.dirname).mkdir(parents=True, exist_ok=True)
    timing_cache = folder / key.timing_cache_path
    workspace = parse_size(workspace)
    entries = []
    for component in components:
        if component not in graphs:
            raise EngineFolderError(f"{folder} has no {component!r} graph to build an engine from.")
        graph_precision = precision
        if precision == FP16 and FP16 not in graphs[component].variants:
            graph_precision = FP32  # no fp16 graph (the VAE decoder by default): an fp32 engine
        graph_file, graph_sha = source_graph(manifest, component, graph_precision)
        targets = refit_targets(manifest, component)
        options = build_options(trt_version, graph_precision, refittable=bool(targets),
                                fp16_flag=fp16_flag_for_fp32_graphs)
        profiles = optimization_profiles(manifest, component)
        plan_path = folder / key.plan_path(component)
        log(f"building {component} from {graph_file} ({options.precision}, flags: "
            f"{', '.join(options.builder_flags) or 'none'})")
        report = build_engine(folder / graph_file, plan_path, timing_cache, options, targets, workspace,
                              optimization_level, profiles)
        extra = {"sizes": [list(size) for size in manifest.shapes.sizes], "build": {"seconds": round(report.seconds, 1), "workspace_bytes": workspace,
                           "flags": list(options.builder_flags), "strongly_typed": options.strongly_typed_flag
                           or parse_trt_version(trt_version)[:2] >= STRONG_TYPING_ALWAYS_SINCE,
                           "notes": report.notes}}
        if targets:
            base = folder / key.refit_base_path(component)
            unmatched = save_refit_base(folder / graph_file, report.refittable, base)
            extra["refit"] = {"base": key.refit_base_path(component), "sha256": file_sha256(base),
                              "marked": len(report.marked),
                              "not_marked": report.not_marked, "refittable": len(report.refittable),
                              "not_in_graph": unmatched}
            if report.not_marked:
                log(f"warning: {len(report.not_marked)} refit-map weights of {component} could not be marked "
                    f"refittable: {', '.join(report.not_marked[:5])}{', ...' if len(report.not_marked) > 5 else ''}")
        entries.append(engine_entry(key, component, graph_file, graph_sha, file_sha256(plan_path),
                                    options.precision, **extra))
    manifest.set_engines(replace_engine_entries([e.data for e in manifest.engines], entries))
    commit(folder, manifest)
    return entries


def optimization_profiles(manifest: Manifest, component: str) -> list[dict[str, tuple]]:
    """One optimization profile per size of the folder for a graph with varying dimensions ([] for a static
    one): each input with a named dimension at that size, its batch from the smallest to the largest (opt =
    max, the batch a cfg folder runs)."""
    values = manifest.component(component).dim_values
    if not values:
        return []
    profiles = []
    for size in manifest.shapes.sizes:
        at = manifest.dims(component, size)  # the size's dimensions, batches at their largest
        profile = {}
        for spec in manifest.component(component).inputs:
            if any(isinstance(d, str) for d in spec.shape):
                hi = tuple(at[d] if isinstance(d, str) else d for d in spec.shape)
                lo = tuple(min(values[d]) if d in values and d not in size_dims(*size) else n
                           for d, n in zip(spec.shape, hi))
                profile[spec.name] = (lo, hi, hi)
        if profile not in profiles:
            profiles.append(profile)
    return profiles


__all__ = ["BuildOptions", "BuildReport", "build_engine", "build_engines", "build_options", "check_refit_targets",
           "optimization_profiles",
           "parse_size", "parse_trt_version", "rebuild_command", "refit_targets", "save_refit_base"]
