"""Tiny engine folders for tests: the shapes and LoRA weights the shared fixtures use, and a builder."""


TINY_HEIGHT = TINY_WIDTH = 128
STYLE_WEIGHT = 0.8


def build_tiny_engine(tiny_model, out, guidance_mode="cfg", style_weight=STYLE_WEIGHT, **overrides):
    """Build an engine folder from the tiny model: LCM-LoRA at 1.0 plus the style LoRA."""
    from lcmrt.export.build import BuildRequest, build_engine_folder
    from lcmrt.export.lora import LoraSpec

    loras = [] if style_weight is None else [LoraSpec(tiny_model["style_lora"], weight=style_weight, name="style")]
    request = BuildRequest(model=str(tiny_model["model"]), out=out,
                           lcm_lora=LoraSpec(tiny_model["lcm_lora"], weight=1.0, name="lcm", role="lcm"),
                           loras=loras, height=TINY_HEIGHT, width=TINY_WIDTH, guidance_mode=guidance_mode,
                           **overrides)
    build_engine_folder(request)
    return out
