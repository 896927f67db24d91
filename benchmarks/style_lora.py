"""Write a random rank-64 style LoRA over every LCM-LoRA target module of a model (kohya format).

Usage: python -m benchmarks.style_lora MODEL_DIR OUT.safetensors [--seed N]
"""
import argparse
from pathlib import Path

from diffusers import UNet2DConditionModel

from lcmrt.export.random_model import get_preset, lcm_lora_state_dict, save_safetensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    unet = UNet2DConditionModel.from_pretrained(args.model / "unet")
    # the full preset's LCM-LoRA shape: rank 64, alpha 32, the LCM-LoRA's target modules
    tensors, metadata = lcm_lora_state_dict(unet, get_preset("sd15", "full"), seed=args.seed)
    save_safetensors(args.out, tensors, metadata)
    print(args.out)


if __name__ == "__main__":
    main()
