"""The backend interface: what the runtime needs from an inference engine, and nothing more.

A backend loads one component (text encoder, UNet, VAE) from the engine folder into a `Session`; a
session runs with named arrays and can have named weights replaced (refit) for adapter swapping.
ONNX Runtime, OpenVINO and TensorRT implement it; the pipeline never talks to any of them directly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or a str for a dimension that varies (the UNet batch of a cfg folder, the size)
    dtype: np.dtype


class Session(ABC):
    """One loaded component."""

    component: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    precision: str = "fp32"  # of the loaded graph or engine
    factor_inputs: dict = {}  # refit by low-rank factors (module -> manifest.FactorInputs): refit_factors takes them

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; every input by name, every output returned by name."""

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """A BackendError naming the input unless `feeds` are exactly the inputs, each of its dtype and shape."""
        missing = [name for name in self.inputs if name not in feeds]
        unknown = [name for name in feeds if name not in self.inputs]
        if missing or unknown:
            raise BackendError(
                f"{self.component} takes inputs {', '.join(self.inputs)}; "
                + (f"missing: {', '.join(missing)}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"not inputs of this graph: {', '.join(unknown)}" if unknown else "") + ".")
        for name, spec in self.inputs.items():
            value = feeds[name]
            if not isinstance(value, np.ndarray) or value.dtype != spec.dtype or not fits(value.shape, spec.shape):
                got = describe(value.dtype, value.shape) if isinstance(value, np.ndarray) else type(value).__name__
                raise BackendError(
                    f"{self.component} input {name!r}: expected {describe(spec.dtype, spec.shape)}, got {got}.")

    def denoise_loop(self, shape: tuple[int, ...]):
        """For a UNet session: a device-resident LCM loop `(sampler, latents, step_noise, conditioning,
        guidance_scale, timings) -> latents` for latents of `shape` [N, C, H/8, W/8] (conditioning: the UNet's
        other inputs by name), or None to run the loop in numpy on the host."""
        return None

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Replace graph weights (by graph initializer name) in place. Only refittable folders need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot refit weights")

    def refit_factors(self, factors: dict[str, np.ndarray], merged) -> None:
        """Swap adapters by binding new low-rank factors (input name -> array) to the graph's low-rank branches
        (sessions with `factor_inputs`); `merged()` gives the merged weights (initializer name -> array) of the
        same set, which a faster session may bake in meanwhile."""
        raise NotImplementedError(f"{type(self).__name__} cannot take low-rank factors")

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until work a refit left running in the background (a faster session being built) is done; False
        if `timeout` seconds passed first. Sessions without such work return True at once."""
        return True


class Backend(ABC):
    name: str

    @abstractmethod
    def load(self, folder: Path, manifest: dict, component: str, weights: dict | None = None) -> Session:
        """Load `component` of the engine folder, after checking its files against the manifest's hashes.
        `weights` (graph initializer name -> array) replace graph weights from the start, as `refit` would."""

    def factor_inputs(self, manifest, component: str) -> dict:
        """The low-rank factor inputs (module -> manifest.FactorInputs) `load` gives `component`'s session, which
        then swaps adapters by `refit_factors` and takes no `weights`; {} for backends that refit weights."""
        return {}


def fits(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(isinstance(e, str) or s == e for s, e in zip(shape, expected))


def describe(dtype, shape) -> str:
    return f"{np.dtype(dtype).name if dtype is not None else 'unsupported type'}[{', '.join(str(d) for d in shape)}]"
