"""Refittable adapters, build side: adapter packs and the refit map.

An adapter pack (`adapters/NAME.safetensors`) holds one LoRA's low-rank factors keyed by lcmrt module
names (`unet.<module path>`, `text_encoder.<module path>`, SDXL's `text_encoder_2.<module path>`), so the runtime can compute
`W = W_base + sum_i w_i * scale_i * up_i @ down_i` with numpy alone. diffusers resolves each file's key
format onto the model (lcmrt never converts formats itself) and `lora.locate_lora` proves where every
module landed.

The refit map says, for every Linear/Conv2d weight of the UNet and text encoders, which ONNX initializer
holds it, whether the exporter transposed it (constant folding stores `x @ W.T` weights as `W.T`), and
where its pristine bytes sit in the graph's external data file. It is derived by value: the initializer
whose bytes equal the module's weight (or its transpose). A weight the exporter changed in any other way
cannot be refit; if an adapter needs it, the build fails naming the module.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file

from ..errors import AdapterError
from ..engines.refit_factors import write_factor_graphs
from ..families import PENULTIMATE_HIDDEN_STATE, Family
from ..folder_update import changing, commit, fresh_graph_name, scratch_folder
from ..manifest import ADAPTER_DIR, REFIT_INPUTS, Manifest, file_sha256, read_manifest
from .lora import LoraSpec, locate_lora

PACK_FORMAT = "lcmrt-adapter/1"
REFITTABLE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")  # those the model has (text_encoder_2: SDXL)
# External data offsets aligned to pages, so the runtime (and ONNX Runtime) can memory-map each weight.
_ALIGN = 4096


def refittable_components(pipe) -> list[str]:
    """The components of `pipe` adapters can target."""
    return [comp for comp in REFITTABLE_COMPONENTS if getattr(pipe, comp, None) is not None]


def module_weights(pipe) -> dict[str, torch.Tensor]:
    """Every LoRA-targetable weight: {"unet.<path>": weight} for Linear and Conv2d layers."""
    weights = {}
    for comp in refittable_components(pipe):
        for name, module in getattr(pipe, comp).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                weights[f"{comp}.{name}"] = module.weight.detach()
    return weights


def unused_modules(pipe, family: Family) -> set[str]:
    """Modules the folder's graphs do not contain because no output depends on them: the last layer of a text
    encoder whose penultimate hidden state is all the UNet reads (SDXL's first; its second also gives the pooled
    projection, which runs through every layer). A LoRA's update of them changes no image."""
    unused = set()
    for comp in family.text_encoders:
        if family.hidden_state != PENULTIMATE_HIDDEN_STATE or comp == family.pooled_text_encoder:
            continue
        model = getattr(pipe, comp)
        [(path, layers)] = [(n, m) for n, m in model.named_modules() if n.endswith("encoder.layers")]
        prefix = f"{path}.{len(layers) - 1}."
        unused |= {f"{comp}.{name}" for name, _ in model.named_modules() if name.startswith(prefix)}
    return unused


