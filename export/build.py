"""`lcmrt build`: load a model, fuse LCM-LoRA and style LoRAs, export and validate every graph, and write
the engine folder atomically (into a hidden sibling folder, renamed into place only when complete)."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..engines.build import EngineRequest, add_engines, check_engine_request
from ..errors import InputError
from ..families import get_family, tokenizer_key
from ..manifest import FORMAT_VERSION, LATENT_SCALE, MANIFEST_NAME, MAX_SIZES, SHAPE_LIMITS, write_manifest
from ..progress import Stages

GUIDANCE_MODES = ("none", "cfg")
_VERSIONED = ("torch", "diffusers", "peft", "transformers", "onnx", "onnxruntime")


@dataclass
class BuildRequest:
    model: str
    out: Path
    lcm_lora: object  # lcmrt.export.lora.LoraSpec with role "lcm"; None for a distilled LCM model
    loras: list = field(default_factory=list)  # style LoraSpecs
    height: int = 512
    width: int = 512
    sizes: list = field(default_factory=list)  # [(height, width), ...]: several sizes, the first the default
    batch: int = 1
    guidance_mode: str = "none"
    config: str | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    refittable: bool = False  # keep style LoRAs unfused, swappable at run time
    refittable_lcm: bool = False  # keep the LCM-LoRA unfused too
    vae_decoder: Path | None = None  # an AutoencoderTiny folder (TAESD) to decode with instead of the model's VAE
    tiny_vae: Path | None = None  # an AutoencoderTiny folder whose encoder and decoder go in as extra components
    stream_batch: int | None = None  # also a UNet batch of this many samples at staggered timesteps (streams)
    # built on top of the ONNX graphs: pre-optimized CPU graphs (on by default), fp16, int8, TensorRT engines
    engines: EngineRequest = field(default_factory=EngineRequest)

    def __post_init__(self):
        self.out = Path(self.out)
        self.sizes = [tuple(size) for size in self.sizes] or [(self.height, self.width)]
        self.height, self.width = self.sizes[0]

    @property
    def keeps_refit_map(self) -> bool:
        return self.refittable or self.refittable_lcm

    def is_refittable(self, spec) -> bool:
        return self.refittable_lcm if spec.role == "lcm" else self.refittable

    @property
    def all_loras(self) -> list:
        """The LCM-LoRA (if any) and the style LoRAs."""
        return [spec for spec in (self.lcm_lora, *self.loras) if spec is not None]


def check_lcm(req: BuildRequest, unet_config) -> None:
    """An LCM-LoRA makes a model an LCM; a distilled LCM model (its UNet takes the guidance embedding,
    `time_cond_proj_dim`) already is one and runs guidance without an unconditional batch."""
    distilled = bool(unet_config.get("time_cond_proj_dim"))
    if req.lcm_lora is None and not distilled:
        raise InputError(f"{req.model} is not a distilled LCM model (its UNet has no time_cond_proj_dim), so it needs "
                         "the LCM-LoRA: pass --lcm-lora PATH.")
    if req.lcm_lora is not None and distilled:
        raise InputError(f"{req.model} is a distilled LCM model already (its UNet takes the guidance scale as an input); "
                         "leave out --lcm-lora.")
    if distilled and req.guidance_mode != "none":
        raise InputError(f"{req.model} is a distilled LCM model: guidance is an input of its UNet and needs no "
                         "unconditional batch. Build with --guidance-mode none (the default).")


def check_request(req: BuildRequest) -> None:
    """Cheap checks before any model is loaded."""
    for height, width in req.sizes:
        for name, value, top in (("height", height, SHAPE_LIMITS["height"]), ("width", width, SHAPE_LIMITS["width"])):
            if not 0 < value <= top or value % LATENT_SCALE:
                raise InputError(f"The {name} {value} of the size {width}x{height} is not a multiple of {LATENT_SCALE} "
                                 f"in {LATENT_SCALE}..{top} (the VAE downscales by {LATENT_SCALE}); try "
                                 f"{min(top, max(LATENT_SCALE, round(value / LATENT_SCALE) * LATENT_SCALE))}.")
    if len(set(req.sizes)) != len(req.sizes) or len(req.sizes) > MAX_SIZES:
        raise InputError(f"--size lists {', '.join(f'{w}x{h}' for h, w in req.sizes)}: give 1 to {MAX_SIZES} "
                         "different sizes.")
    if req.batch < 1:
        raise InputError(f"--batch {req.batch} must be at least 1.")
    if req.stream_batch is not None and not 1 <= req.stream_batch <= MAX_STREAM_BATCH:
        raise InputError(f"--stream-batch {req.stream_batch} must be in 1..{MAX_STREAM_BATCH}: a stream batch holds "
                         "one sample per denoising step of a frame (e.g. 2 for 4 steps at strength 0.5).")
    if req.guidance_mode not in GUIDANCE_MODES:
        raise InputError(f"--guidance-mode {req.guidance_mode!r} is not one of {', '.join(GUIDANCE_MODES)}.")
    if req.out.exists() and not req.overwrite:
        raise InputError(f"{req.out} already exists. Pass --overwrite to replace it, or choose another --out.")
    if req.out.exists():
        check_replaceable(req.out, [Path(req.model), *(Path(s.path) for s in req.all_loras),
                                    *([Path(req.config)] if req.config else []),
                                    *(Path(p) for p in (req.vae_decoder, req.tiny_vae) if p)])
    for spec in req.all_loras:
        if not Path(spec.path).is_file():
            raise InputError(f"LoRA file {spec.path} does not exist.")
    for option, path in (("--vae-decoder", req.vae_decoder), ("--tiny-vae", req.tiny_vae)):
        if path is not None:
            check_tiny_vae_folder(Path(path), req.allow_pickle, option)
    check_engine_request(req.engines, req.keeps_refit_map)


MAX_STREAM_BATCH = 8  # a frame's denoising steps: LCM's useful range is 2-8
TINY_VAE_CLASS = "AutoencoderTiny"
TINY_VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_tiny_vae_folder(path: Path, allow_pickle: bool = False, option: str = "--vae-decoder") -> None:
    """--vae-decoder and --tiny-vae take a diffusers AutoencoderTiny folder (TAESD's layout): config.json + weights."""
    import json

    hint = (f"{option} takes a diffusers AutoencoderTiny folder (TAESD layout: config.json and "
            "diffusion_pytorch_model.safetensors), e.g. a local copy of madebyollin/taesd.")
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise InputError(f"{path} is not a folder with a config.json. {hint}")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        raise InputError(f"{config} is not a JSON object. {hint}") from None
    if class_name != TINY_VAE_CLASS:
        raise InputError(f"{config} has _class_name {class_name!r}, not {TINY_VAE_CLASS!r}. {hint}")
    if not any((path / name).is_file() for name in TINY_VAE_WEIGHTS[:2 if allow_pickle else 1]):
        pickled = (path / TINY_VAE_WEIGHTS[1]).is_file() and not allow_pickle
        raise InputError(f"{path} has no {TINY_VAE_WEIGHTS[0]}"
                         + (f" (its {TINY_VAE_WEIGHTS[1]} is pickled: pass --allow-pickle to load it)" if pickled else "")
                         + f". {hint}")


def check_replaceable(out: Path, inputs: list[Path]) -> None:
    """`--overwrite` deletes `out`: allow it only for an engine folder (one with an lcmrt manifest) that holds
    none of the build's inputs, so a typo cannot delete a user's documents or the model being built."""
    out = Path(out)
    if out.is_symlink() or not out.is_dir() or not (out / MANIFEST_NAME).is_file():
        raise InputError(f"--overwrite only replaces an lcmrt engine folder, and {out} is not one (no "
                         f"{MANIFEST_NAME}). Choose another --out, or remove {out} yourself if it is yours to delete.")
    resolved = out.resolve()
    for path in inputs:
        if path.exists() and resolved in (path.resolve(), *path.resolve().parents):
            raise InputError(f"--out {out} holds the build's input {path}: replacing it would delete that input. "
                             "Choose another --out.")


@contextmanager
def atomic_folder(out: Path, overwrite: bool):
    """Yield a hidden sibling folder to build in; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise InputError(f"{out} appeared while building. Pass --overwrite to replace it.")
            check_replaceable(out, [])  # it may have changed while building
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:  # KeyboardInterrupt and SIGTERM (the CLI turns it into one) included
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def library_output_silenced():
    """No progress bars, log lines or warnings from diffusers, transformers and torch.onnx while building.

    lcmrt shows its own progress (and nothing with --quiet); the tracer's and the loaders' warnings are about
    their internals, and every exported graph is validated against torch anyway.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib, _, _ in saved:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        try:
            yield
        finally:
            for lib, verbosity, bars in saved:
                lib.set_verbosity(verbosity)
                if bars:
                    lib.enable_progress_bar()


def build_shapes(family, req: BuildRequest) -> dict:
    """The folder's static shapes; the UNet's batches are the image batch and the stream batch, each doubled
    for a cfg folder (the unconditional half)."""
    batches = sorted({req.batch, req.stream_batch or req.batch})
    unet_batches = sorted({b * k for b in batches for k in ((1,) if req.guidance_mode == "none" else (1, 2))})
    return {
        "batch": req.batch, "height": req.height, "width": req.width, "sizes": [list(size) for size in req.sizes],
        "latent_channels": family.latent_channels,
        "latent_height": req.height // family.vae_scale_factor,
        "latent_width": req.width // family.vae_scale_factor,
        "text_length": family.text_length,
        "unet_batch_sizes": unet_batches,
        **({"stream_batch": req.stream_batch} if req.stream_batch else {}),
    }


def _versions() -> dict:
    versions = {"python": platform.python_version(), "lcmrt": __version__}
    versions.update({name: metadata.version(name) for name in _VERSIONED})
    return versions


def _json_safe(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}


def build_engine_folder(req: BuildRequest, stages: Stages | None = None, log=None) -> dict:
    """Run the whole build; return the manifest written to `req.out/manifest.json`. `log` (print-like)
    receives the TensorRT builder's messages."""
    check_request(req)
    stages = stages or Stages()
    with library_output_silenced():
        return _build(req, stages, log)


def load_tiny_vae(path: Path, family, allow_pickle: bool = False):
    """The AutoencoderTiny at `path` (checked by check_tiny_vae_folder), fp32, for the family's latents."""
    import torch
    from diffusers import AutoencoderTiny

    try:
        vae = AutoencoderTiny.from_pretrained(str(path), torch_dtype=torch.float32,
                                              use_safetensors=None if allow_pickle else True)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError...
        raise InputError(f"Could not load the AutoencoderTiny at {path}: {type(e).__name__}: {e}") from e
    if vae.config.latent_channels != family.latent_channels:
        raise InputError(f"{path} decodes {vae.config.latent_channels}-channel latents, but {family.name} makes "
                         f"{family.latent_channels}-channel ones: use the tiny VAE trained for this model family.")
    return vae.eval()


def _build(req: BuildRequest, stages: Stages, log) -> dict:
    import gc

    with atomic_folder(req.out, req.overwrite) as tmp:
        _export_folder(req, tmp, stages)
        gc.collect()  # the torch model is gone: engine builds and graph optimizations get its memory
        # inside the hidden folder too: a failed fp16, int8 or TensorRT step leaves no folder behind
        return add_engines(tmp, req.engines, stages, log)


def _export_folder(req: BuildRequest, tmp: Path, stages: Stages) -> None:
    """Load the model, fuse, export and validate every graph into `tmp`, and write the manifest."""
    # heavy imports here, so `lcmrt build --help` and the error checks above stay instant
    from diffusers import LCMScheduler

    from ..engines.refit_factors import write_factor_graphs
    from .adapters import (build_refit_map, model_configs, pack_adapter, refittable_components,
                           write_refit_input_graphs)
    from .loading import load_model
    from .lora import fuse_loras
    from .onnx_export import OPSET, component_exports, copy_tokenizer, export_component, graph_hashes

    with stages.stage("load model"):
        loaded = load_model(req.model, config=req.config, allow_pickle=req.allow_pickle)
    pipe, family = loaded.pipe, get_family(loaded.family)
    check_lcm(req, pipe.unet.config)
    loras = req.all_loras
    with stages.stage("fuse LoRAs"):
        fused = [spec for spec in loras if not req.is_refittable(spec)]
        adapters = [{**record, "fused": True}
                    for record in fuse_loras(pipe, fused, allow_pickle=req.allow_pickle)]
    shapes = build_shapes(family, req)
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    vae_decoder = tiny_vae = None
    if req.vae_decoder is not None:
        with stages.stage("load VAE decoder"):
            vae_decoder = load_tiny_vae(Path(req.vae_decoder), family, req.allow_pickle)
    if req.tiny_vae is not None:
        with stages.stage("load tiny VAE"):
            tiny_vae = load_tiny_vae(Path(req.tiny_vae), family, req.allow_pickle)

    if req.keeps_refit_map:
        with stages.stage("pack adapters"):
            adapters += [pack_adapter(pipe, spec, tmp, family, req.allow_pickle)
                         for spec in loras if req.is_refittable(spec)]
    components = {}
    vocab_size = min(getattr(pipe, name).config.vocab_size for name in family.text_encoders)
    for spec in component_exports(pipe, shapes, family, vae_decoder=vae_decoder, tiny_vae=tiny_vae):
        with stages.stage(f"export {spec.name}"):
            components[spec.name] = export_component(spec, tmp, vocab_size=vocab_size)
    components["vae_decoder"]["source"] = (
        type(pipe.vae).__name__ if vae_decoder is None else f"{TINY_VAE_CLASS}:{Path(req.vae_decoder).resolve()}")
    for name in ("tiny_vae_encoder", "tiny_vae_decoder") if tiny_vae is not None else ():
        components[name]["source"] = f"{TINY_VAE_CLASS}:{Path(req.tiny_vae).resolve()}"
    refit_map = {}
    if req.keeps_refit_map:
        with stages.stage("refit map"):
            required = {m for a in adapters if not a["fused"] for m in a["targets"]}
            refittable = refittable_components(pipe)
            refit_map = build_refit_map(pipe, {c: tmp / components[c]["file"] for c in refittable}, required)
            for c in refittable:  # the graphs were rewritten with external weights
                components[c]["sha256"] = graph_hashes(tmp, components[c]["file"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "source": loaded.source,
        "shapes": shapes,
        "guidance_mode": req.guidance_mode,
        "scheduler": {"class": "LCMScheduler", "config": _json_safe(scheduler.config)},
        **{tokenizer_key(name): copy_tokenizer(getattr(pipe, tokenizer_key(name)), tmp, tokenizer_key(name))
           for name in family.text_encoders},
        **({"conditioning": {"force_zeros_for_empty_prompt": bool(pipe.config.force_zeros_for_empty_prompt)}}
           if family.time_ids else {}),
        "vae": {"scaling_factor": float(pipe.vae.config.scaling_factor),
                "force_upcast": bool(pipe.vae.config.get("force_upcast", False))},
        "components": components,
        "adapters": adapters,
        "refittable": req.keeps_refit_map,
        "refit_map": refit_map,
        "model_configs": model_configs(pipe) if req.keeps_refit_map else None,
        "engines": [],
        "versions": _versions(),
        "build": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "opset": OPSET, "seconds": stages.seconds},
    }
    if req.keeps_refit_map:
        write_refit_input_graphs(tmp, manifest)
        write_factor_graphs(tmp, manifest)
    write_manifest(tmp, manifest)
