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

from ..backends.onnxruntime import OrtSession
from ..engines.graphs import example_inputs, save_graph
from ..errors import ExportError
from ..families import LAST_HIDDEN_STATE, PENULTIMATE_HIDDEN_STATE, TEXT_EMBEDS, TIME_IDS, Family
from ..guidance import TIMESTEP_COND
from ..manifest import (HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, TOKENIZER_DIR, TOKENIZER_FILE, WIDTH, file_sha256,
                        size_dims)

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
    """Image in [-1, 1] to the mean and std of the latent distribution (unscaled), for img2img and inpainting:
    the runtime samples it (diffusers' `latent_dist.sample`) and applies the scaling factor."""

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


class TinyVaeEncoderGraph(torch.nn.Module):
    """An AutoencoderTiny (TAESD) encoder: image in [-1, 1] to the sampler's latents. It is deterministic (no
    distribution to sample) and its scaling_factor is 1.0, as diffusers' `retrieve_latents` uses it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image, return_dict=False)[0] * self.vae.config.scaling_factor


@dataclass
class ComponentExport:
    """One graph to export: a torch module, its input shapes, the named axes of its outputs, and the values
    its named (varying) dimensions take."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, tuple[tuple, str]]  # name -> (shape, dtype); a str dim varies
    outputs: dict[str, dict[int, str]]  # name -> {axis: dimension name} of the axes that vary
    dim_values: dict[str, list[int]] = field(default_factory=dict)  # dimension name -> its values
    profiles: list[dict[str, int]] = field(default_factory=lambda: [{}])  # the dimension values to validate at


def component_exports(pipe, shapes: dict, family: Family, vae_decoder=None, tiny_vae=None) -> list[ComponentExport]:
    """The graphs an engine folder holds, for the build's sizes and batches; `vae_decoder` (e.g. an
    AutoencoderTiny) replaces the pipeline's VAE for decoding; `tiny_vae` (an AutoencoderTiny) adds its encoder
    and decoder as components of their own (`tiny_vae_encoder`, `tiny_vae_decoder`). A folder of several sizes
    names its size axes (`lcmrt.manifest.size_dims`): one graph, with one set of weights, serves them all.
    The UNet's timestep is per sample, so one call can denoise samples at different timesteps (a stream batch);
    its sample has the UNet's input channels (9 for an inpainting UNet: latents, mask, masked-image latents)."""
    n, c, t = shapes["batch"], shapes["latent_channels"], shapes["text_length"]
    sizes = [tuple(size) for size in shapes["sizes"]]
    per_size = [size_dims(h, w) for h, w in sizes]
    if len(sizes) == 1:
        h, w, lh, lw = (per_size[0][d] for d in (HEIGHT, WIDTH, LATENT_HEIGHT, LATENT_WIDTH))
    else:
        h, w, lh, lw = HEIGHT, WIDTH, LATENT_HEIGHT, LATENT_WIDTH
    unet_batches = shapes["unet_batch_sizes"]
    unet_batch = unet_batches[0] if len(unet_batches) == 1 else "unet_batch"

    def export(name, module, inputs, outputs):
        """A ComponentExport whose named dimensions take the build's values: each size, the largest batch."""
        named = {d for shape, _ in inputs.values() for d in shape if isinstance(d, str)}
        named |= {d for output_axes in outputs.values() for d in output_axes.values()}
        values = {d: list(dict.fromkeys(dims[d] for dims in per_size)) for d in sorted(named) if d in per_size[0]}
        if unet_batch in named:
            values[unet_batch] = unet_batches
        profiles = [{d: (dims[d] if d in dims else max(values[d])) for d in values} for dims in per_size]
        profiles = [p for i, p in enumerate(profiles) if p not in profiles[:i]]
        return ComponentExport(name, module, inputs, outputs, values, profiles)

    def axes(*shape):
        return {i: d for i, d in enumerate(shape) if isinstance(d, str)}

    text_encoders = []
    for name in family.text_encoders:
        outputs = [family.hidden_state] + ([TEXT_EMBEDS] if name == family.pooled_text_encoder else [])
        text_encoders.append(export(name, TextEncoderGraph(getattr(pipe, name), outputs),
                                    {"input_ids": ((1, t), "int64")}, {o: {} for o in outputs}))
    unet_inputs = {"sample": ((unet_batch, pipe.unet.config.in_channels, lh, lw), "float32"),
                   "timestep": ((unet_batch,), "float32"),
                   "encoder_hidden_states": ((unet_batch, t, pipe.unet.config.cross_attention_dim), "float32")}
    if family.time_ids:  # SDXL: the pooled prompt and the size/crop conditioning
        pooled = getattr(pipe, family.pooled_text_encoder).config.projection_dim
        unet_inputs.update({TEXT_EMBEDS: ((unet_batch, pooled), "float32"), TIME_IDS: ((unet_batch, 6), "float32")})
    if pipe.unet.config.get("time_cond_proj_dim"):  # a distilled LCM UNet: guidance is an input
        unet_inputs[TIMESTEP_COND] = ((unet_batch, pipe.unet.config.time_cond_proj_dim), "float32")
    extra_inputs = tuple(list(unet_inputs)[3:])
    return [
        *text_encoders,
        export("unet", UNetGraph(pipe.unet, extra_inputs), unet_inputs,
               {"noise_pred": axes(unet_batch, c, lh, lw)}),
        export("vae_decoder", VaeDecoderGraph(pipe.vae if vae_decoder is None else vae_decoder),
               {"latents": ((n, c, lh, lw), "float32")}, {"image": axes(n, 3, h, w)}),
        export("vae_encoder", VaeEncoderGraph(pipe.vae), {"image": ((n, 3, h, w), "float32")},
               {"latent_mean": axes(n, c, lh, lw), "latent_std": axes(n, c, lh, lw)}),
        *([] if tiny_vae is None else [
            export("tiny_vae_encoder", TinyVaeEncoderGraph(tiny_vae), {"image": ((n, 3, h, w), "float32")},
                   {"latents": axes(n, c, lh, lw)}),
            export("tiny_vae_decoder", VaeDecoderGraph(tiny_vae), {"latents": ((n, c, lh, lw), "float32")},
                   {"image": axes(n, 3, h, w)})]),
    ]


