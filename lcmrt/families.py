"""Model families as data: architecture constants the runtime and the build stage share.

A family names what is fixed by the architecture (latent channels, VAE downscale, text length); sizes
(`tiny`, `full`) only exist for the random-model generator in `lcmrt.export.random_model`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel
    text_length: int  # CLIP context length


# SD1.5's training noise schedule; an engine folder's LCM scheduler config comes from its model's own.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

FAMILIES = {
    "sd15": Family("sd15", latent_channels=4, vae_scale_factor=8, text_length=77),
}


def get_family(name: str) -> Family:
    from .errors import InputError

    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"Unknown model family {name!r}; supported: {', '.join(FAMILIES)}.") from None
