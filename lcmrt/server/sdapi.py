"""The subset of the AUTOMATIC1111 web UI API (`/sdapi/v1/...`) that clients use, so they work unchanged.

Fields lcmrt has no use for (sampler_name, restore_faces, enable_hr, ...) are accepted and echoed in "parameters";
omitted fields take LCM's defaults (4 steps, CFG scale 1), not the web UI's (20 steps, 7). LoRAs are asked for as
the web UI takes them, `<lora:NAME:WEIGHT>` in the prompt, and map to the model folder's refittable adapters. Image
i of a request has the seed `seed + i`, as in the web UI, so resending `all_seeds[i]` gives that image again.
POST /options sets only sd_model_checkpoint (the model requests use by default); other options are ignored.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import InputError
from ..pipeline import MAX_NUM_IMAGES, check_request
from .generation import Generation, adapter_set, lora_tags, render
from .state import ServerState, server_state

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 web UI API"])
SAMPLER = "LCM"
RANDOM_SEED = -1  # the web UI's "pick one"


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the web UI's many other fields: accepted, echoed, unused

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 4
    cfg_scale: float = 1.0
    seed: int = Field(RANDOM_SEED, ge=RANDOM_SEED)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    width: int | None = None  # default: the model folder's first size
    height: int | None = None
    override_settings: dict[str, Any] | None = None


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None


@router.post("/txt2img")
async def txt2img(request: Txt2ImgRequest, server: ServerState = Depends(server_state)):
    model, pipe = server.model((request.override_settings or {}).get("sd_model_checkpoint"))
    prompt, loras = lora_tags(request.prompt)
    adapters = adapter_set(model, pipe, loras)
    count = request.batch_size * request.n_iter
    if count > MAX_NUM_IMAGES:
        raise InputError(f"batch_size x n_iter = {count} images; a request makes at most {MAX_NUM_IMAGES}. Send "
                         "several requests.")
    first_seed = secrets.randbits(32) if request.seed == RANDOM_SEED else request.seed
    seeds = [first_seed + i for i in range(count)]
    negative = request.negative_prompt or None  # lcmrt's "no negative prompt"
    steps, guidance, _, _ = check_request(prompt, negative, request.steps, request.cfg_scale, seeds[-1])
    shapes = pipe.shapes_at(request.height, request.width)
    infotexts = [_infotext(request.prompt, negative, steps, guidance, seed, shapes.width, shapes.height, model)
                 for seed in seeds]

    def work(pipe):
        images = []
        for seed, infotext in zip(seeds, infotexts):
            generation = Generation(prompt, negative, steps, guidance, seed, 1, shapes.height, shapes.width)
            images += render(pipe, generation, {"parameters": infotext}).images
        return images

    images = await server.scheduler.run(model, adapters, count, work)
    info = {"prompt": request.prompt, "all_prompts": [request.prompt] * count,
            "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
            "seed": first_seed, "all_seeds": seeds, "subseed": first_seed, "all_subseeds": seeds,
            "width": shapes.width, "height": shapes.height, "sampler_name": SAMPLER, "cfg_scale": guidance,
            "steps": steps, "batch_size": request.batch_size, "n_iter": request.n_iter, "sd_model_name": model,
            "sd_model_hash": _source_hash(pipe, 10), "index_of_first_image": 0, "infotexts": infotexts,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": f"lcmrt {__version__}"}
    return {"images": images, "parameters": request.model_dump(), "info": json.dumps(info)}


@router.get("/sd-models")
async def sd_models(server: ServerState = Depends(server_state)):
    return [{"title": name, "model_name": name, "hash": _source_hash(pipe, 10), "sha256": _source_hash(pipe),
             "filename": str(pipe.folder), "config": None} for name, pipe in server.pipelines.items()]


@router.get("/options")
async def get_options(server: ServerState = Depends(server_state)):
    return {"sd_model_checkpoint": server.default_model}


@router.post("/options")
async def set_options(options: OptionsRequest, server: ServerState = Depends(server_state)):
    if options.sd_model_checkpoint is not None:
        server.default_model, _ = server.model(options.sd_model_checkpoint)
    return None


@router.get("/loras")
async def loras(server: ServerState = Depends(server_state)):
    """The refittable adapters of the default model (sd_model_checkpoint), which `<lora:NAME:WEIGHT>` can name."""
    _, pipe = server.model(None)
    return [{"name": a.name, "alias": a.name, "path": str(pipe.folder / a.pack), "metadata": {"weight": a.weight}}
            for a in pipe.manifest.adapters if not a.fused]


@router.get("/progress")
async def progress(server: ServerState = Depends(server_state)):
    """The longest-running job's progress, estimated from the mean run time of recent jobs (the pipeline reports
    no steps yet): 0 while nothing runs or before any job has finished."""
    now = server.scheduler.progress()
    running, mean = now["running"], now["mean_run_s"]
    elapsed = max((seconds for _, seconds in running), default=0.0)
    fraction = min(elapsed / mean, 0.99) if running and mean else 0.0
    return {"progress": fraction, "eta_relative": max(mean - elapsed, 0.0) if running and mean else 0.0,
            "state": {"skipped": False, "interrupted": False, "job": ", ".join(model for model, _ in running),
                      "job_count": len(running) + now["waiting"], "job_timestamp": "0", "job_no": 0,
                      "sampling_step": 0, "sampling_steps": 0},
            "current_image": None, "textinfo": None}


def _infotext(prompt, negative, steps, guidance, seed, width, height, model) -> str:
    """The web UI's "parameters" text, which its clients parse to reuse an image's settings."""
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(f"Steps: {steps}, Sampler: {SAMPLER}, CFG scale: {guidance:g}, Seed: {seed}, Size: {width}x{height}, "
                 f"Model: {model}, Version: lcmrt {__version__}")
    return "\n".join(lines)


def _source_hash(pipe, length: int | None = None) -> str | None:
    """The sha256 of the model the folder was built from, as its manifest records it (None where it does not)."""
    source = pipe.manifest.data.get("source")
    digest = source.get("sha256") if isinstance(source, dict) else None
    return digest[:length] if isinstance(digest, str) else None
