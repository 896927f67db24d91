"""Export each component of a fused pipeline to static-shape ONNX and validate it against torch.

Every graph is checked in ONNX Runtime against the torch module on the same random inputs; the
measured max abs diff goes in the manifest, and a diff over tolerance fails the build. The torch
reference pass runs under torch's FLOP counter, so the manifest also records each component's FLOPs.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..backends.onnxruntime import OnnxRuntimeBackend
from ..engines.graphs import save_graph
from ..errors import ExportError
from ..families import LAST_HIDDEN_STATE, PENULTIMATE_HIDDEN_STATE, TEXT_EMBEDS, TIME_IDS, Family
from ..guidance import TIMESTEP_COND
from ..manifest import TOKENIZER_DIR, TOKENIZER_FILE, file_sha256

# opset 18 is the lowest where torch's exporters and ONNX Runtime agree on Split/Reduce attributes.
OPSET = 18
# fp32 ONNX Runtime vs torch differs by reordered float sums: ~1e-6 on tiny models, ~1e-4 at full
# size. 1e-3 of the output's magnitude catches a wrong graph (those differ at order 1) with margin.
VALIDATION_RTOL = 1e-3
VALIDATION_SEED = 1234


class TextEncoderGraph(torch.nn.Module):
    """SD1.5: the last hidden state. SDXL: the penultimate hidden state (diffusers' `hidden_states[-2]`, before
    the final layer norm), and for the second encoder also its pooled projection `text_embeds`."""

    def __init__(self, text_encoder, outputs: list[str]):
        super().__init__()
        self.text_encoder, self.outputs = text_encoder, outputs

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=PENULTIMATE_HIDDEN_STATE in self.outputs)
        values = {LAST_HIDDEN_STATE: lambda: out.last_hidden_state,  # [1, 77, D]
                  PENULTIMATE_HIDDEN_STATE: lambda: out.hidden_states[-2],  # [1, 77, D]
                  TEXT_EMBEDS: lambda: out.text_embeds}  # [1, P]
        return tuple(values[name]() for name in self.outputs)


class UNetGraph(torch.nn.Module):
    """Takes the UNet's conditioning as named inputs after `encoder_hidden_states`: SDXL's `text_embeds` and
    `time_ids`, a distilled LCM UNet's guidance embedding `timestep_cond`."""

    def __init__(self, unet, extra_inputs: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.extra_inputs = unet, extra_inputs

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        # noise_pred: [B, 4, H/8, W/8]
        named = dict(zip(self.extra_inputs, extra))
        added = {name: named[name] for name in (TEXT_EMBEDS, TIME_IDS) if name in named}
        kwargs = {"added_cond_kwargs": added} if added else {}
        if TIMESTEP_COND in named:
            kwargs["timestep_cond"] = named[TIMESTEP_COND]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


class VaeDecoderGraph(torch.nn.Module):
    """Takes the sampler's latents; the 1/scaling_factor is part of the graph. Also wraps an AutoencoderTiny
    (TAESD), whose scaling_factor is 1.0: it decodes the sampler's latents as they are, to [-1, 1] as well."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        # image: [N, 3, H, W] in about [-1, 1]
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """Image in [-1, 1] to the mean and std of the latent distribution (unscaled), for img2img."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        # the clamp matches diffusers' DiagonalGaussianDistribution
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return mean, std


@dataclass
class ComponentExport:
    """One graph to export: a torch module, its static input shapes, and which axes may vary."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, tuple[tuple, str]]  # name -> (shape, dtype); a str dim varies
    outputs: list[str]
    dim_values: dict[str, list[int]] = field(default_factory=dict)  # symbolic dim -> allowed sizes


def component_exports(pipe, shapes: dict, family: Family, vae_decoder=None) -> list[ComponentExport]:
    """The graphs an engine folder holds, with the shapes of the build's profile; `vae_decoder` (e.g. an
    AutoencoderTiny) replaces the pipeline's VAE for decoding."""
    n, lh, lw = shapes["batch"], shapes["latent_height"], shapes["latent_width"]
    c, t = shapes["latent_channels"], shapes["text_length"]
    unet_batches = shapes["unet_batch_sizes"]
    unet_batch = unet_batches[0] if len(unet_batches) == 1 else "unet_batch"
    text_encoders = []
    for name in family.text_encoders:
        outputs = [family.hidden_state] + ([TEXT_EMBEDS] if name == family.pooled_text_encoder else [])
        text_encoders.append(ComponentExport(name, TextEncoderGraph(getattr(pipe, name), outputs),
                                             {"input_ids": ((1, t), "int64")}, outputs))
    unet_inputs = {"sample": ((unet_batch, c, lh, lw), "float32"),
                   "timestep": ((1,), "float32"),
                   "encoder_hidden_states": ((unet_batch, t, pipe.unet.config.cross_attention_dim), "float32")}
    if family.time_ids:  # SDXL: the pooled prompt and the size/crop conditioning
        pooled = getattr(pipe, family.pooled_text_encoder).config.projection_dim
        unet_inputs.update({TEXT_EMBEDS: ((unet_batch, pooled), "float32"), TIME_IDS: ((unet_batch, 6), "float32")})
    if pipe.unet.config.get("time_cond_proj_dim"):  # a distilled LCM UNet: guidance is an input
        unet_inputs[TIMESTEP_COND] = ((unet_batch, pipe.unet.config.time_cond_proj_dim), "float32")
    extra_inputs = tuple(list(unet_inputs)[3:])
    return [
        *text_encoders,
        ComponentExport("unet", UNetGraph(pipe.unet, extra_inputs), unet_inputs, ["noise_pred"],
                        {"unet_batch": unet_batches} if unet_batch == "unet_batch" else {}),
        ComponentExport("vae_decoder", VaeDecoderGraph(pipe.vae if vae_decoder is None else vae_decoder),
                        {"latents": ((n, c, lh, lw), "float32")}, ["image"]),
        ComponentExport("vae_encoder", VaeEncoderGraph(pipe.vae),
                        {"image": ((n, 3, shapes["height"], shapes["width"]), "float32")},
                        ["latent_mean", "latent_std"]),
    ]


