"""lcmrt: a small, torch-free runtime for Stable Diffusion + LCM-LoRA engine folders."""
__version__ = "0.1.0"

from .pipeline import Pipeline

__all__ = ["Pipeline", "__version__"]