def pack_adapter(pipe, spec: LoraSpec, out_dir: Path, family: Family, allow_pickle: bool = False) -> dict:
    """Write `out_dir/adapters/<name>.safetensors` for one LoRA; return its manifest record (not fused). Modules
    no output depends on (`unused_modules`) are left out of the pack and its targets."""
    record, modules = locate_lora(pipe, spec, allow_pickle)
    unused = unused_modules(pipe, family)
    modules = {(comp, mname): fm for (comp, mname), fm in modules.items() if f"{comp}.{mname}" not in unused}
    tensors = {}
    for (comp, mname), fm in modules.items():
        key = f"{comp}.{mname}"
        tensors[f"{key}.down"] = fm.down.float().contiguous().numpy()
        tensors[f"{key}.up"] = fm.up.float().contiguous().numpy()
        tensors[f"{key}.scale"] = np.array([fm.scale], dtype=np.float32)
    pack = out_dir / ADAPTER_DIR / f"{spec.name}.safetensors"
    pack.parent.mkdir(exist_ok=True)
    save_file(tensors, str(pack), metadata={"format": PACK_FORMAT, "name": spec.name,
                                            "source_sha256": record["sha256"]})
    return {**record, "fused": False, "pack": pack.relative_to(out_dir).as_posix(), "pack_sha256": file_sha256(pack),
            "targets": sorted(f"{c}.{m}" for c, m in modules)}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def build_refit_map(pipe, graphs: dict[str, Path], required: set[str]) -> dict:
    """Map every module weight to its graph initializer and move those initializers to external data.

    `graphs`: component -> .onnx path (rewritten in place). `required`: modules that adapters of this
    folder target; each must be mapped or the build fails. Returns {module: entry}.
    """
    weights = module_weights(pipe)
    refit_map, unmapped = {}, []
    for comp, graph_path in graphs.items():
        model = onnx.load(str(graph_path), load_external_data=False)
        base_dir = graph_path.parent
        by_digest: dict[tuple, list[str]] = {}
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                array = numpy_helper.to_array(init, base_dir=str(base_dir))
                by_digest.setdefault((array.shape, _digest(array)), []).append(init.name)
        found = {}
        for module, weight in weights.items():
            if not module.startswith(comp + "."):
                continue
            w = weight.numpy()
            candidates = [(False, w)] + ([(True, w.T)] if w.ndim == 2 else [])
            for transpose, layout in candidates:
                names = by_digest.get((layout.shape, _digest(layout)), [])
                if len(names) == 1:
                    found[module] = (names[0], transpose, list(w.shape))
                    break
            else:
                unmapped.append(module)
        locations = _externalize(model, graph_path, {name for name, _, _ in found.values()})
        for module, (name, transpose, shape) in found.items():
            refit_map[module] = {"component": comp, "weight": name, "transpose": transpose, "shape": shape,
                                 **locations[name]}
    missing = sorted(required - set(refit_map))
    if missing:
        raise AdapterError(
            f"{len(missing)} module(s) targeted by the adapters have no refittable weight in the exported "
            f"graphs (the exporter folded or merged them), e.g. {', '.join(missing[:5])}. Build without "
            "--refittable for these adapters (fuse them), or report the module names.")
    return refit_map


def _externalize(model: onnx.ModelProto, graph_path: Path, names: set[str]) -> dict[str, dict]:
    """Store the named initializers in `<graph>.data` (page-aligned) and rewrite the graph; return each
    initializer's {file, offset, length, dtype}. Graphs already fully external keep their data file."""
    data_name = f"{graph_path.name}.data"
    data_path = graph_path.parent / data_name
    locations = {}
    with open(data_path, "ab") as data:
        for init in model.graph.initializer:
            if init.name not in names:
                continue
            if init.data_location != onnx.TensorProto.EXTERNAL:
                raw = numpy_helper.to_array(init).tobytes()
                offset = -data.tell() % _ALIGN + data.tell()
                data.write(b"\0" * (offset - data.tell()))
                data.write(raw)
                init.raw_data = raw  # set_external_data requires it; cleared right after
                onnx.external_data_helper.set_external_data(init, data_name, offset, len(raw))
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
                init.ClearField("float_data")
            info = {e.key: e.value for e in init.external_data}
            locations[init.name] = {"file": info["location"], "offset": int(info.get("offset", 0)),
                                    "length": int(info["length"]), "dtype": "float32"}
    graph_path.write_bytes(model.SerializeToString())
    if data_path.stat().st_size == 0:
        data_path.unlink()
    return locations


def model_configs(pipe) -> dict:
    """The UNet and text encoder configs, so `lcmrt adapter add` can rebuild the module tree offline."""
    configs = {"unet": json.loads(json.dumps(dict(pipe.unet.config), default=list))}
    configs.update({comp: getattr(pipe, comp).config.to_dict() for comp in refittable_components(pipe) if comp != "unet"})
    return configs


