"""`lcmrt.Pipeline`: prompt to images from an engine folder, with numpy and a backend only (no torch).

Reads top to bottom like diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for the SDXL
families) + LCMScheduler (LCM-LoRA, arXiv 2311.05556): tokenize and encode the prompt, draw latents, run the
LCM sampler loop over the UNet (with classic classifier-free guidance when guidance_scale > 1), decode with
the VAE. What differs between families is how the prompt conditions the UNet (`lcmrt.families`).

With an `image` it is diffusers' img2img pipeline (StableDiffusionImg2ImgPipeline, the SDXL one): the image
is encoded, noised to the first timestep `strength` keeps, and denoised from there. With a `mask_image` too
it is the inpaint pipeline: a regular UNet's known region is re-noised to each next timestep and blended back
after every step; an inpainting UNet (9 input channels) takes the mask and the masked image's latents as
inputs instead.
"""
from __future__ import annotations

import math
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .adapters import AdapterBank
from .backends import get_backend
from .backends.chosen import folder_backend
from .errors import AdapterError, EngineFolderError, GenerationError, InputError
from .families import TEXT_EMBEDS, TIME_IDS
from .guidance import TIMESTEP_COND, guidance_embedding
from .image_inputs import image_size, load_image, load_mask, mask_to_latent_size, masked_image
from .images import to_pil
from .manifest import REBUILD, Manifest, read_manifest
from .noise import FIRST_STEP_NOISE, MAX_SEED, STREAMS, standard_normal
from .sampler import LCMSampler, img2img_start
from .tokenizer import PromptTokenizer

MAX_STEPS = 50  # LCM's original_inference_steps for SD1.5; more steps than that are not an LCM schedule
# One call holds all its images in memory until the last is decoded (float32 [N, H, W, 3] plus the PIL copies:
# ~16 MB per 1024x1024 image) and a typo like 10000 would run for hours first; more images take a loop of calls.
MAX_NUM_IMAGES = 64
OUTPUTS = ("pil", "np", "latent")
PROMPT_CACHE_SIZE = 32  # real-time loops repeat a handful of prompts
_FP32_VAE = "vae_decoder_fp32"  # the session an overflowing fp16 VAE decoder falls back to, loaded on demand
# diffusers' default strengths: img2img 0.8 (StableDiffusionImg2ImgPipeline), inpainting 1.0
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


