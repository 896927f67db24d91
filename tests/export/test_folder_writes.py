"""Commands that change a folder are all or nothing: interrupted at any write, the folder is the old one (or,
after the manifest's rename, the new one), and the next change clears what was left. `--overwrite` replaces
only what lcmrt wrote."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lcmrt.engines.build import EngineRequest, add_engines
from lcmrt.errors import InputError
from lcmrt.export.adapters import add_adapter
from lcmrt.export.lora import LoraSpec
from lcmrt.export.random_model import write_random_model
from lcmrt.folder_update import SCRATCH_PREFIX, referenced_files
from lcmrt.manifest import MANIFEST_NAME, read_manifest
from lcmrt.pipeline import Pipeline

PROMPT = "a fox"


class Interrupted(BaseException):
    """Stands for SIGINT / a crash: not an Exception, so no `except Exception` swallows it."""


def _image(folder, **adapters):
    return Pipeline.load(folder, adapters=adapters or None)(PROMPT, seed=0, num_inference_steps=2, output="np")


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _interrupt_at(monkeypatch, k: int) -> list:
    """Raise Interrupted at the k-th file-system change (1-based) made through these functions."""
    calls = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            calls.append(name)
            if len(calls) == k:
                raise Interrupted(f"at {name}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapped)

    for owner, name in ((os, "replace"), (os, "rename"), (pathlib.Path, "write_bytes"), (pathlib.Path, "write_text"),
                        (pathlib.Path, "unlink"), (pathlib.Path, "mkdir"), (shutil, "rmtree")):
        wrap(owner, name)
    return calls


def _appeared(folder, name: str) -> bool:
    """A file whose name holds `name` is somewhere in the folder (the command may remove its scratch folder
    while we list it: then not yet)."""
    try:
        return any(name in p.name for p in folder.rglob("*"))
    except FileNotFoundError:
        return False


def _no_leftovers(folder):
    manifest = read_manifest(folder)
    names = set(_listing(folder))
    graphs = {n for n in names if n.endswith((".onnx", ".onnx.data")) or n.startswith("adapters/")}
    assert graphs - {"adapters"} <= referenced_files(manifest), graphs - referenced_files(manifest)
    assert not [n for n in names if n.startswith((SCRATCH_PREFIX, f".{MANIFEST_NAME}"))]


def test_adapter_add_interrupted_at_every_write_keeps_a_working_folder(tiny_refit_engine, tiny_model, tmp_path,
                                                                       monkeypatch):
    folder = shutil.copytree(tiny_refit_engine, tmp_path / "engine")
    before = _image(folder)
    old_listing = _listing(folder)
    spec = LoraSpec(tiny_model["style_lora"], weight=0.0, name="style2")
    interrupted = 0
    for k in range(1, 100):
        calls = _interrupt_at(monkeypatch, k)
        try:
            add_adapter(folder, spec)
        except Interrupted:
            interrupted += 1
        monkeypatch.undo()
        if len(calls) < k:  # this run made fewer than k changes: it completed
            break
        names = [a.name for a in read_manifest(folder).adapters]
        assert names in (["lcm", "style"], ["lcm", "style", "style2"]), (k, calls[-1], names)
        assert np.array_equal(_image(folder), before), (k, calls[-1])
        if names[-1] == "style2":  # interrupted after the commit: the new folder, complete
            assert not np.array_equal(_image(folder, style=0.8, style2=1.0), before)
            break
    print(f"adapter add: interrupted at {interrupted} write points, each left a working folder")
    assert interrupted >= 6, f"only {interrupted} write points were interrupted"
    # the next change (here, the add itself or another) clears what the interrupted ones left
    if "style2" not in [a.name for a in read_manifest(folder).adapters]:
        add_adapter(folder, spec)
    add_adapter(folder, LoraSpec(tiny_model["style_lora"], weight=0.0, name="style3"))
    _no_leftovers(folder)
    assert np.array_equal(_image(folder), before)
    assert set(old_listing) - set(_listing(folder)) <= {"unet.refit-inputs.onnx", "text_encoder.refit-inputs.onnx"}


def test_adapter_add_killed_by_sigint_leaves_the_old_or_the_new_folder(tiny_refit_engine, tiny_model, tmp_path):
    """The reported case: SIGINT to `lcmrt adapter add` shortly after the pack appears."""
    src = shutil.copytree(tiny_refit_engine, tmp_path / "src")
    before = _image(src)
    command = [sys.executable, "-m", "lcmrt", "adapter", "add", None, str(tiny_model["style_lora"]), "--name", "s2"]
    outcomes = []
    for i, delay in enumerate((0.0, 0.05, 0.2, 1.0)):
        folder = shutil.copytree(src, tmp_path / f"try{i}")
        command[5] = str(folder)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not _appeared(folder, "s2") and process.poll() is None:
            assert time.monotonic() < deadline, "the pack never appeared"
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        names = [a.name for a in read_manifest(folder).adapters]
        assert names in (["lcm", "style"], ["lcm", "style", "s2"])
        assert np.array_equal(_image(folder), before)
        outcomes.append(names[-1])
    print(f"SIGINT 0, 0.05, 0.2, 1 s after the pack appeared: {outcomes}")


def test_engines_only_interrupted_keeps_the_graphs_it_had(tiny_engine, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_engine, tmp_path / "engine")
    before = _image(folder)
    interrupted = 0
    for k in range(1, 100):
        calls = _interrupt_at(monkeypatch, k)
        try:
            add_engines(folder, EngineRequest(int8=True, choose_backends=False))  # one backend: bit-exact images
        except Interrupted:
            interrupted += 1
        monkeypatch.undo()
        if len(calls) < k:
            break
        read_manifest(folder)
        assert np.array_equal(_image(folder), before), (k, calls[-1])
    print(f"engines-only --int8: interrupted at {interrupted} write points, each left a working folder")
    assert interrupted >= 3
    _no_leftovers(folder)
    assert "int8" in read_manifest(folder).components["unet"].variants


def test_a_rebuilt_variant_replaces_the_old_files(tiny_engine, tmp_path):
    """A second --engines-only writes beside the first (another name) and removes the first after the commit."""
    folder = shutil.copytree(tiny_engine, tmp_path / "engine")
    first = read_manifest(folder).components["unet"].variants["ort-cpu"].file
    add_engines(folder, EngineRequest())
    second = read_manifest(folder).components["unet"].variants["ort-cpu"].file
    assert second != first and not (folder / first).exists() and (folder / second).is_file()
    _no_leftovers(folder)


def test_random_model_overwrite_replaces_only_a_random_model(tiny_model, tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    with pytest.raises(InputError, match="only replaces a folder written by `lcmrt random-model`"):
        write_random_model(documents, size="tiny", overwrite=True)
    assert (documents / "thesis.txt").read_text() == "years of work"
    # a random model with a user's file added is not replaced either
    model = tmp_path / "model"
    shutil.copytree(tiny_model["model"].parent, model)
    (model / "notes.md").write_text("mine")
    with pytest.raises(InputError, match="only replaces"):
        write_random_model(model, size="tiny", overwrite=True)
    (model / "notes.md").unlink()
    write_random_model(model, size="tiny", seed=1, overwrite=True)
    assert (model / "model" / "model_index.json").is_file()
