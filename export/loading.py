"""Load the base model as an fp32 diffusers pipeline from a diffusers folder, a single-file checkpoint, or a hub id.

Pickled checkpoints (.ckpt, .bin, .pt, .pth) can run arbitrary code when loaded, so they are refused
unless the user opts in.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, ModelLoadError
from ..manifest import file_sha256

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth"}
WEIGHT_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES
# diffusers pipeline class -> lcmrt family (SDXL's pipeline also serves SSD-1B: see _family_of_unet)
# An inpainting model (9-channel UNet) loads as its family's text-to-image pipeline: the same components.
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd15", "LatentConsistencyModelPipeline": "sd15",
                     "StableDiffusionInpaintPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                     "StableDiffusionXLInpaintPipeline": "sdxl"}
# SD1.5 pipelines come with a safety checker lcmrt does not export
_SD15_OPTIONS = {"sd15": {"safety_checker": None, "requires_safety_checker": False}}
# One quick Hub look-up before loading: long enough for a slow link, short next to the downloader's retries.
HUB_TIMEOUT_S = 10


def _one_line(e: Exception) -> str:
    """An exception as one short line: CLI errors are one paragraph."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(e).__name__}: {text.rstrip('.')}" if text else type(e).__name__


@dataclass
class LoadedModel:
    pipe: object  # diffusers.StableDiffusionPipeline, fp32, eval mode
    family: str
    source: dict  # for the manifest: kind, id, sha256


def _family_of(pipeline_class: str, where: str) -> str:
    try:
        return PIPELINE_FAMILIES[pipeline_class]
    except KeyError:
        raise ModelLoadError(
            f"{where} is a {pipeline_class}; lcmrt builds {', '.join(PIPELINE_FAMILIES)} models "
            f"(sd15, sdxl, ssd1b) so far.") from None


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline


def _family_of_unet(family: str, pipe) -> str:
    """SSD-1B is an SDXL pipeline whose distilled UNet has fewer transformer layers in its up blocks than in its
    down blocks, which diffusers' config states as `reverse_transformer_layers_per_block`."""
    if family == "sdxl" and pipe.unet.config.get("reverse_transformer_layers_per_block") is not None:
        return "ssd1b"
    return family