class _SharedLock:
    """Readers-writer lock: generations hold it shared (they run concurrently), `set_adapters` alone. A waiting
    swap blocks new generations, so a stream of them cannot starve it. Not re-entrant: code that holds it
    calls the unlocked internals (`_encode`), never the public methods."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Pipeline:
    """Prompt to images with one engine folder. Safe to share between threads: concurrent calls run in
    parallel; `set_adapters` waits for the calls running and applies to the calls that start after it;
    `last_seed`, `last_timings` and `last_precisions` are those of the calling thread's last call."""

    def __init__(self, folder: Path, manifest: Manifest, sessions: dict, tokenizers: dict[str, PromptTokenizer],
                 engine, bank: AdapterBank, active: dict[str, float]):
        self.folder = folder
        self.manifest = manifest
        self.family = manifest.family_info
        self.sessions = sessions
        self.tokenizers = tokenizers  # text encoder component -> its tokenizer
        self.tokenizer = tokenizers["text_encoder"]
        self.backend = engine.name
        self._engine = engine  # loads the components a call needs on first use (`_component`)
        self._load_lock = threading.Lock()
        self._component_names = set(manifest.components)
        self._bank = bank
        self._active = active  # refittable adapters -> weight (0 = inactive)
        self.shapes = manifest.shapes
        self.scheduler_config = manifest.scheduler_config
        self._lock = _SharedLock()  # generations share it, set_adapters holds it alone
        self._thread = threading.local()  # last_seed, last_timings, last_precisions
        # prompt -> (adapter set of the text encoders' weights, its conditioning); LRU under _cache_lock
        self._prompt_cache: OrderedDict[str, tuple[tuple, dict]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._text_encoder_set = _set_key(active)  # the set in effect when the text encoders' weights last changed
        self._zeros_for_empty_negative = manifest.force_zeros_for_empty_prompt
        unet_inputs = {t.name: t for t in manifest.component("unet").inputs}
        # 9 for an inpainting UNet: latents, mask, masked-image latents
        self.unet_in_channels = unet_inputs["sample"].shape[1]
        # [unet_batch] since format 2, so one call can run samples at different timesteps (streams); [1] before
        self.per_sample_timesteps = tuple(unet_inputs["timestep"].shape) != (1,)
        self._guidance_dim = unet_inputs[TIMESTEP_COND].shape[-1] if TIMESTEP_COND in unet_inputs else None
        if self._guidance_dim is not None and not (isinstance(self._guidance_dim, int) and 2 <= self._guidance_dim <= 4096):
            raise EngineFolderError(f"manifest.json: the UNet's {TIMESTEP_COND} input has the width "
                                    f"{self._guidance_dim!r}; expected 2..4096. Rebuild the folder with `lcmrt build`.")

    @property
    def last_seed(self) -> int | None:
        """The seed of this thread's last call (None before it made one): per thread, like last_timings."""
        return getattr(self._thread, "seed", None)

    @property
    def last_strength(self) -> float | None:
        """The strength of this thread's last call, its default filled in (None for text-to-image)."""
        return getattr(self._thread, "strength", None)

    @property
    def last_timings(self) -> dict:
        """Seconds per stage of this thread's last call: text_encoder, vae_encode (edits), unet_steps (a list),
        vae_decode, total."""
        return getattr(self._thread, "timings", {})

    @property
    def last_precisions(self) -> dict[str, str]:
        """The precision each component ran at in this thread's last call (the VAE decoder's is "fp32" where its
        fp16 graph overflowed and the fp32 one decoded instead)."""
        return dict(getattr(self._thread, "precisions", {}))

    def png_metadata(self, prompt: str, negative_prompt: str | None, steps: int, guidance: float) -> dict:
        """The settings `lcmrt generate` writes into its PNGs, for this thread's last call with these arguments."""
        from . import __version__

        return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": self.last_seed, "steps": steps,
                "guidance": guidance, "adapters": self.adapters, "engine_folder": str(self.folder),
                "backend": self.backend, "lcmrt_version": __version__, "precision": self.last_precisions}

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto", adapters: dict[str, float] | None = None,
             **backend_options) -> "Pipeline":
        """Load an engine folder. `adapters` sets the refittable adapters' weights from the start
        (default: the weights they were built with). `backend` "auto": TensorRT where the folder has engines
        for this machine, ONNX Runtime's CUDA provider where installed, else on the CPU the backend per
        component that the build measured fastest (`lcmrt.backends.chosen`)."""
        if adapters is not None:
            _check_adapter_types(adapters)
        folder = Path(folder)
        manifest = read_manifest(folder)
        engine = folder_backend(folder, manifest, backend, backend_options)
        bank = AdapterBank(folder, manifest)
        active = bank.check(bank.defaults() if adapters is None else adapters)
        # components that take low-rank factors get them after loading; the others their merged weights at once
        by_factors = {name for name in manifest.family_info.components if engine.factor_inputs(manifest, name)}
        initial = bank.weights_for({}, active, set(manifest.family_info.components) - by_factors)
        sessions = {}
        for name in manifest.family_info.components:
            sessions[name] = engine.load(folder, manifest, name, weights=initial.get(name))
            if name in by_factors and name in bank.changed({}, active):
                _switch(sessions[name], bank, name, active, initial)()
        precision = backend_options.get("precision")
        if precision not in (None, "fp32") and all(s.precision != precision for s in sessions.values()):
            flag = {"fp16": "--fp16", "int8": "--int8"}.get(precision, f"--{precision}")
            raise EngineFolderError(f"{folder} has no {precision} graphs for backend {engine.name}, so "
                                    f"precision={precision!r} would run fp32. "
                                    f"Add them with `lcmrt build --engines-only {folder} {flag}`, or load it without "
                                    "precision.")
        tokenizers = {encoder: PromptTokenizer.from_folder(folder, info) for encoder, info in manifest.tokenizers.items()}
        return cls(folder, manifest, sessions, tokenizers, engine, bank, active)

    @property
    def adapters(self) -> dict[str, float]:
        """The adapters in effect and their weights: fused ones at their build weight, active refittable ones."""
        active = {name: weight for name, weight in self._active.items() if weight != 0.0}
        return {**self._bank.fused, **active}

    def set_adapters(self, adapters: dict[str, float]) -> None:
        """Switch the refittable adapters to `adapters` ({name: weight}; unlisted ones are switched off).

        Weights are computed from the pristine base, so any sequence of switches ends in the same state as
        switching once. Transactional: every new weight (or, with refit="factors", every low-rank factor) is
        computed before any is applied, and if applying fails, the components already switched are restored and
        the previous set stays active."""
        _check_adapter_types(adapters)
        with self._lock.exclusive():  # no generation runs with half the components switched
            new = self._bank.check(adapters)
            changed = self._bank.changed(self._active, new)
            by_weights = {c for c in changed if not self.sessions[c].factor_inputs}  # the others bind factors
            updates = self._bank.weights_for(self._active, new, by_weights)
            switches = {c: _switch(self.sessions[c], self._bank, c, new, updates) for c in changed}
            applied = []
            try:
                for component, switch in switches.items():
                    switch()
                    applied.append(component)
            except Exception as e:
                restore = self._bank.weights_for(new, self._active, by_weights)
                try:
                    for component in applied:
                        _switch(self.sessions[component], self._bank, component, self._active, restore)()
                except Exception as restore_error:
                    raise AdapterError(
                        f"Switching adapters to {adapters} failed ({e}), and restoring {', '.join(applied)} failed "
                        f"too ({restore_error}): the pipeline's weights are inconsistent. Load the folder again.") from e
                raise AdapterError(f"Switching adapters to {adapters} failed, the previous set {self.adapters} is "
                                   f"still active: {e}") from e
            self._active = new
            if set(changed) & set(self.family.text_encoders):
                self._text_encoder_set = _set_key(new)
                with self._cache_lock:
                    self._prompt_cache.clear()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every component runs at its full speed after a load or `set_adapters` (refit="background" and
        "factors" build sessions with the adapter weights baked in); False if `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return all(session.settle(None if deadline is None else max(0.0, deadline - time.monotonic()))
                   for session in list(self.sessions.values()))

    @property
    def supports_guidance(self) -> bool:
        """guidance_scale > 1 works: by classifier-free guidance, or as the input of a distilled LCM UNet."""
        return 2 * self.shapes.batch in self.shapes.unet_batch_sizes or self.guidance_embedded

    @property
    def guidance_embedded(self) -> bool:
        """The UNet is a distilled LCM model's: guidance_scale is its input (`lcmrt.guidance`), no second batch."""
        return self._guidance_dim is not None

    @property
    def inpainting_unet(self) -> bool:
        """The UNet takes a mask and the masked image's latents beside the latents (9 input channels)."""
        return self.unet_in_channels != self.shapes.latent_channels

    def encode_prompt(self, prompt: str) -> dict[str, np.ndarray]:
        """The prompt's UNet conditioning with the adapters in effect, cached per prompt and adapter set (LRU):
        {"encoder_hidden_states": [1, 77, D]}, and for the SDXL families also {"text_embeds": [1, P]} (the
        second text encoder's pooled projection). Read-only: the arrays are the cache's."""
        _check_text("prompt", prompt)
        with self._lock.shared():
            return self._encode(prompt)

    def _encode(self, prompt: str) -> dict[str, np.ndarray]:
        """encode_prompt for callers that hold self._lock (shared), so the text encoders' weights stay put."""
        # tagged with the adapter set too: an embedding of other text-encoder weights is never served
        adapters = self._text_encoder_set
        with self._cache_lock:
            cached = self._prompt_cache.get(prompt)
            if cached is not None and cached[0] == adapters:
                self._prompt_cache.move_to_end(prompt)
                return cached[1]
        hidden, conditioning = [], {}
        for name in self.family.text_encoders:
            session = self.sessions[name]
            out = session.run({"input_ids": self.tokenizers[name](prompt)})  # input_ids: [1, 77] int64
            if not all(np.isfinite(a).all() for a in out.values()):
                raise _non_finite(name.replace("_", " "), session, f"for the prompt {prompt[:40]!r}")
            hidden.append(out[self.family.hidden_state])
            if name == self.family.pooled_text_encoder:
                conditioning[TEXT_EMBEDS] = out[TEXT_EMBEDS]  # [1, P]
        # SDXL: both encoders' hidden states side by side, [1, 77, 768 + 1280]
        conditioning["encoder_hidden_states"] = hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1)
        for array in conditioning.values():
            array.flags.writeable = False  # shared by every call that hits the cache
        with self._cache_lock:
            self._prompt_cache[prompt] = (adapters, conditioning)
            self._prompt_cache.move_to_end(prompt)
            while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        return conditioning

    def shapes_at(self, height: int | None = None, width: int | None = None):
        """The folder's shape profile at `height` x `width`, one of its sizes (either left out: the default
        size's); any other size is an InputError listing the sizes."""
        size = (self.shapes.height if height is None else height, self.shapes.width if width is None else width)
        if not all(_is_int(v) for v in size) or tuple(size) not in self.shapes.sizes:
            raise InputError(f"{self.folder} serves {self.shapes.size_names} (width x height), not "
                             f"{size[1]!r}x{size[0]!r}. Pick one of those, or rebuild the folder with this size "
                             "(`lcmrt build ... --size WIDTHxHEIGHT`, repeatable).")
        return self.shapes.at(int(size[0]), int(size[1]))

    def __call__(self, prompt: str, negative_prompt: str | None = None, num_inference_steps: int = 4,
                 guidance_scale: float = 1.0, seed: int | None = None, num_images: int = 1,
                 latents: np.ndarray | None = None, step_noise: list | None = None, output: str = "pil",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, height: int | None = None, width: int | None = None,
                 image=None, strength: float | None = None, mask_image=None, mask_blur: float = 0.0,
                 image_noise: np.ndarray | None = None, masked_image_noise: np.ndarray | None = None,
                 tiny_vae: bool = False):
        """Images for `prompt`, `height` x `width` pixels: one of the folder's sizes (default: the input image's
        size where the folder serves it, else the folder's first size). The SDXL families also take diffusers'
        size conditioning: `original_size` and `target_size` ((height, width), default the image's size) and
        `crops_coords_top_left` ((top, left)).

        Editing, as diffusers' img2img and inpaint pipelines do it with LCMScheduler:
        - img2img: `image` (a PIL image, a path, or an [H, W, 3] array of uint8 or floats in [0, 1]) and
          `strength` in (0, 1] (default 0.8): the last int(num_inference_steps * strength) steps run, starting
          from the encoded image noised to the first of them. A PIL or file image of another size is resized to
          the output size with Lanczos (diffusers' VaeImageProcessor), never cropped.
        - inpainting: `mask_image` too (white = repaint, black = keep; binarized at 0.5 after `mask_blur`, which
          is diffusers' `mask_processor.blur`); default strength 1.0, which starts from pure noise.
        - `tiny_vae=True` encodes and decodes with the folder's tiny VAE (`lcmrt build --tiny-vae`).

        Randomness: `seed` (an integer in [0, 2^64)) names, through lcmrt's noise generator (`lcmrt.noise`, which
        the C++ runtime implements bit for bit), `image_noise` (the VAE encoder's `latent_dist.sample`),
        `latents` (the start noise; for an edit, the noise added to the image latents), `masked_image_noise`
        (an inpainting UNet's masked-image encoding) and `step_noise` (one per step but the last); image k of a
        seed is the same whatever num_images is. Pass any of them, [num_images, 4, H/8, W/8] float32, to
        reproduce another implementation's draws (diffusers' torch generator, say) exactly."""
        # every argument is checked before any component runs
        steps, guidance_scale, seed, num_images = check_request(prompt, negative_prompt, num_inference_steps,
                                                                guidance_scale, seed, num_images, output)
        mode = self._mode(image is not None, mask_image is not None, mask_blur, tiny_vae)
        shapes = self.shapes_at(*self._output_size(image, height, width))
        time_ids = self._time_ids(original_size, crops_coords_top_left, target_size, (shapes.height, shapes.width))
        if guidance_scale > 1 and not self.supports_guidance:
            raise GenerationError(
                f"guidance_scale={guidance_scale:g} needs the unconditional batch, but {self.folder} was built "
                "with --guidance-mode none. Use guidance_scale <= 1, or rebuild with --guidance-mode cfg.")
        if self.guidance_embedded and negative_prompt is not None:
            raise InputError(f"{self.folder} holds a distilled LCM UNet: guidance_scale is its input and no "
                             "unconditional batch runs, so a negative prompt would have no effect. Leave it out.")
        cfg_scale = 1.0 if self.guidance_embedded else guidance_scale  # > 1: classifier-free guidance
        sampler = LCMSampler.from_config(self.scheduler_config)
        sampler.set_timesteps(steps)
        if mode == "txt2img" and strength is not None:
            raise InputError(f"strength={strength!r} sets how much of an input image an edit keeps: pass image= "
                             "(and mask_image= to inpaint), or leave strength out.")
        if mode != "txt2img":
            strength = DEFAULT_STRENGTH[mode] if strength is None else strength
            sampler.begin_at(img2img_start(steps, strength))
            pixels = load_image(image, shapes.height, shapes.width)  # [1, 3, H, W] in [-1, 1]
            mask = load_mask(mask_image, shapes.height, shapes.width, mask_blur) if mode == "inpaint" else None
        shape = (num_images, shapes.latent_channels, shapes.latent_height, shapes.latent_width)
        given = {"image_noise": image_noise, "latents": latents, "masked_image_noise": masked_image_noise}
        drawn = self._draws(mode, strength, tiny_vae)
        for name, value in given.items():
            if value is not None and name not in drawn:
                raise InputError(f"{name} is not used by this call ({mode}"
                                 + (", tiny VAE" if tiny_vae else "") + f"); it uses {', '.join(drawn)}. Leave it out.")
        given = {name: _checked_array(name, value, shape) for name, value in given.items() if value is not None}
        if step_noise is not None:
            if not isinstance(step_noise, (list, tuple)):
                raise InputError(f"step_noise must be a list of arrays (one per step but the last), got "
                                 f"{type(step_noise).__name__}.")
            runs = len(sampler.timesteps)
            if len(step_noise) != runs - 1:
                raise GenerationError(f"step_noise has {len(step_noise)} arrays; {runs} steps need {runs - 1} "
                                      "(one per step but the last)" + (f": {steps} steps at strength {strength:g} run "
                                                                       f"{runs}." if mode != "txt2img" else "."))
            step_noise = [_checked_array(f"step_noise[{i}]", a, shape) for i, a in enumerate(step_noise)]
        seed = secrets.randbits(32) if seed is None else seed
        self._thread.seed, self._thread.strength = seed, strength
        noise = {name: given[name] if name in given else standard_normal(seed, STREAMS[name], shape) for name in drawn}
        if step_noise is None:
            step_noise = [standard_normal(seed, FIRST_STEP_NOISE + i, shape) for i in range(len(sampler.timesteps) - 1)]

        timings = {"text_encoder": 0.0, "unet_steps": [], "vae_decode": 0.0}
        decoder = "tiny_vae_decoder" if tiny_vae else "vae_decoder"
        ran = {name: self.sessions[name].precision for name in (*self.family.text_encoders, "unet")}
        start = time.perf_counter()
        with self._lock.shared():  # one adapter set for the whole generation
            conditioning = self._conditioning(prompt, negative_prompt, cfg_scale > 1, time_ids, self.shapes.batch)
            if self.guidance_embedded:
                conditioning[TIMESTEP_COND] = guidance_embedding(guidance_scale, self._guidance_dim, self.shapes.batch)
            timings["text_encoder"] = time.perf_counter() - start
            x, inpaint = noise["latents"], None
            if mode != "txt2img":
                x, inpaint = self._edit_latents(mode, strength, sampler, pixels, mask, noise, tiny_vae, timings, ran)
            # the folder's static batch: run num_images in chunks of it (the last chunk padded)
            n = self.shapes.batch
            images = []
            for chunk in (slice(i, i + n) for i in range(0, num_images, n)):
                chunk_noise = [_pad(a[chunk], n) for a in step_noise]
                chunk_inpaint = None if inpaint is None else inpaint.rows(chunk, n)
                latent = self._denoise(sampler, _pad(x[chunk], n), chunk_noise, conditioning, cfg_scale, timings,
                                       chunk_inpaint)
                images.append(latent if output == "latent" else self._decode(latent, timings, ran, decoder))
        result = np.concatenate(images)[:num_images]
        timings["total"] = time.perf_counter() - start
        self._thread.timings = timings
        self._thread.precisions = ran
        return to_pil(result) if output == "pil" else result

    def stream(self, prompt: str, negative_prompt: str | None = None, num_inference_steps: int = 4,
               strength: float = 0.5, guidance_scale: float = 1.0, seed: int = 0, tiny_vae: bool = False,
               skip_threshold: float | None = None, height: int | None = None, width: int | None = None,
               output: str = "pil"):
        """A real-time img2img stream of frames (`lcmrt.stream.Stream`): each output frame is this call's
        img2img image of its input frame with the same arguments, while one UNet call per frame advances every
        frame in flight. Needs a folder built with `--stream-batch int(num_inference_steps * strength)`."""
        from .stream import Stream

        return Stream(self, prompt, negative_prompt, num_inference_steps, strength, guidance_scale, seed, tiny_vae,
                      skip_threshold, height, width, output)

    def _mode(self, has_image: bool, has_mask: bool, mask_blur, tiny_vae) -> str:
        """"txt2img", "img2img" or "inpaint", after checking that the image arguments fit together and the folder."""
        if not isinstance(tiny_vae, (bool, np.bool_)):
            raise InputError(f"tiny_vae must be True or False, got {tiny_vae!r}.")
        if tiny_vae and "tiny_vae_decoder" not in self._component_names:
            raise InputError(f"{self.folder} has no tiny VAE. Rebuild it with `lcmrt build ... --tiny-vae TAESD_FOLDER` "
                             "(an AutoencoderTiny, e.g. madebyollin/taesd), or leave tiny_vae out.")
        if has_mask and not has_image:
            raise InputError("mask_image marks what to repaint in an image: pass image= as well.")
        if not has_mask and _finite_number(mask_blur) != 0:
            raise InputError(f"mask_blur={mask_blur!r} blurs the mask of an inpainting call: pass mask_image=, or "
                             "leave mask_blur out.")
        if self.inpainting_unet and not has_mask:
            raise InputError(f"{self.folder} holds an inpainting UNet ({self.unet_in_channels} input channels: latents, "
                             "mask, masked-image latents): pass image= and mask_image=.")
        if has_image and "vae_encoder" not in self._component_names and not tiny_vae:
            raise EngineFolderError(f"{self.folder} has no VAE encoder graph for image input. {REBUILD}")
        return "txt2img" if not has_image else "img2img" if not has_mask else "inpaint"

    def _output_size(self, image, height, width) -> tuple[int | None, int | None]:
        """The size asked for; with neither given, an input image's size where the folder serves it."""
        if image is not None and height is None and width is None:
            size = image_size(image)
            if size in self.shapes.sizes:
                return size
        return height, width

    def _draws(self, mode: str, strength: float | None, tiny_vae: bool) -> tuple[str, ...]:
        """The standard-normal arrays a call draws before its step noise, in diffusers' order: the VAE encoder's
        sample of the image (where its latents are used), the start noise, the masked image's (inpainting UNet)."""
        if mode == "txt2img":
            return ("latents",)
        sampled = ("image_noise",) if self._encodes_image(mode, strength) and not tiny_vae else ()
        masked = ("masked_image_noise",) if mode == "inpaint" and self.inpainting_unet and not tiny_vae else ()
        return (*sampled, "latents", *masked)

    def _encodes_image(self, mode: str, strength: float) -> bool:
        """Does an edit use the image's latents? img2img starts from them and a regular UNet inpaints by blending
        them back; an inpainting UNet at strength 1 starts from pure noise and sees only the masked image."""
        return mode == "img2img" or not self.inpainting_unet or strength < 1

    def _edit_latents(self, mode, strength, sampler, pixels, mask, noise, tiny_vae, timings, ran):
        """The start latents of an edit, and for inpainting what each step needs (`_Inpaint`)."""
        start = time.perf_counter()
        count = len(noise["latents"])
        image_latents = None
        if self._encodes_image(mode, strength):
            image_latents = self._encode_image(pixels, noise.get("image_noise"), count, tiny_vae, ran)
        # diffusers' inpaint pipelines start from pure noise at strength 1, img2img always from the image
        if mode == "inpaint" and strength == 1.0:
            x = noise["latents"]
        else:
            x = sampler.add_noise(image_latents, noise["latents"], int(sampler.timesteps[0]))
        inpaint = None
        if mode == "inpaint":
            latent_mask = mask_to_latent_size(mask, *x.shape[2:])  # [1, 1, H/8, W/8]
            if not self.inpainting_unet:
                inpaint = _Inpaint(mask=latent_mask, image_latents=image_latents, noise=noise["latents"])
            else:
                masked = self._encode_image(masked_image(pixels, mask), noise.get("masked_image_noise"), count,
                                            tiny_vae, ran)
                channels = np.concatenate([np.repeat(latent_mask, count, axis=0), masked], axis=1)
                inpaint = _Inpaint(unet_channels=channels)
        timings["vae_encode"] = time.perf_counter() - start
        return x, inpaint

    def _encode_image(self, pixels, sample_noise, count: int, tiny_vae: bool, ran) -> np.ndarray:
        """`count` rows of scaled latents of `pixels` ([1, 3, H, W]): diffusers' `retrieve_latents(vae.encode(
        image), generator) * scaling_factor`, i.e. (mean + std * sample_noise) * scaling_factor for the VAE, or
        the tiny VAE encoder's (deterministic) latents."""
        name = "tiny_vae_encoder" if tiny_vae else "vae_encoder"
        session = self._component(name)
        out = session.run({"image": np.repeat(pixels, self.shapes.batch, axis=0)})
        ran[name] = session.precision
        if not all(np.isfinite(a).all() for a in out.values()):
            raise _non_finite(name.replace("_", " ").replace("vae", "VAE"), session, "for the input image")
        if tiny_vae:
            return np.repeat(out["latents"][:1], count, axis=0)
        mean, std = out["latent_mean"][:1], out["latent_std"][:1]
        return (mean + std * sample_noise) * np.float32(self.manifest.vae_scaling_factor)

    def _component(self, name: str):
        """The session of `name`, loaded on first use: the VAE encoder and the tiny VAE."""
        session = self.sessions.get(name)
        if session is None:
            with self._load_lock:
                session = self.sessions.get(name)
                if session is None:
                    session = self.sessions[name] = self._engine.load(self.folder, self.manifest, name)
        return session

    def _time_ids(self, original_size, crops_coords_top_left, target_size, size) -> np.ndarray | None:
        """SDXL's micro-conditioning as diffusers builds it: original_size + crops_coords_top_left + target_size,
        [1, 6] float32; None for a family without it."""
        if not self.family.time_ids:
            if original_size is not None or target_size is not None or tuple(crops_coords_top_left) != (0, 0):
                raise InputError(f"original_size, crops_coords_top_left and target_size condition SDXL-family "
                                 f"UNets; this folder is {self.family.name}. Leave them out.")
            return None
        values = []
        for name, pair in (("original_size", original_size or size), ("crops_coords_top_left", crops_coords_top_left),
                           ("target_size", target_size or size)):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) and 0 <= v <= 1 << 16
                                                                                for v in pair)):
                raise InputError(f"{name}={pair!r} must be two non-negative integers (height, width) or (top, left).")
            values += [int(v) for v in pair]
        return np.array([values], dtype=np.float32)

    def _conditioning(self, prompt, negative_prompt, guided: bool, time_ids, n: int) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs for a UNet batch of `n` samples: encoder_hidden_states [n, 77, D] (and
        for the SDXL families text_embeds [n, P], time_ids [n, 6]), or 2n rows as (negative, prompt) halves."""
        cond = dict(self._encode(prompt))
        if time_ids is not None:
            cond[TIME_IDS] = time_ids
        if not guided:
            return {k: np.repeat(v, n, axis=0) for k, v in cond.items()}
        if negative_prompt is None and self._zeros_for_empty_negative:
            # SDXL's rule (diffusers: force_zeros_for_empty_prompt): no negative prompt -> zero embeddings
            uncond = {k: np.zeros_like(v) for k, v in cond.items() if k != TIME_IDS}
        else:
            uncond = dict(self._encode(negative_prompt or ""))
        if time_ids is not None:
            uncond[TIME_IDS] = time_ids
        return {k: np.concatenate([np.repeat(uncond[k], n, axis=0), np.repeat(v, n, axis=0)]) for k, v in cond.items()}

    def _predict(self, x, timesteps, conditioning, guidance_scale, where: str, unet_channels=None) -> np.ndarray:
        """The UNet's guided prediction for latents `x` [B, 4, H/8, W/8] at `timesteps` (one per sample; equal
        unless the folder's UNet takes them per sample); `unet_channels`: an inpainting UNet's mask and
        masked-image latents [B, 5, H/8, W/8], appended to the sample's channels."""
        unet = self.sessions["unet"]
        guided = guidance_scale > 1
        sample = np.concatenate([x, x]) if guided else x  # sample: [B or 2B, C, H/8, W/8]
        if unet_channels is not None:
            sample = np.concatenate([sample, np.concatenate([unet_channels] * 2) if guided else unet_channels], axis=1)
        timesteps = np.asarray(timesteps, dtype=np.float32)
        timestep = np.concatenate([timesteps, timesteps]) if guided else timesteps
        if not self.per_sample_timesteps:  # a format-1 folder: one timestep for the batch
            timestep = timestep[:1]
        pred = unet.run({"sample": sample, "timestep": timestep, **conditioning})["noise_pred"]
        if not np.isfinite(pred).all():
            raise _non_finite("UNet", unet, where)
        if guided:
            uncond, cond = np.split(pred, 2)
            pred = uncond + np.float32(guidance_scale) * (cond - uncond)
        return pred

    def _denoise(self, sampler, x, step_noise, conditioning, guidance_scale, timings, inpaint=None) -> np.ndarray:
        unet = self.sessions["unet"]
        device_loop = unet.denoise_loop(x.shape) if inpaint is None else None
        if device_loop is not None:  # e.g. TensorRT: the whole step as one CUDA-graph launch
            x = device_loop(sampler, x, step_noise, conditioning, guidance_scale, timings)
            if not np.isfinite(x).all():  # the device loop returns only the final latents
                raise _non_finite("UNet", unet, f"in its denoising loop ({len(sampler.timesteps)} steps)")
            return x
        steps = len(sampler.timesteps)
        for i, t in enumerate(sampler.timesteps):
            step_start = time.perf_counter()
            pred = self._predict(x, np.full(len(x), t), conditioning, guidance_scale,
                                 f"at step {i + 1} of {steps} (timestep {t})",
                                 None if inpaint is None else inpaint.unet_channels)
            noise = step_noise[i] if i < len(step_noise) else None
            x = sampler.step(pred, t, x, noise=noise)
            if inpaint is not None and inpaint.image_latents is not None:
                x = inpaint.blend(x, sampler, i)
            timings["unet_steps"].append(time.perf_counter() - step_start)
        if not np.isfinite(x).all():  # finite predictions, yet guidance or the sampler overflowed float32
            raise GenerationError(f"The latents overflowed float32 (NaN/inf) after {steps} steps at guidance_scale="
                                  f"{guidance_scale:g}; use a guidance_scale in the usual 1-2 range.")
        return x

    def _decode(self, latents, timings, ran: dict[str, str], decoder: str = "vae_decoder") -> np.ndarray:
        start = time.perf_counter()
        vae = self._component(decoder)
        ran[decoder] = vae.precision
        image = vae.run({"latents": latents})["image"]  # [N, 3, H, W] in ~[-1, 1]
        if not np.isfinite(image).all():
            if vae.precision == "fp32" or decoder != "vae_decoder":
                raise _non_finite("VAE decoder" if decoder == "vae_decoder" else "tiny VAE decoder", vae,
                                  "for finite latents")
            warnings.warn(f"The {vae.precision} VAE decoder overflowed (NaN/inf in the image); decoding again with "
                          "the fp32 VAE decoder on the CPU. Rebuild without --fp16-vae to avoid this.", stacklevel=3)
            fallback = self._fp32_vae()
            image = fallback.run({"latents": latents})["image"]
            if not np.isfinite(image).all():
                raise _non_finite("VAE decoder", fallback, f"for finite latents (after the {vae.precision} one did)")
            ran["vae_decoder"] = fallback.precision
        timings["vae_decode"] += time.perf_counter() - start
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # [N, H, W, 3] in [0, 1]

    def _fp32_vae(self):
        session = self.sessions.get(_FP32_VAE)
        if session is None:
            loaded = get_backend("onnxruntime-cpu").load(self.folder, self.manifest, "vae_decoder")
            session = self.sessions.setdefault(_FP32_VAE, loaded)  # two threads may both load: keep one
        return session


class _Inpaint:
    """What each denoising step of an inpainting call needs. An inpainting UNet: its extra input channels (the
    latent-size mask and the masked image's latents). A regular UNet: the mask, the image latents and the start
    noise, to put the known region back after every step, noised to the next timestep (none after the last)."""

    def __init__(self, unet_channels=None, mask=None, image_latents=None, noise=None):
        self.unet_channels, self.mask, self.image_latents, self.noise = unet_channels, mask, image_latents, noise

    def rows(self, chunk: slice, n: int) -> "_Inpaint":
        """The arrays of the images in `chunk`, padded to the folder's batch `n`."""
        def part(a):
            return None if a is None else _pad(a[chunk], n)
        return _Inpaint(part(self.unet_channels), self.mask, part(self.image_latents), part(self.noise))

    def blend(self, x: np.ndarray, sampler, step: int) -> np.ndarray:
        """diffusers' inpaint step: (1 - mask) * known + mask * x, the known region at the next timestep."""
        final = step == len(sampler.timesteps) - 1
        known = self.image_latents if final else sampler.add_noise(self.image_latents, self.noise,
                                                                   int(sampler.timesteps[step + 1]))
        return (1 - self.mask) * known + self.mask * x


def _pad(batch: np.ndarray, n: int) -> np.ndarray:
    if len(batch) == n:
        return batch
    return np.concatenate([batch, np.zeros((n - len(batch), *batch.shape[1:]), batch.dtype)])


# --- checks at the API's edge: every argument, before any component runs ---------------------------------

def _is_int(value) -> bool:
    """Python or numpy integers; bool is not one (True would pass as 1), nor is 4.0 (no silent rounding)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _finite_number(value) -> float | None:
    """`value` as a float if it is a finite real number (Python or numpy, not bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return value if math.isfinite(value) else None


def _check_text(name: str, text) -> None:
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"{name} is not valid UTF-8 text: character {e.start} is {text[e.start]!r}, a lone surrogate, which is "
            "what a command-line argument in another encoding becomes. Pass the text as UTF-8 (a UTF-8 locale, "
            "e.g. LANG=C.UTF-8, or an editor that saves UTF-8).") from None


def check_request(prompt, negative_prompt=None, num_inference_steps=4, guidance_scale=1.0, seed=None,
                  num_images=1, output="pil") -> tuple[int, float, int | None, int]:
    """Check a generation's arguments that need no engine folder (`lcmrt generate` checks them before it
    loads one). Returns (num_inference_steps, guidance_scale, seed, num_images) as Python numbers. Integer
    arguments take Python or numpy integers; bool and floats (even 4.0) are refused."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, (str, type(None))):
        raise InputError(f"prompt and negative_prompt must be strings, got {type(prompt).__name__} and "
                         f"{type(negative_prompt).__name__}; for several images of one prompt pass num_images.")
    _check_text("prompt", prompt)
    if negative_prompt is not None:
        _check_text("negative_prompt", negative_prompt)
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise InputError(f"seed={seed!r} must be an integer in [0, 2^64), or None for a random seed.")
    if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= MAX_STEPS:
        kind = "" if _is_int(num_inference_steps) else f": it must be an integer, not {type(num_inference_steps).__name__}"
        raise GenerationError(f"num_inference_steps={num_inference_steps!r} is outside 1..{MAX_STEPS}{kind}; "
                              "LCM needs 2-8 steps for good images (4 is the usual choice).")
    guidance = _finite_number(guidance_scale)
    if guidance is None or abs(guidance) > float(np.finfo(np.float32).max):  # guidance is applied in float32
        raise InputError(f"guidance_scale={guidance_scale!r} must be a finite number: <= 1 runs without guidance, "
                         "1-2 is LCM-LoRA's useful range.")
    if output not in OUTPUTS:
        raise InputError(f"output={output!r} is not one of {', '.join(OUTPUTS)}.")
    if not _is_int(num_images) or not 1 <= num_images <= MAX_NUM_IMAGES:
        raise InputError(f"num_images={num_images!r} must be a positive integer, at most {MAX_NUM_IMAGES} per call "
                         "(a call holds all its images in memory). For more, call it in a loop, with a new seed "
                         "per call.")
    return int(num_inference_steps), guidance, None if seed is None else int(seed), int(num_images)


def _checked_array(what: str, array, shape: tuple) -> np.ndarray:
    """latents or a step_noise array: real numbers of `shape`, finite as float32."""
    try:
        values = np.asarray(array)
    except (TypeError, ValueError):  # ragged nested sequences
        values = None
    if values is None or values.dtype.kind not in "iuf":
        raise InputError(f"{what} must be an array of real numbers, got {type(array).__name__}"
                         + (f" of {values.dtype}" if values is not None else "") + ".")
    if values.shape != shape:
        raise GenerationError(f"{what} has shape {list(values.shape)}, but this size needs {list(shape)} "
                              f"(num_images, latent channels, height/8, width/8).")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused below
        values = values.astype(np.float32, copy=False)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(f"{what} hold NaN or inf ({bad} of {values.size} values): the image would be NaN. "
                         "Draw them from a standard normal distribution, e.g. numpy.random.default_rng(seed)."
                         "standard_normal(shape, dtype=numpy.float32).")
    return values


def _non_finite(component: str, session, where: str) -> GenerationError:
    """The error for NaN/inf out of a component: no image is better than a silently wrong one."""
    if session.precision != "fp32":
        fix = (f"Its {session.precision} graph overflowed: run with precision='fp32' (`lcmrt generate "
               f"--precision fp32`), or rebuild the folder without --{session.precision}.")
    else:
        fix = ("The fp32 graph should not do that: its files may be damaged or come from another model. Rebuild "
               "the folder with `lcmrt build`.")
    return GenerationError(f"The {component} ({session.precision}) returned NaN/inf {where}, so there is no "
                           f"image. {fix}")