def _skeleton_pipeline(configs: dict):
    """A pipeline holding only the UNet and text encoder(s) of the folder's architecture (SDXL's when there
    is a text_encoder_2), with uninitialized weights: enough for diffusers to resolve a LoRA's module names,
    at no init cost."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))}
        if "text_encoder_2" in configs:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
    models = {name: model.to_empty(device="cpu") for name, model in models.items()}
    if "text_encoder_2" in models:
        return StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None, scheduler=None,
                                         add_watermarker=False, **models)
    return StableDiffusionPipeline(vae=None, tokenizer=None, scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **models)


def _check_addable(folder: Path, manifest: Manifest, spec: LoraSpec) -> None:
    if not manifest.refittable or manifest.model_configs is None:
        raise AdapterError(f"{folder} was built without --refittable, so it has no refit map and cannot take "
                           "adapters. Rebuild it with `lcmrt build ... --refittable`.")
    if any(a.name == spec.name for a in manifest.adapters):
        raise AdapterError(f"{folder} already has an adapter named {spec.name!r}; choose another --name.")


def add_adapter(folder: Path, spec: LoraSpec, allow_pickle: bool = False) -> dict:
    """Convert a LoRA file into an adapter pack of an existing refittable engine folder; return its record.
    All or nothing (`lcmrt.folder_update`): an interrupted add leaves the folder as it was."""
    folder = Path(folder)
    _check_addable(folder, read_manifest(folder), spec)
    with changing(folder) as manifest:
        _check_addable(folder, manifest, spec)  # again, as the previous writer left it
        scratch = scratch_folder(folder)
        try:
            record = pack_adapter(_skeleton_pipeline(manifest.model_configs), spec, scratch, manifest.family_info,
                                  allow_pickle)
            unmapped = sorted(set(record["targets"]) - set(manifest.refit_map))
            if unmapped:
                raise AdapterError(
                    f"{len(unmapped)} module(s) of {spec.path} have no refittable weight in {folder}, e.g. "
                    f"{', '.join(unmapped[:5])}. This LoRA cannot be swapped into this folder; fuse it with "
                    "`lcmrt build --lora` instead.")
            (folder / ADAPTER_DIR).mkdir(exist_ok=True)
            os.replace(scratch / record["pack"], folder / record["pack"])  # a new name: no manifest uses it yet
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record = {**record, "weight": 0.0}  # an added adapter starts switched off
        manifest.add_adapter(record)
        write_refit_input_graphs(folder, manifest)
        write_factor_graphs(folder, manifest)  # the new adapter's ranks widen the branches
        commit(folder, manifest)
    return record


def write_refit_input_graphs(folder: Path, manifest: Manifest | dict) -> None:
    """For each refittable component, `<component>.refit-inputs.onnx`: the same graph (sharing its data
    file) with the weights the folder's swappable adapters target declared as graph inputs, so ONNX
    Runtime takes new values with every run instead of a new session. Recorded as the "refit-inputs"
    variant; written anew (under a name the folder's manifest does not use) whenever the set of targets
    changes (`adapter add`)."""
    manifest = Manifest.of(manifest)
    targets = {m for a in manifest.adapters if not a.fused for m in a.targets}
    refit_map = manifest.refit_map
    for comp in [c for c in REFITTABLE_COMPONENTS if c in manifest.components]:
        entry = manifest.component(comp).graph_fp32
        names = sorted({e.weight for m, e in refit_map.items() if m in targets and e.component == comp})
        graph = folder / fresh_graph_name(folder, manifest, comp, REFIT_INPUTS)  # the old one stays until the commit
        manifest.drop_variant(comp, REFIT_INPUTS)
        if not names:
            continue
        model = onnx.load(str(folder / entry.file), load_external_data=False)
        by_name = {init.name: init for init in model.graph.initializer}
        for name in names:
            init = by_name[name]
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, init.dims))
        graph.write_bytes(model.SerializeToString())
        files = [graph.name] + [f for f in entry.sha256 if f != entry.file]  # shares the data file
        manifest.set_variant(comp, REFIT_INPUTS, {"file": graph.name, "sha256": {f: file_sha256(folder / f) for f in files},
                                                  "precision": entry.precision, "weight_inputs": names})
