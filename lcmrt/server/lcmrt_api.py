"""lcmrt's own JSON API: `POST /v1/images` with `Pipeline.__call__`'s parameters and names.

Stricter than the web UI's API: unknown fields are refused, and numbers keep their JSON types (4.0 steps is not 4).
"""
from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from ..pipeline import check_request
from .generation import Generation, adapter_set, render
from .state import ServerState, server_state

router = APIRouter(prefix="/v1", tags=["lcmrt API"])


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # a served folder's name; default: the server's default model
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    seed: int | None = None  # None: a random one, returned
    num_images: int = 1
    height: int | None = None  # default: the folder's first size
    width: int | None = None
    adapters: dict[str, float] | None = None  # refittable adapters -> weight, the others off; None: folder defaults


@router.post("/images")
async def images(request: ImagesRequest, server: ServerState = Depends(server_state)):
    model, pipe = server.model(request.model)
    adapters = adapter_set(model, pipe, request.adapters)
    steps, guidance, seed, count = check_request(request.prompt, request.negative_prompt, request.num_inference_steps,
                                                 request.guidance_scale, request.seed, request.num_images)
    seed = secrets.randbits(32) if seed is None else seed
    shapes = pipe.shapes_at(request.height, request.width)
    generation = Generation(request.prompt, request.negative_prompt, steps, guidance, seed, count, shapes.height,
                            shapes.width)
    submitted = time.monotonic()

    def work(pipe):
        started = time.monotonic()
        rendered = render(pipe, generation)
        return rendered, started - submitted

    rendered, waited = await server.scheduler.run(model, adapters, count, work)
    return {"model": model, "images": rendered.images, "seed": seed, "adapters": rendered.metadata["adapters"],
            # queue_wait: from arrival to the start of generation, an adapter switch included
            "timings": {"queue_wait": waited, **rendered.timings}}
