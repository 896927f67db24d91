"""`Pipeline.stream`: real-time img2img over a sequence of frames, the denoising of successive frames staggered
across one UNet batch (StreamDiffusion's "stream batch", arXiv 2312.12491).

An img2img frame at `strength` runs m LCM steps at timesteps T[0] > ... > T[m-1] (`lcmrt.sampler.img2img_start`).
Row j of the stream's UNet batch holds the frame that entered j pushes ago, at T[j]. One UNet call with per-sample
timesteps advances every frame in flight by one step: a pushed frame costs one UNet call of batch m instead of m
calls of batch 1, and leaves the batch m - 1 pushes after it entered. Each row goes through exactly the img2img
arithmetic of its frame (same noise, same sampler scalars, `Pipeline._predict` and `LCMSampler.step`), so frame k's
output is what `pipe(prompt, image=frame_k, strength=..., seed=...)` gives, up to the UNet's float rounding at
another batch size: the stagger changes throughput, not results.

The noise is drawn once from the seed, exactly as one img2img call with that seed draws it, and reused for every
frame (as StreamDiffusion does): a still scene gives a still output instead of flickering noise.
"""
from __future__ import annotations

import time

import numpy as np

from .errors import InputError
from .guidance import TIMESTEP_COND, guidance_embedding
from .image_inputs import load_image
from .images import to_pil
from .noise import FIRST_STEP_NOISE, STREAMS, standard_normal
from .sampler import LCMSampler, img2img_start


