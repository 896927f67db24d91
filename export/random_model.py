"""Random-weight Stable Diffusion models of real architectures, with an LCM-LoRA and a style LoRA.

No weights can be downloaded where lcmrt is built and tested, so every command can instead run on a model
generated here, for each arch (`sd15`: SD1.5; `sdxl`: SDXL base 1.0; `ssd1b`: Segmind's SSD-1B, a distilled
SDXL UNet with SDXL's text encoders, VAE and conditioning): the real architecture (`full`, for benchmarks) or
the same block types and conditioning at a tiny width (`tiny`, seconds to build, for tests and the README
demo). OUT/model is the diffusers folder the arch ships as (StableDiffusionPipeline for sd15,
StableDiffusionXLPipeline with its two text encoders and tokenizers for sdxl and ssd1b). Next to the model go
two LoRA files in the formats met in the field: an LCM-LoRA in kohya format like
`latent-consistency/lcm-lora-sdv1-5`, `lcm-lora-sdxl` and `lcm-lora-ssd-1b` (LCM-LoRA: arXiv 2311.05556) and a
style LoRA in diffusers/peft format on the UNet and every text encoder. On request (`taesd=True`) also a tiny
VAE in TAESD's architecture (diffusers' AutoencoderTiny; TAESDXL has the same one), for `--vae-decoder`. With
`inpaint=True` OUT/model is the arch's inpainting variant instead, as `stable-diffusion-inpainting` and
`stable-diffusion-xl-1.0-inpainting-0.1` ship (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline):
the same model with a 9-channel UNet input (latents, mask, masked-image latents); LoRAs, VAE and text encoders stay
the regular model's bytes.

The CLIP tokenizer is trained here too: CLIP's pipeline (normalizer, split regex, byte-level BPE with
`</w>` word ends, `<|startoftext|>`/`<|endoftext|>`) on a small built-in prompt corpus, because the real
49408-token vocabulary cannot be downloaded. Everything is seeded: the same seed writes the same bytes.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save

from ..errors import InputError
from ..families import SD15_SCHEDULER

# Module names the real LCM-LoRA for SD1.5 trains (FIELD-NOTES.md, "LoRA"), and those for SDXL and SSD-1B
# too; a UNet module is a target when its dotted name ends with one of these.
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
STYLE_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
STYLE_TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
# Style LoRAs in the field were written against transformers 4's CLIP text models, whose layers sit under
# `text_model.`; transformers 5 dropped that level from CLIPTextModel (diffusers maps the old names onto it)
# but not from CLIPTextModelWithProjection (SDXL's text_encoder_2).
STYLE_KEY_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.text_model.",
                      "text_encoder_2": "text_encoder_2.text_model."}

# LoRA up factors are drawn with this std times 1/sqrt(rank), down factors with 1/sqrt(fan_in): each
# layer's update is about a tenth of its default-initialized weight. Measured on the UNet's output
# (16x16 latent): LCM-LoRA moves it by 18% (tiny) / 24% (full), the style LoRA by 4% / 5%.
LORA_UP_STD = 0.1

TOKENIZER_MAX_LENGTH = 77  # CLIP's context length
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's pad and unk token
OPEN_CLIP_PAD_TOKEN = "!"  # SDXL's tokenizer_2 (OpenCLIP's) pads with "!", id 0, not with <|endoftext|>
# BPE stops merging when no pair occurs this often: rarer merges would only memorize single words.
BPE_MIN_PAIR_COUNT = 2
# A default-initialized TAESD decoder outputs ~0.04 +- 0.05 (real ones: an image in [0, 1]), i.e. a nearly
# black, partly clipped image; its last conv is rescaled to mid-gray with this spread, so image comparisons
# see every pixel.
TAESD_OUTPUT_MEAN, TAESD_OUTPUT_STD = 0.5, 0.15
LATENT_CHANNELS = 4  # SD's VAE latents, and the UNet's output
# An inpainting UNet's input: latents, mask, masked image's latents (stable-diffusion-inpainting's conv_in).
INPAINT_IN_CHANNELS = LATENT_CHANNELS + 1 + LATENT_CHANNELS


@dataclass(frozen=True)
class RandomModelArch:
    """What an arch fixes at every size: the pipeline folder, its scheduler, its text encoders."""

    pipeline: str  # diffusers pipeline class of OUT/model
    pipeline_config: dict  # its other constructor kwargs (model_index.json records them)
    scheduler: str  # diffusers scheduler class, made with from_config(scheduler_config)
    scheduler_config: dict  # the real model's scheduler_config.json
    # (component, transformers class, its tokenizer's pad token) per text encoder, in the pipeline's order;
    # text_encoder_N reads tokenizer_N, as diffusers names them, and its config is the preset's field of its name
    text_encoders: tuple[tuple[str, str, str], ...]
    kohya_base_model: str  # the LCM-LoRA's ss_base_model_version, as kohya's sd-scripts writes it
    inpaint_pipeline: str  # diffusers pipeline class of the arch's inpainting variant
    inpaint_pipeline_config: dict = field(default_factory=dict)  # what it adds to pipeline_config


@dataclass(frozen=True)
class RandomModelPreset:
    """One (arch, size): component configs plus the shapes of the LoRAs that go with them."""

    arch: RandomModelArch
    unet: dict  # UNet2DConditionModel kwargs
    vae: dict  # AutoencoderKL kwargs
    text_encoder: dict  # CLIPTextConfig kwargs; vocab_size None means the tokenizer's size
    lcm_rank: int
    lcm_alpha: float  # != rank so that the alpha / rank scaling is exercised
    style_rank: int  # style LoRA has no alpha keys: alpha = rank
    taesd: dict  # AutoencoderTiny kwargs (TAESD's architecture: github.com/madebyollin/taesd)
    text_encoder_2: dict | None = None  # as text_encoder, for the arch's second one (SDXL's OpenCLIP bigG)


# The scheduler SD1.5 ships (PNDM); LCMScheduler.from_config reads the same betas from it.
SD15_PNDM_SCHEDULER = {
    "num_train_timesteps": SD15_SCHEDULER["num_train_timesteps"],
    "beta_start": SD15_SCHEDULER["beta_start"],
    "beta_end": SD15_SCHEDULER["beta_end"],
    "beta_schedule": SD15_SCHEDULER["beta_schedule"],
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# The scheduler SDXL base 1.0 and SSD-1B ship (Euler), with SD1.5's betas. Keys Euler does not take (left
# from SD's DDIM/PNDM configs) stay in the file as in the real one; LCMScheduler.from_config reads
# set_alpha_to_one from them.
SDXL_EULER_SCHEDULER = {
    **SD15_SCHEDULER,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

SD15 = RandomModelArch(
    pipeline="StableDiffusionPipeline",
    pipeline_config=dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    scheduler="PNDMScheduler", scheduler_config=SD15_PNDM_SCHEDULER,
    text_encoders=(("text_encoder", "CLIPTextModel", EOS_TOKEN),),
    kohya_base_model="sd_v1",
    inpaint_pipeline="StableDiffusionInpaintPipeline",  # as stable-diffusion-v1-5/stable-diffusion-inpainting
)
SDXL = RandomModelArch(
    pipeline="StableDiffusionXLPipeline",
    # as SDXL's model_index.json; no invisible watermark (an optional package, and it would alter the images)
    pipeline_config=dict(image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
                         add_watermarker=False),
    scheduler="EulerDiscreteScheduler", scheduler_config=SDXL_EULER_SCHEDULER,
    text_encoders=(("text_encoder", "CLIPTextModel", EOS_TOKEN),
                   ("text_encoder_2", "CLIPTextModelWithProjection", OPEN_CLIP_PAD_TOKEN)),
    kohya_base_model="sdxl_base_v1-0",
    # as diffusers/stable-diffusion-xl-1.0-inpainting-0.1's model_index.json: no aesthetic score, so the UNet's
    # time ids stay base 1.0's six size/crop numbers (with it, the refiner's five)
    inpaint_pipeline="StableDiffusionXLInpaintPipeline",
    inpaint_pipeline_config=dict(requires_aesthetics_score=False),
)

# TAESD as diffusers ships it (madebyollin/taesd): 64 channels, 1.22M decoder params, scaling_factor 1.0
# (it decodes SD's scaled latents as they are). TAESDXL (madebyollin/taesdxl) has the same config.
TAESD_FULL = dict(
    encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), latent_channels=4,
    act_fn="relu", upsample_fn="nearest", upsampling_scaling_factor=2, latent_magnitude=3,
    latent_shift=0.5, scaling_factor=1.0,
)
TAESD_TINY = {**TAESD_FULL, "encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8)}

SD15_FULL = RandomModelPreset(
    arch=SD15,
    # The SD1.5 UNet (859.5M params); the bare UNet2DConditionModel default has cross_attention_dim 1280.
    unet=dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    vae=dict(
        sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, scaling_factor=0.18215,
    ),
    # CLIP ViT-L/14's text tower
    text_encoder=dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=768,
    ),
    lcm_rank=64, lcm_alpha=32.0, style_rank=16, taesd=TAESD_FULL,
)

SD15_TINY = RandomModelPreset(
    arch=SD15,
    # Same block types as SD1.5 (so every LCM-LoRA target exists), 16x16 latents = 128x128 images.
    unet=dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ),
    vae=dict(
        sample_size=128, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 32, 32),  # four blocks: the same 8x downscale as SD's VAE
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=32,
    ),
    lcm_rank=8, lcm_alpha=4.0, style_rank=4, taesd=TAESD_TINY,
)

# SDXL's UNet conditions on the concatenated hidden states of both text encoders (cross_attention_dim =
# hidden + hidden_2) and, through add_embedding, on text_encoder_2's pooled projection plus six size/crop
# numbers each embedded at addition_time_embed_dim (projection_class_embeddings_input_dim =
# 6 * addition_time_embed_dim + projection_dim_2).
SDXL_FULL = RandomModelPreset(
    arch=SDXL,
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.57B params; its LCM-LoRA at rank 64 has
    # 197M, as lcm-lora-sdxl's 394 MB in fp16); attention_head_dim is diffusers' name for the number of
    # heads here, 64 channels each.
    unet=dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=768 + 1280, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    ),
    # SDXL's VAE: SD's architecture, its own latent scale; force_upcast as it overflows in fp16
    vae={**SD15_FULL.vae, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoder=SD15_FULL.text_encoder,  # CLIP ViT-L/14's text tower, as in SD1.5
    # OpenCLIP ViT-bigG/14's text tower with its projection
    text_encoder_2=dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=TOKENIZER_MAX_LENGTH, hidden_act="gelu",
        projection_dim=1280,
    ),
    lcm_rank=64, lcm_alpha=32.0, style_rank=16, taesd=TAESD_FULL,
)

# SSD-1B (segmind/SSD-1B, arXiv 2401.02677) is SDXL's UNet with transformer blocks distilled away
# (1.33B params): the 1280-channel level keeps 4 of 10 per attention on the way down and 4, 4, 10 on the
# way up, the 640-channel one 2, 1, 1 of 2, 2, 2 on the way up, and the mid block is a single resnet.
SSD1B_FULL = replace(SDXL_FULL, unet={
    **SDXL_FULL.unet,
    "transformer_layers_per_block": (1, (2, 2), (4, 4)),
    "reverse_transformer_layers_per_block": ((4, 4, 10), (2, 1, 1), (1, 1, 1)),
    "mid_block_type": "UNetMidBlock2D",
})

SDXL_TINY = RandomModelPreset(
    arch=SDXL,
    # SDXL's block types and conditioning at SD15_TINY's width; two transformer blocks per attention at
    # the low-resolution level, as SDXL has more there.
    unet=dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
        cross_attention_dim=32 + 32, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
    vae={**SD15_TINY.vae, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoder=SD15_TINY.text_encoder,
    text_encoder_2={**SD15_TINY.text_encoder, "hidden_act": "gelu"},
    lcm_rank=8, lcm_alpha=4.0, style_rank=4, taesd=TAESD_TINY,
)

# SSD-1B's distillation at the tiny width: the attention level keeps 1 of 2 transformer blocks on the way
# down and in the up block's first two attentions, and the mid block loses its attention.
SSD1B_TINY = replace(SDXL_TINY, unet={
    **SDXL_TINY.unet,
    "transformer_layers_per_block": (1, (1, 1)),
    "reverse_transformer_layers_per_block": ((1, 1, 2), (1, 1, 1)),
    "mid_block_type": "UNetMidBlock2D",
})

PRESETS: dict[tuple[str, str], RandomModelPreset] = {
    ("sd15", "tiny"): SD15_TINY,
    ("sd15", "full"): SD15_FULL,
    ("sdxl", "tiny"): SDXL_TINY,
    ("sdxl", "full"): SDXL_FULL,
    ("ssd1b", "tiny"): SSD1B_TINY,
    ("ssd1b", "full"): SSD1B_FULL,
}

# Prompt-like English the tokenizer is trained on. Word frequencies decide the merges, so common
# prompt words end up as one or two tokens, as with the real CLIP vocabulary.
TOKENIZER_CORPUS = """
a photo of a cat sitting on a wooden table, high quality, detailed
a photograph of an astronaut riding a horse on the moon, cinematic lighting
portrait of a young woman with red hair, soft light, bokeh, 85mm lens
a painting of a lighthouse by the sea at sunset, oil on canvas, impressionist style
a cute dog wearing sunglasses, studio lighting, sharp focus, highly detailed
an old man reading a book in a library, warm colors, dramatic shadows
a futuristic city at night with neon lights and flying cars, digital art
a bowl of fruit on a kitchen counter, still life, natural light
a mountain landscape with a lake and pine trees, morning fog, beautiful scenery
a red sports car driving through the desert, motion blur, photorealistic
a castle on a hill under a starry sky, fantasy art, magical atmosphere
a close up of a flower with water drops, macro photography, vibrant colors
a robot playing the piano in a concert hall, concept art, trending on artstation
a watercolor painting of a small village in the snow, winter evening
a black and white photo of a street in paris, rainy day, people with umbrellas
a dragon flying over the ocean, epic, dramatic clouds, golden hour
a cozy cabin in the forest, autumn leaves, smoke from the chimney
an illustration of a fox in a green meadow, children book style, soft pastel colors
a bird sitting on a branch, spring blossoms, shallow depth of field
a pirate ship in a storm, huge waves, lightning, dark sky
a plate of pasta with tomato sauce and basil, food photography
a knight in shining armor holding a sword, medieval, heroic pose
an abstract pattern of circles and lines, minimal, geometric design
a paper cut style landscape with layered hills and a river, papercut art
a cyberpunk girl with headphones, pink and blue light, anime style
a tiger walking through the jungle, national geographic, award winning photo
a glass of wine on a balcony overlooking the city, evening light
a steampunk airship above the clouds, brass and copper, intricate details
a snowy mountain peak at sunrise, clear blue sky, wide angle
a teddy bear having a picnic in the park, sunny day, happy
the interior of a modern living room, white walls, large windows, plants
a beautiful garden with roses and a stone fountain, summer afternoon
a sketch of a horse, pencil drawing, simple lines
ugly, blurry, low quality, bad anatomy, extra fingers, watermark, text, deformed
masterpiece, best quality, ultra realistic, 4k, 8k, hdr, unreal engine, octane render
"""


def get_preset(arch: str, size: str) -> RandomModelPreset:
    try:
        return PRESETS[(arch, size)]
    except KeyError:
        choices = ", ".join(f"--arch {a} --size {s}" for a, s in PRESETS)
        raise InputError(f"No random model for arch {arch!r} and size {size!r}; choose one of: {choices}.") from None


def inpainting_preset(preset: RandomModelPreset) -> RandomModelPreset:
    """The preset's inpainting variant: its arch's inpainting pipeline, a UNet taking INPAINT_IN_CHANNELS."""
    arch = preset.arch
    arch = replace(arch, pipeline=arch.inpaint_pipeline,
                   pipeline_config={**arch.pipeline_config, **arch.inpaint_pipeline_config})
    return replace(preset, arch=arch, unet={**preset.unet, "in_channels": INPAINT_IN_CHANNELS})


RANDOM_MODEL_ENTRIES = {"model", "lcm-lora.safetensors", "style-lora.safetensors", "taesd"}


def _check_replaceable(out: Path) -> None:
    """`--overwrite` deletes OUT: allow it only for a folder this command wrote (nothing else in it)."""
    entries = {p.name for p in out.iterdir()} if out.is_dir() and not out.is_symlink() else None
    if entries is None or not (out / "model" / "model_index.json").is_file() or not entries <= RANDOM_MODEL_ENTRIES:
        raise InputError(f"--overwrite only replaces a folder written by `lcmrt random-model`, and {out} is not one "
                         f"(it should hold only {', '.join(sorted(RANDOM_MODEL_ENTRIES))}). Choose another folder, "
                         "or remove it yourself if it is yours to delete.")


def write_random_model(out: Path, arch: str = "sd15", size: str = "tiny", seed: int = 0,
                       overwrite: bool = False, taesd: bool = False, inpaint: bool = False) -> dict[str, Path]:
    """Write OUT/model (a diffusers folder), OUT/lcm-lora.safetensors and OUT/style-lora.safetensors; with
    `taesd`, also OUT/taesd (an AutoencoderTiny folder). With `inpaint`, OUT/model is the inpainting variant
    (9-channel UNet, the arch's inpaint pipeline); every other file is the same."""
    out = Path(out)
    preset = get_preset(arch, size)
    if inpaint:
        preset = inpainting_preset(preset)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{out} already exists. Pass --overwrite to replace it, or choose another folder.")
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to OUT and rename at the end, so an interrupted run never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; OUT should be an ordinary folder
    try:
        pipe = build_pipeline(preset, seed)
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        lcm, lcm_meta = lcm_lora_state_dict(pipe.unet, preset, seed)
        save_safetensors(tmp / "lcm-lora.safetensors", lcm, lcm_meta)
        models = {"unet": pipe.unet, **{name: getattr(pipe, name) for name, _, _ in preset.arch.text_encoders}}
        save_safetensors(tmp / "style-lora.safetensors", style_lora_state_dict(models, preset, seed))
        if taesd:
            build_taesd(preset, seed).save_pretrained(tmp / "taesd", safe_serialization=True)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {"model": out / "model", "lcm_lora": out / "lcm-lora.safetensors",
             "style_lora": out / "style-lora.safetensors"}
    return {**paths, "taesd": out / "taesd"} if taesd else paths


def build_pipeline(preset: RandomModelPreset, seed: int):
    """The arch's diffusers pipeline with freshly initialized weights (torch's default inits, seeded)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    arch = preset.arch
    tokenizers, te_configs = {}, {}
    for name, _, pad_token in arch.text_encoders:
        tokenizer = build_clip_tokenizer(pad_token)
        config = dict(getattr(preset, name))
        config["vocab_size"] = config["vocab_size"] or len(tokenizer)
        # CLIPTextModel pools at the first eos_token_id, so the ids must be the tokenizer's own.
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        tokenizers[name.replace("text_encoder", "tokenizer", 1)] = tokenizer
        te_configs[name] = config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # one stream, drawn in this order: unet, vae, the text encoders
        # Drawn with the regular input whatever the preset's, so an inpainting UNet only adds input channels
        # (as the real inpainting models were made from their base) and every other weight keeps its bytes.
        unet = UNet2DConditionModel(**{**preset.unet, "in_channels": LATENT_CHANNELS})
        vae = AutoencoderKL(**preset.vae)
        text_encoders = {name: getattr(transformers, cls)(CLIPTextConfig(**te_configs[name])).eval()
                         for name, cls, _ in arch.text_encoders}
    if preset.unet["in_channels"] != LATENT_CHANNELS:
        widen_conv_in(unet, preset.unet["in_channels"], seed)
    scheduler = getattr(diffusers, arch.scheduler).from_config(arch.scheduler_config)
    return getattr(diffusers, arch.pipeline)(vae=vae.eval(), unet=unet.eval(), scheduler=scheduler,
                                             **text_encoders, **tokenizers, **arch.pipeline_config)


def widen_conv_in(unet, in_channels: int, seed: int) -> None:
    """Give the UNet's conv_in `in_channels` inputs: the first ones keep their weights, the new ones (an
    inpainting UNet's mask and masked-image latents) get torch's default init from their own stream.

    The real inpainting models zero-initialized them before training; random ones stay random here so that
    the mask and the masked image move the output, as they do in a trained model.
    """
    old = unet.conv_in  # weight [C, 4, 3, 3]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, 5]).generate_state(1)[0]))
        new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, padding=old.padding)
    with torch.no_grad():
        new.weight[:, :old.in_channels] = old.weight  # weight [C, in_channels, 3, 3]
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def build_taesd(preset: RandomModelPreset, seed: int):
    """An AutoencoderTiny of TAESD's architecture, seeded, its decoder output set to mid-gray."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        # its own stream: the main model's weights stay the same bytes with or without it
        torch.manual_seed(int(np.random.SeedSequence([seed, 3]).generate_state(1)[0]))
        vae = AutoencoderTiny(**preset.taesd).eval()
        latents = torch.randn(1, preset.taesd["latent_channels"], 8, 8)
    layers = vae.decoder.layers
    with torch.no_grad():
        # as DecoderTiny.forward: soft clamp, layers (its [0, 1] -> [-1, 1] comes after)
        out = layers[:-1](torch.tanh(latents / 3) * 3)
        out = layers[-1](out)  # [1, 3, 64, 64]
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        gain = TAESD_OUTPUT_STD / std
        layers[-1].weight.mul_(gain[:, None, None, None])
        layers[-1].bias.copy_((layers[-1].bias - mean) * gain + TAESD_OUTPUT_MEAN)
    return vae


# ---------------------------------------------------------------------------------------------- LoRAs

def save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """safetensors' own writer, with the metadata in sorted order so the bytes depend on the content only.

    safetensors keeps metadata in a hash map: with more than one entry its order changes between processes.
    """
    blob = save(tensors, metadata=metadata)
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    # offsets count from the end of the header, which stays padded to 8 bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + header_len:])


def target_modules(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) for every Linear/Conv2d whose dotted name ends with one of `suffixes`, in model order."""
    found = []
    for name, module in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                raise TypeError(f"LoRA target {name} is a {type(module).__name__}, not Linear or Conv2d")
            found.append((name, module))
    return found


def _lora_factors(module: torch.nn.Module, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) as peft and kohya store them: linear [r, in] / [out, r]; conv [r, in, kh, kw] / [out, r, 1, 1]."""
    weight_shape = tuple(module.weight.shape)  # linear [out, in]; conv [out, in, kh, kw]
    out_features, in_shape = weight_shape[0], weight_shape[1:]
    down = rng.standard_normal((rank, *in_shape)) / np.sqrt(np.prod(in_shape))
    up = rng.standard_normal((out_features, rank) + (1,) * (len(weight_shape) - 2)) * (LORA_UP_STD / np.sqrt(rank))
    return down, up


def lcm_lora_state_dict(unet, preset: RandomModelPreset, seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An LCM-LoRA shaped like lcm-lora-sdv1-5 (-sdxl, -ssd-1b): kohya keys, fp16, UNet only, with alpha; and
    kohya metadata."""
    rng = np.random.default_rng([seed, 1])
    tensors = {}
    for name, module in target_modules(unet, LCM_LORA_TARGETS):
        down, up = _lora_factors(module, preset.lcm_rank, rng)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
        tensors[f"{key}.lora_up.weight"] = up.astype(np.float16)
        tensors[f"{key}.alpha"] = np.array(preset.lcm_alpha, dtype=np.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(preset.lcm_rank),
        "ss_network_alpha": str(preset.lcm_alpha),
        "ss_base_model_version": preset.arch.kohya_base_model,
        "ss_output_name": "lcm-lora-random",
    }
    return tensors, metadata


def style_lora_state_dict(models: dict[str, torch.nn.Module], preset: RandomModelPreset,
                          seed: int) -> dict[str, np.ndarray]:
    """A style LoRA in diffusers/peft format (`unet.*`, `text_encoder.text_model.*`, `text_encoder_2.text_model.*`,
    lora_A/lora_B, fp32, no alpha) on `models`: component name -> module, the UNet first."""
    rng = np.random.default_rng([seed, 2])
    tensors = {}
    for component, model in models.items():
        suffixes = STYLE_UNET_TARGETS if component == "unet" else STYLE_TEXT_TARGETS
        prefix = STYLE_KEY_PREFIXES[component]
        for name, module in target_modules(model, suffixes):
            name = name.removeprefix("text_model.")  # where transformers has the level, the prefix has it
            down, up = _lora_factors(module, preset.style_rank, rng)
            tensors[f"{prefix}{name}.lora_A.weight"] = down.astype(np.float32)
            tensors[f"{prefix}{name}.lora_B.weight"] = up.astype(np.float32)
    return tensors


# ------------------------------------------------------------------------- kohya SDXL (SGM) LoRAs
# kohya's sd-scripts trains SDXL on its own copy of Stability's UNet (sdxl_original_unet.py), so SDXL LoRAs from
# its trainer name UNet modules as the original checkpoint does (generative-models' "sgm" layout): a flat
# `input_blocks` list (conv_in, then per level one entry per resnet with its attention, then the downsampler),
# `middle_block` (resnet, attention, resnet) and `output_blocks` (per level one entry per resnet with its
# attention and, last, the upsampler). The text encoders are `lora_te1_`/`lora_te2_` plus transformers' CLIP
# names under `text_model.`. Its LoRA targets every Linear of the attentions (Transformer2DModel) and, with
# `conv_dim`, the convolutions and Linears of ResnetBlock2D, Downsample2D and Upsample2D; in the text encoders
# CLIPAttention and CLIPMLP.
SGM_RESNET_NAMES = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                    "conv_shortcut": "skip_connection"}
SGM_SAMPLER_NAMES = {"downsamplers": "op", "upsamplers": "conv"}  # the sampler's conv
KOHYA_TEXT_TARGETS = STYLE_TEXT_TARGETS + ("mlp.fc1", "mlp.fc2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# kohya's trainer writes network_alpha into every module; half the rank is a common choice (and != rank, so the
# alpha / rank scale is exercised).
KOHYA_ALPHA_PER_RANK = 0.5


def sgm_block_names(unet) -> dict[str, str]:
    """{diffusers block: SGM block} of a UNet2DConditionModel, e.g. `down_blocks.1.attentions.0` ->
    `input_blocks.4.1`, read off the UNet's own block structure (any levels and layers per block)."""
    names = {}
    k = 1  # input_blocks.0 is conv_in
    for d, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for i in range(len(block.resnets)):
            names[f"down_blocks.{d}.resnets.{i}"] = f"input_blocks.{k}.0"
            if i < len(attentions):
                names[f"down_blocks.{d}.attentions.{i}"] = f"input_blocks.{k}.1"
            k += 1
        if getattr(block, "downsamplers", None):
            names[f"down_blocks.{d}.downsamplers.0"] = f"input_blocks.{k}.0"
            k += 1
    mid = unet.mid_block
    for i in range(len(mid.resnets) if mid is not None else 0):  # resnet, attention, resnet, ...
        names[f"mid_block.resnets.{i}"] = f"middle_block.{2 * i}"
        if i < len(mid.attentions) and mid.attentions[i] is not None:
            names[f"mid_block.attentions.{i}"] = f"middle_block.{2 * i + 1}"
    k = 0
    for u, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for i in range(len(block.resnets)):
            names[f"up_blocks.{u}.resnets.{i}"] = f"output_blocks.{k}.0"
            if i < len(attentions):
                names[f"up_blocks.{u}.attentions.{i}"] = f"output_blocks.{k}.1"
            if i == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                names[f"up_blocks.{u}.upsamplers.0"] = f"output_blocks.{k}.{2 if i < len(attentions) else 1}"
            k += 1
    return names


def sgm_module_name(name: str, blocks: dict[str, str]) -> str | None:
    """The SGM name of the UNet module `name` (diffusers), or None where no block of `blocks` holds it."""
    block, rest = _split_block(name, blocks)
    if block is None:
        return None
    kind = block.split(".")[-2]  # resnets, attentions (same names inside), downsamplers or upsamplers
    if kind == "resnets":
        rest = SGM_RESNET_NAMES.get(rest)
    elif kind != "attentions":
        rest = SGM_SAMPLER_NAMES[kind] if rest == "conv" else None
    return None if rest is None else f"{blocks[block]}.{rest}"


def _split_block(name: str, blocks: dict[str, str]) -> tuple[str | None, str]:
    parts = name.split(".")
    for n in (4, 3):  # down_blocks.0.resnets.1 | mid_block.resnets.0
        if ".".join(parts[:n]) in blocks:
            return ".".join(parts[:n]), ".".join(parts[n:])
    return None, name


def kohya_sgm_key(component: str, name: str, blocks: dict[str, str]) -> str:
    """kohya's module key (`lora_unet_input_blocks_4_1_proj_in`, `lora_te2_text_model_encoder_...`) of the
    module `name` of `component` as diffusers/transformers name it."""
    if component == "unet":
        sgm = sgm_module_name(name, blocks)
        if sgm is None:
            raise ValueError(f"unet module {name} is in no SGM block")
        name = sgm
    elif not name.startswith("text_model."):  # transformers 5 dropped the level from CLIPTextModel
        name = "text_model." + name
    return KOHYA_PREFIXES[component] + name.replace(".", "_")


def kohya_sgm_targets(models: dict[str, torch.nn.Module]) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, module name, module) of every module kohya's SDXL LoRA (with conv_dim) trains, in model order."""
    found = []
    for component, model in models.items():
        if component != "unet":
            found += [(component, n, m) for n, m in target_modules(model, KOHYA_TEXT_TARGETS)]
            continue
        blocks = sgm_block_names(model)
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and sgm_module_name(name, blocks):
                found.append((component, name, module))
    return found


def kohya_sgm_lora_state_dict(models: dict[str, torch.nn.Module], preset: RandomModelPreset,
                              seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An SDXL style LoRA as kohya's sd-scripts writes it: SGM UNet names (attentions with proj_in/proj_out,
    resnets, down/upsamplers), `lora_te1_`/`lora_te2_` text encoders, fp16, with alpha; and kohya metadata.
    `models`: component name -> module, the UNet first."""
    rng = np.random.default_rng([seed, 4])
    rank, alpha = preset.style_rank, preset.style_rank * KOHYA_ALPHA_PER_RANK
    blocks = sgm_block_names(models["unet"])
    tensors = {}
    for component, name, module in kohya_sgm_targets(models):
        down, up = _lora_factors(module, rank, rng)
        key = kohya_sgm_key(component, name, blocks)
        tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
        tensors[f"{key}.lora_up.weight"] = up.astype(np.float16)
        tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)}),
        "ss_base_model_version": preset.arch.kohya_base_model,
        "ss_output_name": "style-lora-kohya-random",
    }
    return tensors, metadata


def peft_to_kohya_sgm(tensors: dict[str, np.ndarray], unet) -> dict[str, np.ndarray]:
    """The same LoRA in kohya's SDXL naming: peft keys (`unet.*`, `text_encoder.text_model.*`, lora_A/lora_B, no
    alpha) renamed to SGM kohya keys, factors unchanged, alpha = rank as peft's default."""
    blocks = sgm_block_names(unet)
    out = {}
    for key, value in tensors.items():
        base, _, part = key.rpartition(".lora_")
        component, _, name = base.partition(".")
        kohya = kohya_sgm_key(component, name, blocks)
        out[f"{kohya}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = value
        if part == "A.weight":
            out[f"{kohya}.alpha"] = np.array(value.shape[0], dtype=value.dtype)
    return out


# ------------------------------------------------------------------------------------------ tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def train_clip_bpe(corpus: str = TOKENIZER_CORPUS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic BPE in CLIP's vocabulary layout: 256 bytes, 256 bytes + `</w>`, merges, then specials.

    Having every byte with and without `</w>` means no input ever maps to the unknown token.
    """
    byte_chars = list(_bytes_to_unicode().values())
    # The corpus is lowercase ASCII words, which the byte-level map leaves unchanged.
    word_counts = Counter(re.findall(r"[a-z]+", corpus.lower()))
    words = {w: (*w[:-1], w[-1] + "</w>") for w in sorted(word_counts)}
    merges = []
    while True:
        pairs = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += word_counts[w]
        if not pairs:
            break
        # Most frequent pair; ties go to the lexicographically smallest, so training is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < BPE_MIN_PAIR_COUNT:
            break
        merges.append(best)
        merged = best[0] + best[1]
        for w, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = tuple(out)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for t in tokens:  # a merge can rebuild a string already in the vocabulary; keep its first id
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_clip_tokenizer(pad_token: str = EOS_TOKEN):
    """transformers' CLIPTokenizer (CLIP's normalizer, pre-tokenizer and post-processor) on our vocabulary.

    `pad_token` is a token of the vocabulary: CLIP's <|endoftext|>, or "!" for SDXL's tokenizer_2."""
    from transformers import CLIPTokenizer

    vocab, merges = train_clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS_TOKEN, bos_token=BOS_TOKEN,
                         eos_token=EOS_TOKEN, pad_token=pad_token, model_max_length=TOKENIZER_MAX_LENGTH)
