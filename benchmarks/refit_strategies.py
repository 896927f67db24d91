"""Three ways to swap LoRA weights under ONNX Runtime on the CPU, measured against a fused folder.

    python -m benchmarks.refit_strategies --fused results/full/style-fused --refit results/full/style-refit \
        --model results/full/sd15/model --lcm-lora results/full/sd15/lcm-lora.safetensors \
        --lora results/full/sd15/style-r64.safetensors [--repeats 3] [--json results/refit-strategies.json]

- session: re-create the session with the new weights as external initializers (what lcmrt does): the
  swap pays ONNX Runtime's session creation, the steady state is the fused graph's.
- inputs: the refittable weights become graph inputs fed on every run: the swap only computes weights,
  but ONNX Runtime can no longer pre-pack them or reorder convolution weights (NCHWc).
- low-rank: the LoRA branch stays unmerged in the graph (y = W x + s * B (A x)): a swap changes only the
  small factors, but every step computes the extra rank-r products.
Each strategy's UNet step is timed alternately with the fused folder's in one process (medians).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort



STRATEGIES = ("session", "inputs", "low-rank")


def unet_feeds(manifest) -> dict:
    """Random UNet inputs of a folder's static shapes (batch 1, conditional only); `manifest`: a Manifest."""
    from lcmrt.manifest import Manifest

    manifest = Manifest.of(manifest)
    s = manifest.shapes
    hidden = next(i.shape[-1] for i in manifest.component("unet").inputs if i.name == "encoder_hidden_states")
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((s.batch, s.latent_channels, s.latent_height, s.latent_width),
                                          dtype=np.float32),
            "timestep": np.full(s.batch, 759.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((s.batch, s.text_length, hidden), dtype=np.float32)}


def _session(path: Path) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - start


def _alternate(fused, other, feeds, other_feeds, repeats) -> dict:
    times, outputs = {"fused": [], "strategy": []}, {}
    for _ in range(repeats + 1):  # first round is warm-up
        for name, session, f in (("fused", fused, feeds), ("strategy", other, other_feeds)):
            start = time.perf_counter()
            outputs[name] = session.run(None, f)[0]
            times[name].append(time.perf_counter() - start)
    fused_s, strategy_s = (statistics.median(t[1:]) for t in times.values())
    return {"fused_step_s": fused_s, "strategy_step_s": strategy_s, "ratio": strategy_s / fused_s,
            "max_abs_diff_vs_fused": float(np.abs(outputs["strategy"] - outputs["fused"]).max())}


def inputs_graph(refit_dir: Path, names: set[str]) -> Path:
    """The refit folder's UNet with `names` turned into graph inputs (initializers stay as defaults)."""
    model = onnx.load(str(refit_dir / "unet.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        if init.name in names:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    path = refit_dir / "unet.inputs-strategy.onnx"  # beside the data file it refers to
    path.write_bytes(model.SerializeToString())
    return path


def lowrank_graph(model_dir: str, lcm_lora: str, lora: str, shapes: dict, out_dir: Path) -> Path:
    """The UNet with the LCM-LoRA fused and the style LoRA left as a peft branch at weight 0.8."""
    import torch
    from diffusers import StableDiffusionPipeline

    from lcmrt.export.lora import LoraSpec, fuse_loras
    from lcmrt.export.onnx_export import UNetGraph

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)
    fuse_loras(pipe, [LoraSpec(lcm_lora, 1.0, "lcm", "lcm")])
    pipe.load_lora_weights(lora, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    sample = torch.zeros(shapes["batch"], shapes["latent_channels"], shapes["latent_height"], shapes["latent_width"])
    hidden = torch.zeros(shapes["batch"], shapes["text_length"], pipe.text_encoder.config.hidden_size)
    path = out_dir / "unet.onnx"
    with torch.no_grad():
        torch.onnx.export(UNetGraph(pipe.unet).eval(), (sample, torch.tensor([759.0]), hidden), str(path),
                          input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["noise_pred"],
                          opset_version=18, dynamo=False)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--fused", "--refit", "--model", "--lcm-lora", "--lora"):
        parser.add_argument(name, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="*", choices=STRATEGIES, default=STRATEGIES,
                        help="Strategies to measure (each holds a second full UNet session: ~14 GB at full size).")
    args = parser.parse_args()

    from lcmrt.adapters import AdapterBank
    from lcmrt.manifest import read_manifest

    refit_dir = Path(args.refit)
    manifest = read_manifest(refit_dir)
    bank = AdapterBank(refit_dir, manifest)
    fused, fused_create = _session(Path(args.fused) / "unet.onnx")
    feeds = unet_feeds(manifest)
    result = {"fused_session_create_s": fused_create}

    start = time.perf_counter()
    weights = bank.weights_for({}, {"style": 0.8})["unet"]
    compute = time.perf_counter() - start
    if "session" in args.only:  # the swap computes the weights and re-creates the session with them
        result["session"] = _session_strategy(refit_dir, weights, compute, fused, feeds, args.repeats)
    if "inputs" in args.only:  # the swap only computes the weights; every run feeds them
        path = inputs_graph(refit_dir, set(weights))
        try:
            session, _ = _session(path)
            result["inputs"] = {"swap_s": compute, "refit_weights": len(weights),
                                **_alternate(fused, session, feeds, {**feeds, **weights}, args.repeats)}
            del session
        finally:
            path.unlink()
    if "low-rank" in args.only:  # the swap writes the small factors; every run computes the branch
        with tempfile.TemporaryDirectory(dir=refit_dir.parent) as tmp:
            session, _ = _session(lowrank_graph(args.model, args.lcm_lora, args.lora, manifest.data["shapes"], Path(tmp)))
            pack = bank.pack("style")
            result["low-rank"] = {"extra_params": int(sum(d.size + u.size for d, u, _ in pack.values())),
                                  **_alternate(fused, session, feeds, feeds, args.repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def _session_strategy(refit_dir: Path, weights: dict, compute: float, fused, feeds, repeats: int) -> dict:
    options = ort.SessionOptions()
    options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
    start = time.perf_counter()
    session = ort.InferenceSession(str(refit_dir / "unet.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    return {"swap_s": compute + time.perf_counter() - start, "compute_weights_s": compute,
            **_alternate(fused, session, feeds, feeds, repeats)}


if __name__ == "__main__":
    main()
