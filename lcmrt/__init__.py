"""lcmrt: a small, torch-free runtime for Stable Diffusion + LCM-LoRA engine folders."""
__version__ = "0.1.0"
