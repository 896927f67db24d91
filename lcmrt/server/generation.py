"""What both APIs share: the adapter set of a request, the generation a worker runs, and its PNGs.

A request's adapters name refittable adapters of its model's folder; the others are switched off for it, as with
`lcmrt generate --adapter`. A request that names none runs with the folder's default weights (those it was built
with). PNGs carry the settings `lcmrt generate` writes (`lcmrt.images`: key "lcmrt" holds them as JSON, and each
also has a key of its own).
"""
from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import AdapterError
from ..images import png_bytes
from ..pipeline import Pipeline

# AUTOMATIC1111's extra-network syntax for LoRAs: <lora:NAME> or <lora:NAME:WEIGHT>
LORA_TAG = re.compile(r"<lora:([^>]*)>")


def lora_tags(prompt: str) -> tuple[str, dict[str, float] | None]:
    """The prompt without its `<lora:NAME:WEIGHT>` tags (WEIGHT defaults to 1), and the weights they ask for (None
    where the prompt has no tag: the folder's defaults apply)."""
    weights = {}
    for tag in LORA_TAG.finditer(prompt):
        name, _, weight = tag.group(1).partition(":")
        name = name.strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = None
        if not name or value is None or not math.isfinite(value):
            raise AdapterError(f"{tag.group(0)} in the prompt: expected <lora:NAME:WEIGHT> with a finite number as "
                               "WEIGHT, e.g. <lora:papercut:0.8>.")
        if name in weights:
            raise AdapterError(f"The prompt asks for LoRA {name!r} twice; give each <lora:...> once.")
        weights[name] = value
    if not weights:
        return prompt, None
    # what is left around a removed tag is spaces; the tokenizer would drop them too
    return " ".join(LORA_TAG.sub(" ", prompt).split()), weights


def adapter_set(model: str, pipe: Pipeline, requested: dict[str, float] | None) -> dict[str, float]:
    """Every refittable adapter of `pipe` with the weight a request runs it at: `requested` ones at theirs, the
    others off (weight 0); with `requested` None, the folder's default weights."""
    refittable = {a.name: a.weight for a in pipe.manifest.adapters if not a.fused}
    if requested is None:
        return refittable
    for name, weight in requested.items():
        if name not in refittable:
            fused = {a.name for a in pipe.manifest.adapters if a.fused}
            why = (f"is fused into model {model!r} (always on)" if name in fused else
                   f"is not an adapter of model {model!r}")
            raise AdapterError(f"LoRA {name!r} {why}; its refittable adapters: {', '.join(refittable) or 'none'}. "
                               f"Add one with `lcmrt adapter add {pipe.folder} FILE --name {name}` and restart "
                               "the server.")
        if not math.isfinite(weight):
            raise AdapterError(f"LoRA {name!r} has weight {weight!r}; weights must be finite numbers.")
    return {name: float(requested.get(name, 0.0)) for name in refittable}


@dataclass(frozen=True)
class Generation:
    """One call of the pipeline: `num_images` images of `seed` (image k of a seed is the same whatever num_images)."""
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    num_images: int
    height: int | None
    width: int | None


class Rendered(NamedTuple):
    images: list[str]  # base64 PNGs
    metadata: dict  # what the PNGs carry
    timings: dict  # Pipeline.last_timings


def render(pipe: Pipeline, generation: Generation, extra_metadata: dict | None = None) -> Rendered:
    """Run `generation` (in a worker thread): its images as base64 PNGs with `metadata` (plus `extra_metadata`)."""
    g = generation
    images = pipe(g.prompt, negative_prompt=g.negative_prompt, num_inference_steps=g.steps, guidance_scale=g.guidance,
                  seed=g.seed, num_images=g.num_images, height=g.height, width=g.width)
    metadata = {**pipe.png_metadata(g.prompt, g.negative_prompt, g.steps, g.guidance), **(extra_metadata or {})}
    return Rendered([base64.b64encode(png_bytes(image, metadata)).decode("ascii") for image in images], metadata,
                    pipe.last_timings)
