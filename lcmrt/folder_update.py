"""Changing an existing engine folder all or nothing (`lcmrt adapter add`, `lcmrt build --engines-only`).

A change writes every new file under a name the current manifest does not use, beside the old files, and
then replaces `manifest.json` by an atomic rename: that rename is the commit. A crash before it leaves the old
folder (its manifest names only old, intact files), after it the new one. Files no manifest names any more,
and those of an interrupted change, are removed after the commit and before the next change. One change at a
time: writers hold an exclusive lock on the folder.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .manifest import ADAPTER_DIR, MANIFEST_NAME, Manifest, read_manifest, variant_files, write_manifest

SCRATCH_PREFIX = ".scratch-"  # folders a change builds files in before moving them beside the old ones
# What a change may leave behind: its own graph files, adapter packs, scratch folders and manifest temporaries.
# Anything else in the folder (the tokenizer's other files, TensorRT's caches, a user's notes) is never removed.
_GRAPH_FILE = re.compile(r"(\.onnx|\.onnx\.data|\.openvino(-int8)?(-\d+)?\.(xml|bin))$")


def referenced_files(manifest: Manifest) -> set[str]:
    """Every file the manifest names: graphs and their data, variants, tokenizers, adapter packs, engines."""
    names = {tokenizer.file for tokenizer in manifest.tokenizers.values()}
    for component in manifest.components.values():
        for graph in (component.graph_fp32, *component.variants.values()):
            names.update(graph.sha256)
    names.update(a.pack for a in manifest.adapters if a.pack)
    for engine in manifest.engines:
        names.update(n for n in (engine.file, engine.refit_base) if n)
    return names


def _leftovers(folder: Path, referenced: set[str]) -> list[Path]:
    top = [p for p in folder.iterdir() if p.name not in referenced and (
        _GRAPH_FILE.search(p.name) and p.is_file()
        or p.name.startswith((SCRATCH_PREFIX, f".{MANIFEST_NAME}.")))]
    packs = folder / ADAPTER_DIR
    if packs.is_dir():
        top += [p for p in packs.iterdir()
                if f"{ADAPTER_DIR}/{p.name}" not in referenced and p.suffix == ".safetensors"]
    return top


def remove_leftovers(folder: Path, manifest: Manifest) -> list[str]:
    """Remove the files of interrupted or superseded changes; return their names."""
    removed = []
    for path in _leftovers(folder, referenced_files(manifest)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


@contextmanager
def changing(folder: str | Path):
    """Hold the folder's write lock, clear what an interrupted change left, and yield its manifest; the
    caller writes new files under `fresh_graph_name`s (or new names) and ends with `commit`."""
    folder = Path(folder)
    read_manifest(folder)  # an engine folder, or a clear error before anything is touched
    lock = os.open(folder, os.O_RDONLY)  # the folder itself is the lock: nothing extra is written into it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(folder)  # as the previous writer left it
        remove_leftovers(folder, manifest)
        yield manifest
    finally:
        os.close(lock)  # releases the lock


def commit(folder: str | Path, manifest: Manifest) -> None:
    """Replace the manifest (the commit point), then remove the files it no longer names."""
    write_manifest(folder, manifest)
    remove_leftovers(Path(folder), manifest)


def fresh_graph_name(folder: Path, manifest: Manifest, component: str, variant: str) -> str:
    """A name for a new graph of `component`'s `variant` (`unet.fp16.onnx`, or `unet.fp16-1.onnx` while the
    manifest still names the first), with no file of an interrupted change in its way."""
    referenced = referenced_files(manifest)
    for n in range(len(referenced) + 2):
        files = variant_files(component, variant if n == 0 else f"{variant}-{n}")
        if not referenced.intersection(files):
            for stale in files:
                (folder / stale).unlink(missing_ok=True)
            return files[0]
    raise AssertionError("unreachable: more names than referenced files")


def scratch_folder(folder: Path) -> Path:
    path = folder / f"{SCRATCH_PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path
