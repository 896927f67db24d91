"""The guidance input of a distilled LCM UNet (a full LCM model, not LCM-LoRA).

Latent Consistency Models (arXiv 2310.04378) distill classifier-free guidance into the UNet: the guidance
scale w enters as an extra timestep-like condition, so one UNet call per step replaces the two of CFG. Its
UNet config has `time_cond_proj_dim` = D and takes `timestep_cond`, diffusers'
`get_guidance_scale_embedding` of w' = guidance_scale - 1:

    f_k = exp(-k * ln(10000) / (D/2 - 1)),  k = 0 .. D/2 - 1
    e(w') = [sin(1000 w' f_0), ..., sin(1000 w' f_{D/2-1}), cos(1000 w' f_0), ..., cos(1000 w' f_{D/2-1})]

(a zero column appended when D is odd), in float32, one row per image, computed as diffusers does in
float32 except that the exponentials and sines are rounded from float64 (numpy's float32 kernels are less
exact than torch's). torch's own float32 exp is off by an ulp for about 1 in 128 frequencies, and the angles
reach 1000 w', so an entry can differ from diffusers' by up to ~1000 w' 2^-23 (7e-4 at guidance 8.5).
"""
from __future__ import annotations

import numpy as np

TIMESTEP_COND = "timestep_cond"  # the UNet input, as diffusers names the argument


def guidance_embedding(guidance_scale: float, dim: int, batch: int) -> np.ndarray:
    """e(guidance_scale - 1) as above: [batch, dim] float32."""
    half = dim // 2
    exponents = np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1))
    freqs = np.exp(exponents.astype(np.float64)).astype(np.float32)
    angles = (np.float32(guidance_scale - 1) * np.float32(1000.0) * freqs).astype(np.float64)
    row = [np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)]
    row += [np.zeros(1, np.float32)] if dim % 2 else []
    return np.repeat(np.concatenate(row)[None, :], batch, axis=0)