def _folder_sha256(folder: Path, allow_pickle: bool) -> str:
    """One hash over every weight file of a diffusers folder (names and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES):
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            continue  # not loaded either: diffusers prefers the safetensors twin
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(
            f"{path} is a pickled checkpoint ({path.suffix}), which can run arbitrary code when loaded. "
            "Convert it to .safetensors, or pass --allow-pickle if you trust its source.")


def _load_folder(folder: Path, allow_pickle: bool) -> LoadedModel:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json). Pass a folder saved with "
            "`save_pretrained`, a single-file .safetensors checkpoint with --config, or a hub id.")
    family = _family_of(json.loads(index.read_text()).get("_class_name", "?"), str(folder))
    has_safetensors = any(folder.rglob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise InputError(
            f"{folder} holds only pickled weights (.bin/.ckpt), which can run arbitrary code when loaded. "
            "Convert them to .safetensors, or pass --allow-pickle if you trust the source.")
    try:
        pipe = _pipeline_class(family).from_pretrained(
            folder, torch_dtype=torch.float32, local_files_only=True, use_safetensors=None if allow_pickle else True,
            **_SD15_OPTIONS.get(family, {}))
    except Exception as e:
        raise ModelLoadError(f"Loading the diffusers folder {folder} failed: {_one_line(e)}.") from e
    source = {"kind": "diffusers", "id": str(folder.resolve()), "sha256": _folder_sha256(folder, allow_pickle)}
    return LoadedModel(pipe, _family_of_unet(family, pipe), source)


def _load_single_file(path: Path, config: str | None, allow_pickle: bool) -> LoadedModel:
    _refuse_pickle(path, allow_pickle)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"{path} is not a model: expected a diffusers folder or a .safetensors checkpoint.")
    if config is not None and not Path(config).exists():
        raise InputError(f"--config {config} does not exist. Pass a diffusers folder of the same architecture.")
    if config is None and _hub_offline():  # diffusers would look the architecture's config up on the Hub
        raise ModelLoadError(
            f"{path} is a single-file checkpoint, and HF_HUB_OFFLINE is set, so its architecture's config cannot "
            "be fetched from the Hugging Face Hub. Offline, pass --config pointing at a diffusers folder (or its "
            "config) of the same architecture, e.g. --config path/to/stable-diffusion-v1-5.")
    # the architecture is --config's (an SDXL folder for an SDXL checkpoint); without one, SD1.x
    index = Path(config or "") / "model_index.json"
    family = _family_of(json.loads(index.read_text()).get("_class_name", "?"), config) if index.is_file() else "sd15"
    try:
        pipe = _pipeline_class(family).from_single_file(
            str(path), config=config, torch_dtype=torch.float32, local_files_only=config is not None,
            **_SD15_OPTIONS.get(family, {}))
    except Exception as e:
        hint = ("Offline, a single-file checkpoint needs --config pointing at a diffusers folder (or its "
                "config) of the same architecture, e.g. --config path/to/stable-diffusion-v1-5."
                if config is None else "Check that --config is a diffusers folder of the same architecture.")
        raise ModelLoadError(f"Loading the checkpoint {path} failed ({_one_line(e)}). {hint}") from e
    source = {"kind": "single_file", "id": str(path.resolve()), "sha256": file_sha256(path)}
    return LoadedModel(pipe, _family_of_unet(family, pipe), source)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when it was set after huggingface_hub was imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _check_hub(model_id: str) -> None:
    """Fail fast, naming the problem, before diffusers' downloader retries an unreachable Hub for half a minute."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    not_local = f"{model_id!r} is not a local path"
    if _hub_offline():
        raise ModelLoadError(
            f"{not_local}, and HF_HUB_OFFLINE is set, so it cannot be fetched from the Hugging Face Hub. Pass a "
            "local diffusers folder (or a .safetensors checkpoint with --config), or unset HF_HUB_OFFLINE when online.")
    try:
        HfApi().model_info(model_id, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelLoadError(
            f"{not_local}, and the Hugging Face Hub has no model {model_id!r} you can read ({type(e).__name__}). "
            "Check the spelling of the path or id; for a private or gated model, log in with `hf auth login`.") from e
    except Exception as e:  # no network, DNS, proxy, timeout: the HTTP client raises many types
        raise ModelLoadError(
            f"{not_local}, and the Hugging Face Hub cannot be reached ({_one_line(e)}): this machine looks offline. "
            "Download the model elsewhere and pass its local diffusers folder; check the spelling of the path "
            "otherwise.") from e


def _load_hub(model_id: str, allow_pickle: bool) -> LoadedModel:
    _check_hub(model_id)  # before importing every diffusers pipeline, which takes seconds
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(model_id)
        family = _family_of(config.get("_class_name", "?"), model_id)
        pipe = DiffusionPipeline.from_pretrained(
            model_id, torch_dtype=torch.float32, use_safetensors=None if allow_pickle else True,
            **_SD15_OPTIONS.get(family, {}))
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"{model_id!r} is not a local path, and fetching it from the Hugging Face Hub failed "
            f"({_one_line(e)}). If you are offline, download the model elsewhere and pass its local diffusers "
            "folder; check the spelling of the path otherwise.") from e
    source = {"kind": "hub", "id": model_id, "sha256": None}
    return LoadedModel(pipe, _family_of_unet(family, pipe), source)


def load_model(model: str, config: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    path = Path(model)
    if path.is_dir():
        loaded = _load_folder(path, allow_pickle)
    elif path.is_file():
        loaded = _load_single_file(path, config, allow_pickle)
    elif model.count("/") == 1 and not model.startswith((".", "/", "~")) and path.suffix == "":
        loaded = _load_hub(model, allow_pickle)
    else:
        raise InputError(f"Model {model} does not exist. Pass a diffusers folder, a .safetensors checkpoint, "
                         "or a hub id like org/name.")
    loaded.pipe.to(torch.float32)
    for module in (loaded.pipe.unet, loaded.pipe.vae, loaded.pipe.text_encoder,
                   getattr(loaded.pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval()
    return loaded