def _example_inputs(spec: ComponentExport, vocab_size: int, batch_for: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(VALIDATION_SEED)
    arrays = {}
    for name, (shape, dtype) in spec.inputs.items():
        shape = tuple(batch_for.get(d, d) if isinstance(d, str) else d for d in shape)
        if name == "input_ids":
            arrays[name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif name == "timestep":
            arrays[name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        elif name == "image":
            arrays[name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        elif name == TIME_IDS:  # sizes and crop offsets in pixels
            arrays[name] = rng.integers(0, 1024, size=shape).astype(np.float32)
        elif name == TIMESTEP_COND:  # sines and cosines
            arrays[name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        else:
            arrays[name] = rng.standard_normal(shape, dtype=np.float32)
    return arrays


def _export_graph(spec: ComponentExport, example: dict[str, np.ndarray], out_dir: Path,
                  output_shapes: list[list]) -> list[str]:
    """Write `<name>.onnx` (plus `<name>.onnx.data` when over 2 GB); return the file names written."""
    graph_name = f"{spec.name}.onnx"
    args = tuple(torch.from_numpy(a) for a in example.values())
    dynamic_axes = {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                    for name, (shape, _) in spec.inputs.items()}
    dynamic_axes = {name: axes for name, axes in dynamic_axes.items() if axes}
    if dynamic_axes:  # only the UNet batch varies; its output follows it
        batch_axis = next(iter(dynamic_axes.values()))
        dynamic_axes.update({name: batch_axis for name in spec.outputs})
    # The TorchScript exporter: 10x faster than dynamo on these models, same numbers (FIELD-NOTES.md).
    # It scatters >2 GB weights over hundreds of files, so export to scratch and gather them.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{spec.name}-export-") as scratch:
        scratch_path = Path(scratch) / graph_name
        try:
            with torch.no_grad():
                torch.onnx.export(spec.module, args, str(scratch_path), input_names=list(spec.inputs),
                                  output_names=spec.outputs, dynamic_axes=dynamic_axes or None,
                                  opset_version=OPSET, dynamo=False, do_constant_folding=True)
        except Exception as e:  # the exporter raises many types; name the component
            raise ExportError(f"Exporting {spec.name} to ONNX failed: {type(e).__name__}: {e}") from e
        model = onnx.load(str(scratch_path), load_external_data=True)
    # The tracer leaves some output dims symbolic (the VAE encoder's, after the moments split) although
    # the inputs are static; declare the shapes the torch module produced.
    for output, shape in zip(model.graph.output, output_shapes):
        for dim, size in zip(output.type.tensor_type.shape.dim, shape):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    return save_graph(model, out_dir, graph_name)


def export_component(spec: ComponentExport, out_dir: Path, vocab_size: int) -> dict:
    """Export one component into `out_dir`, validate it, and return its manifest entry."""
    largest = {d: max(v) for d, v in spec.dim_values.items()}
    example = _example_inputs(spec, vocab_size, largest)
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops:
        reference = spec.module(*(torch.from_numpy(a) for a in example.values()))
    reference = reference if isinstance(reference, tuple) else (reference,)
    # only the UNet's batch varies, and its output follows it (axis 0)
    batch_dim = next(iter(spec.dim_values), None)
    output_shapes = [[batch_dim if batch_dim and i == 0 else n for i, n in enumerate(r.shape)] for r in reference]
    files = _export_graph(spec, example, out_dir, output_shapes)

    entry = {
        "file": files[0],
        "sha256": graph_hashes(out_dir, files[0]),
        "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, (s, d) in spec.inputs.items()],
        "outputs": [{"name": n, "shape": shape, "dtype": str(r.numpy().dtype)}
                    for n, shape, r in zip(spec.outputs, output_shapes, reference)],
        "dim_values": spec.dim_values,
        "precision": "fp32",
        "parameters": sum(p.numel() for p in spec.module.parameters()),
        "flops": flops.get_total_flops(),  # at the largest batch the graph accepts
    }
    session = OnnxRuntimeBackend().load(out_dir, {"components": {spec.name: entry}}, spec.name)
    got = session.run(example)
    diffs, scale = [], 0.0
    for name, ref in zip(spec.outputs, reference):
        ref = ref.numpy()
        diffs.append(float(np.abs(got[name] - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    tolerance = VALIDATION_RTOL * max(1.0, scale)
    entry["validation"] = {"max_abs_diff": max(diffs), "tolerance": tolerance, "max_abs_reference": scale,
                           "seed": VALIDATION_SEED, "runtime": "onnxruntime-cpu"}
    if not max(diffs) <= tolerance:  # also catches NaN
        raise ExportError(
            f"The exported {spec.name} graph differs from the torch module by {max(diffs):.3g} "
            f"(tolerance {tolerance:.3g}). This is an exporter problem, not an input problem; "
            "rerun with --debug and report it.")
    return entry


def graph_hashes(out_dir: Path, graph_name: str) -> dict[str, str]:
    """sha256 of a graph file and of its external data file, if it has one."""
    files = [graph_name] + ([f"{graph_name}.data"] if (out_dir / f"{graph_name}.data").is_file() else [])
    return {name: file_sha256(out_dir / name) for name in files}


def copy_tokenizer(tokenizer, out_dir: Path, folder: str = TOKENIZER_DIR) -> dict:
    """Save the tokenizer files the runtime's `tokenizers` loader reads into `folder`; return the manifest entry."""
    target = out_dir / folder
    tokenizer.save_pretrained(str(target))
    if not (target / TOKENIZER_FILE).is_file():
        shutil.rmtree(target)
        raise ExportError("The model's tokenizer could not be saved as tokenizer.json (a fast tokenizer is "
                          "needed by the runtime). Use a model whose tokenizer folder has tokenizer.json.")
    file = f"{folder}/{TOKENIZER_FILE}"
    return {"path": folder, "sha256": {file: file_sha256(out_dir / file)},
            "max_length": int(tokenizer.model_max_length),
            "pad_token_id": int(tokenizer.pad_token_id), "bos_token_id": int(tokenizer.bos_token_id),
            "eos_token_id": int(tokenizer.eos_token_id)}
