"""`lcmrt.Pipeline`: prompt to images from an engine folder, with numpy and a backend only (no torch).

Reads top to bottom like diffusers' StableDiffusionPipeline + LCMScheduler (LCM-LoRA, arXiv 2311.05556):
tokenize and encode the prompt, draw latents, run the LCM sampler loop over the UNet (with classic
classifier-free guidance when guidance_scale > 1), decode with the VAE.
"""
from __future__ import annotations

import secrets
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .adapters import AdapterBank
from .backends import get_backend
from .errors import AdapterError, EngineFolderError, GenerationError, InputError
from .images import to_pil
from .manifest import Manifest, read_manifest
from .sampler import LCMSampler
from .tokenizer import PromptTokenizer

MAX_STEPS = 50  # LCM's original_inference_steps for SD1.5; more steps than that are not an LCM schedule
OUTPUTS = ("pil", "np", "latent")
PROMPT_CACHE_SIZE = 32  # real-time loops repeat a handful of prompts
RUNTIME_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


class Pipeline:
    def __init__(self, folder: Path, manifest: Manifest, sessions: dict, tokenizer: PromptTokenizer, backend_name: str,
                 bank: AdapterBank, active: dict[str, float]):
        self.folder = folder
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.backend = backend_name
        self._bank = bank
        self._active = active  # refittable adapters -> weight (0 = inactive)
        self.shapes = manifest.shapes
        self.scheduler_config = manifest.scheduler_config
        self.last_timings: dict = {}
        self._prompt_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto", adapters: dict[str, float] | None = None,
             **backend_options) -> "Pipeline":
        """Load an engine folder. `adapters` sets the refittable adapters' weights from the start
        (default: the weights they were built with)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if backend == "auto" and any(e.backend == "tensorrt" for e in manifest.engines):
            from .backends.tensorrt import TensorRTBackend

            backend = "tensorrt" if TensorRTBackend.installed() else backend
        engine = get_backend(backend, **backend_options)
        bank = AdapterBank(folder, manifest)
        active = bank.check(bank.defaults() if adapters is None else adapters)
        initial = bank.weights_for({}, active)
        sessions = {}
        for name in RUNTIME_COMPONENTS:
            sessions[name] = engine.load(folder, manifest, name, weights=initial.get(name))
        precision = backend_options.get("precision")
        if precision not in (None, "fp32") and all(s.precision != precision for s in sessions.values()):
            flag = {"fp16": "--fp16", "int8": "--int8"}.get(precision, f"--{precision}")
            raise EngineFolderError(f"{folder} has no {precision} graphs, so precision={precision!r} would run fp32. "
                                    f"Add them with `lcmrt build --engines-only {folder} {flag}`, or load it without "
                                    "precision.")
        tok = manifest.tokenizer
        tokenizer = PromptTokenizer(folder / tok.path, max_length=tok.max_length, pad_token_id=tok.pad_token_id)
        return cls(folder, manifest, sessions, tokenizer, engine.name, bank, active)

    @property
    def adapters(self) -> dict[str, float]:
        """The adapters in effect and their weights: fused ones at their build weight, active refittable ones."""
        active = {name: weight for name, weight in self._active.items() if weight != 0.0}
        return {**self._bank.fused, **active}

    def set_adapters(self, adapters: dict[str, float]) -> None:
        """Switch the refittable adapters to `adapters` ({name: weight}; unlisted ones are switched off).

        Weights are computed from the pristine base, so any sequence of switches ends in the same state as
        switching once. Transactional: every new weight is computed before any is applied, and if applying
        fails, the components already switched are restored and the previous set stays active."""
        new = self._bank.check(adapters)
        updates = self._bank.weights_for(self._active, new)
        applied = []
        try:
            for component, weights in updates.items():
                self.sessions[component].refit(weights)
                applied.append(component)
        except Exception as e:
            restore = self._bank.weights_for(new, self._active)
            try:
                for component in applied:
                    self.sessions[component].refit(restore[component])
            except Exception as restore_error:
                raise AdapterError(
                    f"Switching adapters to {adapters} failed ({e}), and restoring {', '.join(applied)} failed too "
                    f"({restore_error}): the pipeline's weights are inconsistent. Load the folder again.") from e
            raise AdapterError(f"Switching adapters to {adapters} failed, the previous set {self.adapters} is "
                               f"still active: {e}") from e
        self._active = new
        if "text_encoder" in updates:
            self._prompt_cache.clear()

    @property
    def supports_guidance(self) -> bool:
        return 2 * self.shapes.batch in self.shapes.unet_batch_sizes

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """Text embeddings [1, 77, D], cached per prompt (LRU)."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        ids = self.tokenizer(prompt)  # [1, 77] int64
        embeds = self.sessions["text_encoder"].run({"input_ids": ids})["last_hidden_state"]
        self._prompt_cache[prompt] = embeds
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return embeds

    def _check_request(self, prompt, negative_prompt, num_inference_steps, guidance_scale, output, num_images, seed):
        if not isinstance(prompt, str) or not isinstance(negative_prompt, (str, type(None))):
            raise InputError(f"prompt and negative_prompt must be strings, got {type(prompt).__name__} and "
                             f"{type(negative_prompt).__name__}; for several images of one prompt pass num_images.")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise InputError(f"seed={seed!r} must be a non-negative integer, or None for a random seed.")
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= MAX_STEPS:
            raise GenerationError(f"num_inference_steps={num_inference_steps!r} is outside 1..{MAX_STEPS}; "
                                  "LCM needs 2-8 steps for good images (4 is the usual choice).")
        if guidance_scale > 1 and not self.supports_guidance:
            raise GenerationError(
                f"guidance_scale={guidance_scale} needs the unconditional batch, but {self.folder} was built "
                "with --guidance-mode none. Use guidance_scale <= 1, or rebuild with --guidance-mode cfg.")
        if output not in OUTPUTS:
            raise InputError(f"output={output!r} is not one of {', '.join(OUTPUTS)}.")
        if not isinstance(num_images, int) or num_images < 1:
            raise InputError(f"num_images={num_images!r} must be a positive integer.")

    def _latent_shape(self, n: int) -> tuple:
        s = self.shapes
        return (n, s.latent_channels, s.latent_height, s.latent_width)

    def _check_array(self, what: str, array, shape: tuple) -> np.ndarray:
        array = np.asarray(array)
        if array.shape != shape:
            raise GenerationError(f"{what} has shape {list(array.shape)}, but this folder needs {list(shape)} "
                                  f"(num_images, latent channels, height/8, width/8).")
        return array.astype(np.float32, copy=False)

    def __call__(self, prompt: str, negative_prompt: str | None = None, num_inference_steps: int = 4,
                 guidance_scale: float = 1.0, seed: int | None = None, num_images: int = 1,
                 latents: np.ndarray | None = None, step_noise: list | None = None, output: str = "pil"):
        self._check_request(prompt, negative_prompt, num_inference_steps, guidance_scale, output, num_images, seed)
        sampler = LCMSampler.from_config(self.scheduler_config)
        sampler.set_timesteps(num_inference_steps)
        shape = self._latent_shape(num_images)
        self.last_seed = secrets.randbits(32) if seed is None else int(seed)
        rng = np.random.default_rng(self.last_seed)
        latents = (rng.standard_normal(shape, dtype=np.float32) if latents is None
                   else self._check_array("latents", latents, shape))
        if step_noise is None:
            step_noise = [rng.standard_normal(shape, dtype=np.float32) for _ in sampler.timesteps[:-1]]
        elif len(step_noise) != len(sampler.timesteps) - 1:
            raise GenerationError(f"step_noise has {len(step_noise)} arrays; {num_inference_steps} steps need "
                                  f"{num_inference_steps - 1} (one per step but the last).")
        step_noise = [self._check_array(f"step_noise[{i}]", a, shape) for i, a in enumerate(step_noise)]

        timings = {"text_encoder": 0.0, "unet_steps": [], "vae_decode": 0.0}
        start = time.perf_counter()
        embeds = self._text_embeddings(prompt, negative_prompt, guidance_scale > 1)
        timings["text_encoder"] = time.perf_counter() - start
        # the folder's static batch: run num_images in chunks of it (the last chunk padded)
        n = self.shapes.batch
        chunks = [slice(i, i + n) for i in range(0, num_images, n)]
        images = []
        for chunk in chunks:
            x = _pad(latents[chunk], n)
            noise = [_pad(a[chunk], n) for a in step_noise]
            x = self._denoise(sampler, x, noise, embeds, guidance_scale, timings)
            images.append(x if output == "latent" else self._decode(x, timings))
        result = np.concatenate(images)[:num_images]
        timings["total"] = time.perf_counter() - start
        self.last_timings = timings
        return to_pil(result) if output == "pil" else result

    def _text_embeddings(self, prompt, negative_prompt, guided: bool) -> np.ndarray:
        """UNet conditioning for one static batch: [N, 77, D], or [2N, 77, D] as (negative, prompt) halves."""
        n = self.shapes.batch
        cond = np.repeat(self.encode_prompt(prompt), n, axis=0)
        if not guided:
            return cond
        uncond = np.repeat(self.encode_prompt(negative_prompt or ""), n, axis=0)
        return np.concatenate([uncond, cond])

    def _denoise(self, sampler, x, step_noise, embeds, guidance_scale, timings) -> np.ndarray:
        unet = self.sessions["unet"]
        device_loop = unet.denoise_loop(self.shapes.batch)
        if device_loop is not None:  # e.g. TensorRT: the whole step as one CUDA-graph launch
            return device_loop(sampler, x, step_noise, embeds, guidance_scale, timings)
        guided = guidance_scale > 1
        for i, t in enumerate(sampler.timesteps):
            step_start = time.perf_counter()
            sample = np.concatenate([x, x]) if guided else x  # sample: [B, 4, H/8, W/8]
            pred = unet.run({"sample": sample, "timestep": np.array([t], dtype=np.float32),
                             "encoder_hidden_states": embeds})["noise_pred"]
            if guided:
                uncond, cond = np.split(pred, 2)
                pred = uncond + np.float32(guidance_scale) * (cond - uncond)
            noise = step_noise[i] if i < len(step_noise) else None
            x = sampler.step(pred, t, x, noise=noise)
            timings["unet_steps"].append(time.perf_counter() - step_start)
        return x

    def _decode(self, latents, timings) -> np.ndarray:
        start = time.perf_counter()
        vae = self.sessions["vae_decoder"]
        image = vae.run({"latents": latents})["image"]  # [N, 3, H, W] in ~[-1, 1]
        if vae.precision != "fp32" and not np.isfinite(image).all():
            warnings.warn(f"The {vae.precision} VAE decoder overflowed (NaN/inf in the image); decoding again with "
                          "the fp32 VAE decoder on the CPU. Rebuild without --fp16-vae to avoid this.", stacklevel=3)
            image = self._fp32_vae().run({"latents": latents})["image"]
        timings["vae_decode"] += time.perf_counter() - start
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # [N, H, W, 3] in [0, 1]


    def _fp32_vae(self):
        if "vae_decoder_fp32" not in self.sessions:
            self.sessions["vae_decoder_fp32"] = get_backend("onnxruntime-cpu").load(self.folder, self.manifest,
                                                                                   "vae_decoder")
        return self.sessions["vae_decoder_fp32"]


def _pad(batch: np.ndarray, n: int) -> np.ndarray:
    if len(batch) == n:
        return batch
    return np.concatenate([batch, np.zeros((n - len(batch), *batch.shape[1:]), batch.dtype)])