def _check_adapter_types(adapters) -> None:
    """The shape of an adapter request, before the bank checks names and weights against the folder."""
    if not isinstance(adapters, dict):
        raise AdapterError(f"adapters must be a dict {{name: weight}}, e.g. {{'papercut': 0.8}}; got "
                           f"{type(adapters).__name__}.")
    for name, weight in adapters.items():
        if not isinstance(name, str):
            raise AdapterError(f"Adapter names must be strings, got {name!r} ({type(name).__name__}).")
        if _finite_number(weight) is None:
            raise AdapterError(f"Adapter {name!r} has weight {weight!r}; weights must be finite numbers.")


def _switch(session, bank: AdapterBank, component: str, active: dict[str, float], weights: dict):
    """What switches one component's session to the adapter set `active`, its arrays computed now, applied when
    called: low-rank factors where the session takes them (the merged weights are computed later, by its
    background thread), else `weights[component]`."""
    if session.factor_inputs:
        factors = bank.factors_for(active, component, session.factor_inputs)
        return lambda: session.refit_factors(factors, lambda: bank.merged(active, component))
    return lambda: session.refit(weights[component])


def _set_key(active: dict[str, float]) -> tuple:
    """An adapter set as a hashable key: the adapters with a non-zero weight."""
    return tuple(sorted((name, weight) for name, weight in active.items() if weight != 0.0))
