"""Refittable adapters, runtime side: compute graph weights for an adapter set from pristine base weights.

Every weight is computed from the base the build stored, never by patching the previously active set:

    W = W_base + sum_i w_i * scale_i * up_i @ down_i

so switching A -> B -> A gives A bit for bit, and weight 0 gives the base exactly. The base weights are
memory-mapped from the graphs' external data (the page cache holds them, not the process heap).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .errors import AdapterError, EngineFolderError
from .manifest import REFIT_FIX, FactorInputs, Manifest, RefitEntry, folder_file, verify_files

READD = "Re-add the adapter with `lcmrt adapter add`."


class AdapterBank:
    """The adapter packs and refit map of one engine folder."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.folder = Path(folder)
        self.refit_map = manifest.refit_map
        self.fused = {a.name: a.weight for a in manifest.adapters if a.fused}
        self.refittable = {a.name: a for a in manifest.adapters if not a.fused}
        self._packs: dict[str, dict[str, tuple]] = {}
        self._base: dict[str, np.ndarray] = {}

    def defaults(self) -> dict[str, float]:
        """The refittable adapters' weights as built."""
        return {name: a.weight for name, a in self.refittable.items()}

    def check(self, adapters: dict[str, float]) -> dict[str, float]:
        """Validate a requested set; return the full refittable set (unlisted adapters at weight 0)."""
        requested = dict(adapters)
        for name, weight in requested.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(weight):
                raise AdapterError(f"Adapter {name!r} has weight {weight!r}; weights must be finite numbers.")
            if name in self.fused:
                if weight != self.fused[name]:
                    raise AdapterError(
                        f"Adapter {name!r} is fused into this folder's graphs at weight {self.fused[name]:g}, so "
                        f"its weight cannot change to {weight:g}. Rebuild with --refittable"
                        f"{'-lcm' if name == 'lcm' else ''} to make it swappable.")
            elif name not in self.refittable:
                known = ", ".join(sorted(self.refittable)) or "none"
                raise AdapterError(f"Adapter {name!r} is not in {self.folder} (refittable adapters: {known}). "
                                   f"Add it with `lcmrt adapter add {self.folder} FILE --name {name}`.")
        return {name: float(requested.get(name, 0.0)) for name in self.refittable}

    def pack(self, name: str) -> dict[str, tuple]:
        """{module: (down [r, ...], up [out, r, ...], scale)} of one adapter, loaded once."""
        if name not in self._packs:
            if self.refittable[name].pack is None:
                raise AdapterError(f"Adapter {name!r} of {self.folder} has no pack. Re-add it with `lcmrt adapter add`.")
            adapter = self.refittable[name]
            try:
                verify_files(self.folder, {adapter.pack: adapter.pack_sha256}, READD)
            except EngineFolderError as e:
                raise AdapterError(f"Adapter {name!r}: {e}") from None
            path = folder_file(self.folder, adapter.pack)
            try:
                tensors = load_file(str(path))
                modules = {key[: -len(".down")] for key in tensors if key.endswith(".down")}
                self._packs[name] = {m: _factors(tensors, m) for m in modules}
            except Exception as e:  # safetensors raises its own error type; a truncated pack lacks keys
                raise AdapterError(f"Adapter pack {path} of {name!r} is damaged ({type(e).__name__}: {e}). "
                                   f"{READD}") from e
            unmapped = sorted(set(self._packs[name]) - set(self.refit_map))
            if unmapped:
                del self._packs[name]
                raise EngineFolderError(f"Adapter {name!r} changes {len(unmapped)} module(s) the refit map of "
                                        f"{self.folder} lacks, e.g. {', '.join(unmapped[:3])}. {REFIT_FIX}")
        return self._packs[name]

    def base(self, module: str) -> np.ndarray:
        """The pristine graph weight of a module, in graph layout (read-only memory map)."""
        if module not in self._base:
            self._base[module] = map_base(self.folder, self.refit_map[module])
        return self._base[module]

    def _contributions(self, active: dict[str, float]) -> dict[str, tuple]:
        """{module: ((adapter, weight), ...)} for the adapters with a non-zero weight."""
        contributions: dict[str, list] = {}
        for name, weight in sorted(active.items()):
            if weight != 0.0:
                for module in self.pack(name):
                    contributions.setdefault(module, []).append((name, weight))
        return {m: tuple(c) for m, c in contributions.items()}

    def changed(self, old: dict[str, float], new: dict[str, float]) -> dict[str, list[str]]:
        """{component: modules} whose weights differ between two adapter sets."""
        before, after = self._contributions(old), self._contributions(new)
        changed: dict[str, list[str]] = {}
        for module in sorted(m for m in set(before) | set(after) if before.get(m) != after.get(m)):
            changed.setdefault(self.refit_map[module].component, []).append(module)
        return changed

    def weights_for(self, old: dict[str, float], new: dict[str, float],
                    components: set[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Graph weights that differ between two adapter sets, computed for `new` (only for `components`, if
        given): {component: {initializer name: array}}."""
        after = self._contributions(new)
        return {component: {self.refit_map[m].weight: self._weight(m, after.get(m, ())) for m in modules}
                for component, modules in self.changed(old, new).items() if components is None or component in components}

    def merged(self, active: dict[str, float], component: str) -> dict[str, np.ndarray]:
        """The graph weights of `component` that `active` changes from the base: {initializer name: array}."""
        return self.weights_for({}, active, {component}).get(component, {})

    def factors_for(self, active: dict[str, float], component: str,
                    inputs: dict[str, FactorInputs]) -> dict[str, np.ndarray]:
        """The factor inputs of `component`'s refit-factors graph ({module: FactorInputs}) for `active`: per module the
        active adapters' down factors stacked along the rank, and their up factors times weight and scale,
        zeros in the rank left over (lcmrt.engines.lowrank_graph has the math and layouts)."""
        contributions = {m: c for m, c in self._contributions(active).items()
                         if self.refit_map[m].component == component}
        outgrown = sorted(set(contributions) - set(inputs))
        if outgrown:
            raise AdapterError(f"The refit-factors graphs of {self.folder} have no low-rank branch for "
                               f"{len(outgrown)} module(s) these adapters change, e.g. {', '.join(outgrown[:3])}. "
                               f"Rebuild them with `lcmrt build --engines-only {self.folder}`, or load with "
                               "refit='background'.")
        feeds = {}
        for module, factors in inputs.items():
            shape = self.refit_map[module].shape  # [out, in] or [out, in, kh, kw]
            down = np.zeros((factors.rank, *shape[1:]), np.float32)
            up = np.zeros((shape[0], factors.rank, *((1, 1) if len(shape) == 4 else ())), np.float32)
            rank = 0
            for name, weight in contributions.get(module, ()):
                d, u, scale = self.pack(name)[module]
                if rank + d.shape[0] > factors.rank or d.shape[1:] != down.shape[1:] or u.shape[0] != shape[0]:
                    raise AdapterError(f"Adapter {name!r} changes {module} with factors {list(u.shape)} x "
                                       f"{list(d.shape)}, which the low-rank branch of rank {factors.rank} for its "
                                       f"{list(shape)} weight cannot hold. Rebuild the refit-factors graphs with "
                                       f"`lcmrt build --engines-only {self.folder}`.")
                down[rank:rank + d.shape[0]] = d
                up[:, rank:rank + d.shape[0]] = u * np.float32(weight * scale)
                rank += d.shape[0]
            if len(shape) == 2:  # a Linear's branch is x @ D^T @ U^T
                down, up = np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
            feeds[factors.down], feeds[factors.up] = down, up
        return feeds

    def _weight(self, module: str, contributions: tuple) -> np.ndarray:
        entry = self.refit_map[module]
        base = np.asarray(self.base(module))  # graph layout
        if not contributions:
            return np.array(base)
        total = None
        for name, weight in contributions:
            down, up, scale = self.pack(name)[module]
            if up.shape[0] * math.prod(down.shape[1:]) != base.size:
                raise AdapterError(f"Adapter {name!r} changes {module} with factors {list(up.shape)} x "
                                   f"{list(down.shape)}, which do not make its {list(entry.shape)} weight. Re-add it "
                                   "with `lcmrt adapter add`.")
            up = up.reshape(up.shape[0], -1) * np.float32(weight * scale)  # [out, r]: scaling the small factor
            down = down.reshape(down.shape[0], -1)  # [r, in*kh*kw]
            # straight into the graph's layout: a transposed weight gets down^T @ up^T (BLAS transposes for free)
            delta = down.T @ up.T if entry.transpose else up @ down
            total = delta if total is None else np.add(total, delta, out=total)
        total = total.reshape(base.shape)
        return np.add(total, base, out=total)


def map_base(folder: Path, entry: RefitEntry, mode: str = "r") -> np.memmap:
    """The pristine graph weight of one refit map entry, in graph layout, memory-mapped from the graph's data file
    after checking it. Mode "r" is read-only; "c" (copy-on-write: pages stay shared with the file until written)
    for libraries that only take writeable arrays."""
    if entry.file is None:
        raise EngineFolderError(f"The refit map of {folder} does not say where {entry.module}'s weight is "
                                f"stored. {REFIT_FIX}")
    shape = entry.shape[::-1] if entry.transpose else entry.shape
    verify_files(folder, {entry.file: entry.file_sha256})
    path = folder_file(folder, entry.file)
    if entry.offset + entry.length > path.stat().st_size:
        raise EngineFolderError(f"The refit map of {folder} places {entry.module}'s weight at bytes "
                                f"{entry.offset}+{entry.length}, past the end of {entry.file}. {REFIT_FIX}")
    return np.memmap(path, dtype=np.dtype(entry.dtype), mode=mode, offset=entry.offset, shape=tuple(shape))


def _factors(tensors: dict, module: str) -> tuple:
    """(down [r, ...], up [out, r, ...], scale) of one module of a pack, checked to be a finite float32 low-rank
    pair (a pack from another tool, or damaged, fails here rather than as a wrong image)."""
    down, up, scale = tensors[f"{module}.down"], tensors[f"{module}.up"], tensors[f"{module}.scale"]
    rank = down.shape[0] if down.ndim >= 2 else 0
    if (any(a.dtype != np.float32 for a in (down, up, scale)) or scale.shape != (1,) or rank < 1
            or up.ndim != down.ndim or up.shape[1] != rank
            or not all(np.isfinite(a).all() for a in (down, up, scale))):
        raise ValueError(f"{module}: down {list(down.shape)} {down.dtype}, up {list(up.shape)} {up.dtype}, scale "
                         f"{list(scale.shape)} are not a finite float32 LoRA pair of rank >= 1")
    return down, up, float(scale[0])
