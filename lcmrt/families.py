"""Model families as data: architecture constants the runtime and the build stage share.

A family names what is fixed by the architecture: latent channels, VAE downscale, text length, and how the
prompt conditions the UNet. SD1.5 has one CLIP text encoder whose last hidden state is the UNet's
`encoder_hidden_states`. SDXL and SSD-1B (a distilled SDXL UNet, same conditioning) have two: the
penultimate hidden states of both, concatenated on the feature axis, and the pooled projection of the
second as the UNet's `text_embeds`, with `time_ids` (original size, crop top-left, target size) beside it,
as diffusers' StableDiffusionXLPipeline builds them. Sizes (`tiny`, `full`) only exist for the random-model
generator in `lcmrt.export.random_model`.
"""
from __future__ import annotations

from dataclasses import dataclass

# The graph outputs of a text encoder: its hidden states for the UNet, and (SDXL's second encoder) the
# pooled projection.
LAST_HIDDEN_STATE = "last_hidden_state"
PENULTIMATE_HIDDEN_STATE = "penultimate_hidden_state"
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"


@dataclass(frozen=True)
class Family:
    name: str
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel
    text_length: int  # CLIP context length
    # text encoder components, in the order their hidden states are concatenated; the first is "text_encoder",
    # and each reads the tokenizer named as diffusers names it (text_encoder_2 -> tokenizer_2)
    text_encoders: tuple[str, ...] = ("text_encoder",)
    hidden_state: str = LAST_HIDDEN_STATE  # which hidden states condition the UNet
    pooled_text_encoder: str | None = None  # its TEXT_EMBEDS output is the UNet's text_embeds input
    time_ids: bool = False  # SDXL's size and crop conditioning

    @property
    def components(self) -> tuple[str, ...]:
        """The components a text-to-image generation runs."""
        return (*self.text_encoders, "unet", "vae_decoder")


# Components a generation loads on first use: the VAE encoder (img2img, inpainting) and the tiny VAE's encoder
# and decoder that `lcmrt build --tiny-vae` adds (fast encode and decode, e.g. for streams).
ON_DEMAND_COMPONENTS = ("vae_encoder", "tiny_vae_encoder", "tiny_vae_decoder")


def tokenizer_key(text_encoder: str) -> str:
    """The tokenizer of a text encoder component, as diffusers names them (text_encoder_2 -> tokenizer_2)."""
    return text_encoder.replace("text_encoder", "tokenizer", 1)


# SD1.5's training noise schedule (SDXL's too); an engine folder's LCM scheduler config comes from its model's own.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_SDXL_CONDITIONING = dict(text_encoders=("text_encoder", "text_encoder_2"), hidden_state=PENULTIMATE_HIDDEN_STATE,
                          pooled_text_encoder="text_encoder_2", time_ids=True)
FAMILIES = {
    "sd15": Family("sd15", latent_channels=4, vae_scale_factor=8, text_length=77),
    "sdxl": Family("sdxl", latent_channels=4, vae_scale_factor=8, text_length=77, **_SDXL_CONDITIONING),
    "ssd1b": Family("ssd1b", latent_channels=4, vae_scale_factor=8, text_length=77, **_SDXL_CONDITIONING),
}


def get_family(name: str) -> Family:
    from .errors import InputError

    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"Unknown model family {name!r}; supported: {', '.join(FAMILIES)}.") from None
