"""The backend interface: what the runtime needs from an inference engine, and nothing more.

A backend loads one component (text encoder, UNet, VAE) from the engine folder into a `Session`; a
session runs with named arrays and can have named weights replaced (refit) for adapter swapping.
ONNX Runtime and TensorRT implement it; the pipeline never talks to either directly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or a str for a dimension that varies (the UNet batch of a cfg folder, the size)
    dtype: np.dtype


class Session(ABC):
    """One loaded component."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    precision: str = "fp32"  # of the loaded graph or engine

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; every input by name, every output returned by name."""

    def denoise_loop(self, shape: tuple[int, ...]):
        """For a UNet session: a device-resident LCM loop `(sampler, latents, step_noise, conditioning,
        guidance_scale, timings) -> latents` for latents of `shape` [N, C, H/8, W/8] (conditioning: the UNet's
        other inputs by name), or None to run the loop in numpy on the host."""
        return None

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Replace graph weights (by graph initializer name) in place. Only refittable folders need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot refit weights")


class Backend(ABC):
    name: str

    @abstractmethod
    def load(self, folder: Path, manifest: dict, component: str, weights: dict | None = None) -> Session:
        """Load `component` of the engine folder, after checking its files against the manifest's hashes.
        `weights` (graph initializer name -> array) replace graph weights from the start, as `refit` would."""