def _example_inputs(spec: ComponentExport, vocab_size: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    return example_inputs([(name, shape, dtype) for name, (shape, dtype) in spec.inputs.items()], dims,
                          VALIDATION_SEED, vocab_size)


def _export_graph(spec: ComponentExport, example: dict[str, np.ndarray], out_dir: Path,
                  output_shapes: list[list]) -> list[str]:
    """Write `<name>.onnx` (plus `<name>.onnx.data` when over 2 GB); return the file names written."""
    graph_name = f"{spec.name}.onnx"
    args = tuple(torch.from_numpy(a) for a in example.values())
    dynamic_axes = {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                    for name, (shape, _) in spec.inputs.items()}
    dynamic_axes.update(spec.outputs)
    dynamic_axes = {name: axes for name, axes in dynamic_axes.items() if axes}
    # The TorchScript exporter: 10x faster than dynamo on these models, same numbers (FIELD-NOTES.md).
    # It scatters >2 GB weights over hundreds of files, so export to scratch and gather them (streamed: a
    # full-size SDXL UNet's 10 GB never sit in memory next to the torch model).
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{spec.name}-export-") as scratch:
        scratch_path = Path(scratch) / graph_name
        try:
            with torch.no_grad():
                torch.onnx.export(spec.module, args, str(scratch_path), input_names=list(spec.inputs),
                                  output_names=list(spec.outputs), dynamic_axes=dynamic_axes or None,
                                  opset_version=OPSET, dynamo=False, do_constant_folding=True)
        except Exception as e:  # the exporter raises many types; name the component
            raise ExportError(f"Exporting {spec.name} to ONNX failed: {type(e).__name__}: {e}") from e
        model = onnx.load(str(scratch_path), load_external_data=False)  # the weights stay on disk
        # The tracer leaves some output dims symbolic (the VAE encoder's, after the moments split) although
        # the inputs are static; declare the shapes the torch module produced.
        for output, shape in zip(model.graph.output, output_shapes):
            for dim, size in zip(output.type.tensor_type.shape.dim, shape):
                if isinstance(size, str):
                    dim.dim_param = size
                else:
                    dim.dim_value = size
        return save_graph(model, out_dir, graph_name, data_dir=Path(scratch))


def export_component(spec: ComponentExport, out_dir: Path, vocab_size: int) -> dict:
    """Export one component into `out_dir`, validate it at each of its profiles (each size of the folder, at
    the largest batch), and return its manifest entry."""
    examples = [_example_inputs(spec, vocab_size, dims) for dims in spec.profiles]
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops:
        reference = _torch_outputs(spec, examples[0])
    output_shapes = [[spec.outputs[name].get(i, n) for i, n in enumerate(r.shape)]
                     for name, r in zip(spec.outputs, reference)]
    files = _export_graph(spec, examples[0], out_dir, output_shapes)

    entry = {
        "file": files[0],
        "sha256": graph_hashes(out_dir, files[0]),
        "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, (s, d) in spec.inputs.items()],
        "outputs": [{"name": n, "shape": shape, "dtype": str(r.dtype)}
                    for n, shape, r in zip(spec.outputs, output_shapes, reference)],
        "dim_values": spec.dim_values,
        "precision": "fp32",
        "parameters": sum(p.numel() for p in spec.module.parameters()),
        "flops": flops.get_total_flops(),  # at the first size and the largest batch the graph accepts
    }
    # Weights over 2 GB (a full-size UNet) are validated memory-mapped from their data file, not copied into
    # ONNX Runtime's pre-packed buffers next to the torch model: a full-size SDXL build fits in 24 GiB.
    weights_on_disk = len(files) > 1
    session = OrtSession(out_dir / files[0], spec.name, ["CPUExecutionProvider"], None,
                         optimize=not weights_on_disk, prepack=not weights_on_disk)
    diffs, scale = [], 0.0
    for i, example in enumerate(examples):
        if i:
            with torch.no_grad():
                reference = _torch_outputs(spec, example)
        got = session.run(example)
        for name, ref in zip(spec.outputs, reference):
            diffs.append(float(np.abs(got[name] - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    tolerance = VALIDATION_RTOL * max(1.0, scale)
    entry["validation"] = {"max_abs_diff": max(diffs), "tolerance": tolerance, "max_abs_reference": scale,
                           "seed": VALIDATION_SEED, "runtime": "onnxruntime-cpu", "profiles": spec.profiles}
    if not max(diffs) <= tolerance:  # also catches NaN
        raise ExportError(
            f"The exported {spec.name} graph differs from the torch module by {max(diffs):.3g} "
            f"(tolerance {tolerance:.3g}). This is an exporter problem, not an input problem; "
            "rerun with --debug and report it.")
    return entry


def _torch_outputs(spec: ComponentExport, example: dict[str, np.ndarray]) -> list[np.ndarray]:
    outputs = spec.module(*(torch.from_numpy(a) for a in example.values()))
    return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]


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