class Stream:
    """Frames in, restyled frames out (see the module docstring). Made by `Pipeline.stream`; one thread at a time.

    `push(frame)` returns the output frame that leaves the batch with this push (the frame pushed m - 1 pushes
    earlier), or None while the batch fills; `flush()` returns the frames still in flight; `frames(iterable)`
    yields every output in order. With `skip_threshold`, a frame whose cosine similarity to the last frame that
    ran is at least the threshold runs nothing: `push` returns the last output again (StreamDiffusion's
    similar-image filter, made deterministic). `stats` counts frames in, out and skipped, and UNet calls."""

    def __init__(self, pipe, prompt: str, negative_prompt: str | None = None, num_inference_steps: int = 4,
                 strength: float = 0.5, guidance_scale: float = 1.0, seed: int | None = 0, tiny_vae: bool = False,
                 skip_threshold: float | None = None, height: int | None = None, width: int | None = None,
                 output: str = "pil"):
        from .pipeline import _finite_number, check_request

        steps, guidance_scale, seed, _ = check_request(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                                       seed, 1, output)
        if output == "latent":
            raise InputError("A stream returns frames: output='pil' or 'np'.")
        if seed is None:
            raise InputError("A stream reuses one seed's noise for every frame: pass seed= (an integer).")
        pipe._mode(True, False, 0, tiny_vae)
        if pipe.inpainting_unet:
            raise InputError(f"{pipe.folder} holds an inpainting UNet; streams restyle frames with a regular one.")
        if skip_threshold is not None and not (_finite_number(skip_threshold) is not None and
                                               -1 <= skip_threshold <= 1):
            raise InputError(f"skip_threshold={skip_threshold!r} must be a cosine similarity in [-1, 1] (0.98 skips "
                             "frames that barely changed), or None to run every frame.")
        if guidance_scale > 1 and not pipe.supports_guidance:
            raise InputError(f"guidance_scale={guidance_scale:g} needs the unconditional batch, but {pipe.folder} was "
                             "built with --guidance-mode none. Use guidance_scale <= 1.")
        self.pipe, self.prompt, self.negative_prompt = pipe, prompt, negative_prompt
        self.shapes = pipe.shapes_at(height, width)
        self.guidance_scale, self.tiny_vae, self.output = guidance_scale, bool(tiny_vae), output
        self.skip_threshold = skip_threshold
        self.sampler = LCMSampler.from_config(pipe.scheduler_config)
        self.sampler.set_timesteps(steps)
        self.sampler.begin_at(img2img_start(steps, strength))
        self.timesteps = self.sampler.timesteps  # T[j]: the timestep of row j
        m = len(self.timesteps)
        self._cfg = 1.0 if pipe.guidance_embedded else guidance_scale
        unet_batch = 2 * m if self._cfg > 1 else m
        if unet_batch not in pipe.shapes.unet_batch_sizes or (m > 1 and not pipe.per_sample_timesteps):
            raise InputError(
                f"{steps} steps at strength {strength:g} stagger {m} frames in one UNet batch of {unet_batch}, but "
                f"{pipe.folder}'s UNet runs batches of {list(pipe.shapes.unet_batch_sizes)}"
                + ("" if pipe.per_sample_timesteps else " with one timestep per batch (an older folder)")
                + f". Rebuild it with `lcmrt build ... --stream-batch {m}`, or pick steps and strength with "
                f"int(steps * strength) = {pipe.shapes.stream_batch or 1}.")
        # the noise of one img2img call with this seed, reused for every frame
        shape = (1, self.shapes.latent_channels, self.shapes.latent_height, self.shapes.latent_width)
        self.noise = {name: standard_normal(seed, STREAMS[name], shape)
                      for name in pipe._draws("img2img", strength, self.tiny_vae)}
        self.step_noise = [standard_normal(seed, FIRST_STEP_NOISE + i, shape) for i in range(len(self.timesteps) - 1)]
        self.seed = seed
        self._time_ids = pipe._time_ids(None, (0, 0), None, (self.shapes.height, self.shapes.width))
        self._x = np.zeros((m, *shape[1:]), dtype=np.float32)  # row j: the latents at T[j]
        self._in_flight = [False] * m
        self._last_input = self._last_output = None
        self.stats = {"frames_in": 0, "frames_out": 0, "skipped": 0, "unet_calls": 0, "seconds": 0.0}

    @property
    def batch(self) -> int:
        """Frames in flight at once: the stream batch m."""
        return len(self.timesteps)

    def push(self, frame):
        """Feed one frame (a PIL image, a path or an [H, W, 3] array, as `image=` of an img2img call)."""
        start = time.perf_counter()
        pixels = load_image(frame, self.shapes.height, self.shapes.width)
        self.stats["frames_in"] += 1
        if self.skip_threshold is not None and self._last_input is not None \
                and _cosine_similarity(pixels, self._last_input) >= self.skip_threshold:
            self.stats["skipped"] += 1
            return self._last_output
        self._last_input = pixels
        out = self._advance(pixels)
        self.stats["seconds"] += time.perf_counter() - start
        return out

    def flush(self) -> list:
        """Run the frames still in flight out of the batch; their outputs, in order."""
        outputs = []
        while any(self._in_flight[1:]):
            out = self._advance(None)
            if out is not None:
                outputs.append(out)
        return outputs

    def frames(self, frames):
        """Every output frame of `frames` (an iterable), in order, flushing at the end."""
        for frame in frames:
            out = self.push(frame)
            if out is not None:
                yield out
        yield from self.flush()

    def _advance(self, pixels):
        """One UNet call: row 0 takes the new frame (if any), every row steps, the last row leaves."""
        pipe, sampler, m = self.pipe, self.sampler, self.batch
        ran = {}
        with pipe._lock.shared():  # one adapter set for the call
            if pixels is not None:
                latents = pipe._encode_image(pixels, self.noise.get("image_noise"), 1, self.tiny_vae, ran)
                self._x[0] = sampler.add_noise(latents, self.noise["latents"], int(self.timesteps[0]))[0]
            self._in_flight[0] = pixels is not None
            conditioning = pipe._conditioning(self.prompt, self.negative_prompt, self._cfg > 1, self._time_ids, m)
            if pipe.guidance_embedded:
                conditioning[TIMESTEP_COND] = guidance_embedding(self.guidance_scale, pipe._guidance_dim, m)
            pred = pipe._predict(self._x, self.timesteps, conditioning, self._cfg, "in a stream step")
            self.stats["unet_calls"] += 1
            stepped = np.empty_like(self._x)
            for j, t in enumerate(self.timesteps):  # each row with its own step's scalars and noise
                noise = self.step_noise[j] if j < m - 1 else None
                stepped[j] = sampler.step(pred[j:j + 1], t, self._x[j:j + 1], noise=noise)[0]
            leaving = self._in_flight[-1]
            image = None
            if leaving:
                n = pipe.shapes.batch
                latents = np.concatenate([stepped[-1:], np.zeros((n - 1, *stepped.shape[1:]), np.float32)])
                image = pipe._decode(latents, {"vae_decode": 0.0}, ran,
                                     "tiny_vae_decoder" if self.tiny_vae else "vae_decoder")[:1]
        self._x[1:] = stepped[:-1]
        self._in_flight = [False, *self._in_flight[:-1]]
        if image is None:
            return None
        self.stats["frames_out"] += 1
        self._last_output = to_pil(image)[0] if self.output == "pil" else image[0]
        return self._last_output


def _cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else float(np.array_equal(a, b))
