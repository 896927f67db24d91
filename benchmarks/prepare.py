"""Inputs every contender shares: the random model, lcmrt engine folders, the fused model saved as a diffusers
folder, Optimum's ONNX export of it and optimum-intel's OpenVINO export. Each step reuses what is already on disk.

`compare.py` runs the steps that need torch in child processes (`python -m benchmarks.prepare STEP ...`), so
the parent that times everyone holds no model. `optimum-export` runs in `benchmarks/.venv-optimum`,
`openvino-export` in `benchmarks/.venv-openvino`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"  # every venv: installed first, from the local CPU wheel, and held by a constraint


@dataclass(frozen=True)
class PeerVenv:
    """A venv beside lcmrt's for contenders whose pins conflict with lcmrt's: `benchmarks/.venv-NAME`, created on
    first use (torch first, then `packages` with torch held, then `remove` uninstalled)."""

    name: str
    packages: tuple[str, ...]
    remove: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return HERE / f".venv-{self.name}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


# Optimum's ONNX Runtime package pins transformers<4.58, hence an older stack beside lcmrt's (FIELD-NOTES.md:
# this set is known to work together).
OPTIMUM = PeerVenv("optimum", ("optimum-onnx[onnxruntime]==0.1.0", "transformers==4.57.6", "diffusers==0.39.0",
                               "huggingface-hub==0.36.2"))
# optimum-intel pins huggingface-hub<1.22, which diffusers >= 0.40 (lcmrt's) does not accept. optimum-intel pulls
# torchvision, whose wheel does not match the CPU torch (transformers' import then fails on `torchvision::nms`);
# nothing here uses it.
OPENVINO = PeerVenv("openvino", ("optimum-intel[openvino]==2.2.0", "optimum==2.3.0", "openvino==2026.4.1",
                                 "openvino-genai==2026.4.1.0", "openvino-tokenizers==2026.4.1.0", "nncf==3.4.0",
                                 "transformers==5.5.4", "diffusers==0.39.0", "huggingface-hub==1.21.0"),
                    remove=("torchvision",))
TEXT_MODEL_PREFIX = "text_model."


def ensure_venv(venv: PeerVenv, log) -> str | None:
    """Create `venv` if needed; return None when ready, else why it is not."""
    marker = venv.path / ".installed"
    if marker.is_file():
        return None
    log(f"installing {venv.name} into {venv.path} (a few minutes, once)")
    pins = venv.path / "torch-pin.txt"
    pip = [str(venv.python), "-m", "pip", "install", "-q"]
    steps = [[sys.executable, "-m", "venv", str(venv.path)], [*pip, TORCH], [*pip, "-c", str(pins), *venv.packages]]
    if venv.remove:
        steps.append([str(venv.python), "-m", "pip", "uninstall", "-q", "-y", *venv.remove])
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip().splitlines()[-1:]}"
        pins.write_text(f"{TORCH}\n")  # after the first step: the venv's folder exists
    marker.touch()
    return None


def engine_folder_ok(folder: Path, height: int, width: int, batch: int, guidance_mode: str) -> bool:
    """Is `folder` a readable engine folder with these shapes (and the cfg batch where guidance needs it)?"""
    from lcmrt.errors import EngineFolderError
    from lcmrt.manifest import read_manifest

    try:
        m = read_manifest(folder)
    except EngineFolderError:
        return False
    s = m.shapes
    guided_ok = guidance_mode == "none" or m.guidance_mode == "cfg"
    return (s.height, s.width, s.batch) == (height, width, batch) and guided_ok


def save_fused_diffusers(model: Path, lcm_lora: Path, out: Path) -> None:
    """The model with the LCM-LoRA fused (the same fuse as `lcmrt build`), saved as a diffusers folder whose
    text encoder older transformers versions read correctly."""
    from safetensors.torch import load_file, save_file

    from lcmrt.export.loading import load_model
    from lcmrt.export.lora import LoraSpec, fuse_loras

    pipe = load_model(str(model)).pipe  # StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL families
    fuse_loras(pipe, [LoraSpec(lcm_lora, weight=1.0, name="lcm", role="lcm")])
    tmp = out.with_name(f".{out.name}.partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; transformers 4.57 (Optimum's) would
    # then load random weights with only a log line. Re-save the keys with the prefix.
    weights = tmp / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    if not all(k.startswith(TEXT_MODEL_PREFIX) for k in state):
        save_file({(k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k): v for k, v in state.items()},
                  weights, metadata={"format": "pt"})
    # transformers 5 saves the tokenizer as tokenizer.json only, which 4.57's slow CLIPTokenizer cannot read:
    # name the fast class, which reads exactly that file.
    for path, key in ((tmp / "model_index.json", "tokenizer"), (tmp / "tokenizer" / "tokenizer_config.json", None)):
        config = json.loads(path.read_text())
        if key:
            config[key] = ["transformers", "CLIPTokenizerFast"]
        else:
            config["tokenizer_class"] = "CLIPTokenizerFast"
        path.write_text(json.dumps(config, indent=2))
    os.replace(tmp, out)


def optimum_export(fused: Path, out: Path) -> None:
    """Export the fused diffusers folder with Optimum (run in its venv), after checking that every text
    encoder weight loads (the prefix trap above)."""
    from optimum.exporters.onnx import main_export
    from transformers import CLIPTextModel

    _, info = CLIPTextModel.from_pretrained(str(fused / "text_encoder"), output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"{fused / 'text_encoder'}: transformers would not load every weight "
                         f"(missing {info['missing_keys'][:3]}, unexpected {info['unexpected_keys'][:3]})")
    tmp = out.with_name(f".{out.name}.partial")
    # Optimum's CLI export (`optimum-cli export onnx`); ORTStableDiffusionPipeline.from_pretrained(export=True)
    # fails to infer the library in optimum-onnx 0.1.0
    main_export(str(fused), output=str(tmp), task="text-to-image", library_name="diffusers", device="cpu",
                do_validation=False)  # the weights are checked above; validation would add minutes at full size
    os.replace(tmp, out)


def openvino_export(fused: Path, out: Path) -> None:
    """Export the fused diffusers folder to OpenVINO's format with optimum-intel's CLI (run in its venv), fp32
    weights, tokenizer converted as well: the folder both optimum-intel and OpenVINO GenAI load."""
    tmp = out.with_name(f".{out.name}.partial")
    cli = Path(sys.executable).with_name("optimum-cli")
    proc = subprocess.run([str(cli), "export", "openvino", "--model", str(fused), "--task", "text-to-image",
                           "--library", "diffusers", "--weight-format", "fp32", str(tmp)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"optimum-intel's export failed: {proc.stderr[-2000:]}")
    os.replace(tmp, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("fused-diffusers")
    p.add_argument("model", type=Path)
    p.add_argument("lcm_lora", type=Path)
    p.add_argument("out", type=Path)
    for step in ("optimum-export", "openvino-export"):
        p = sub.add_parser(step)
        p.add_argument("fused", type=Path)
        p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.step == "fused-diffusers":
        save_fused_diffusers(args.model, args.lcm_lora, args.out)
    elif args.step == "optimum-export":
        optimum_export(args.fused, args.out)
    else:
        openvino_export(args.fused, args.out)


if __name__ == "__main__":
    main()
