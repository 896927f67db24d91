"""A damaged `manifest.json` against its readers (lcmrt/manifest.py and its users): `read_manifest`,
`Pipeline.load`, `lcmrt info` and `lcmrt adapter list` return or raise an LcmrtError, whatever the mutation
(tests/fuzz/mutations.py), and Pipeline.load never opens a file outside the engine folder, whichever way a
file name points out of it."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, note, settings
from hypothesis import strategies as st

from fuzz.mutations import FILE_KEYS, dumps, file_references, manifest_mutation
from fuzz.outcomes import OpenedFiles, cli_outcome, escaped, outcome, raise_unless_accepted
from lcmrt.cli import cli
from lcmrt.errors import LcmrtError
from lcmrt.manifest import MANIFEST_NAME, read_manifest
from lcmrt.pipeline import Pipeline

EXAMPLES = settings().max_examples  # the profile's (100 under "ci")
LOADS = max(8, EXAMPLES // 10)  # Pipeline.load takes ~0.3 s on the tiny folders
BACKEND = "onnxruntime-cpu"


@contextmanager
def damaged_manifest(folder: Path, rnd):
    """The folder with a randomly mutated manifest.json (restored afterwards); yields the mutation. A mutated
    file name may point at bait.txt beside the folder."""
    path = folder / MANIFEST_NAME
    original = path.read_bytes()
    bait = folder.parent / "bait.txt"
    bait.write_text("not part of the engine folder\n")
    mutation = manifest_mutation(original, rnd, outside=(str(bait), os.path.relpath(bait, folder)))
    note(f"manifest mutation: {mutation}")
    path.write_bytes(mutation.data)
    try:
        yield mutation
    finally:
        path.write_bytes(original)


@settings(max_examples=2 * EXAMPLES)
@given(rnd=st.randoms())
def test_read_manifest(engine_copy, rnd):
    with damaged_manifest(engine_copy, rnd):
        raise_unless_accepted(*outcome(lambda: read_manifest(engine_copy)), "read_manifest")


@settings(max_examples=LOADS)
@given(rnd=st.randoms())
def test_pipeline_load(engine_copy, tmp_path, rnd):
    with damaged_manifest(engine_copy, rnd) as mutation, OpenedFiles() as opened:
        raise_unless_accepted(*outcome(lambda: Pipeline.load(engine_copy, backend=BACKEND)), "Pipeline.load")
    outside = escaped(opened, engine_copy, tmp_path)
    assert not outside, f"after `{mutation}`, Pipeline.load opened {outside}, outside the engine folder"


@settings(max_examples=EXAMPLES)
@given(rnd=st.randoms(), command=st.sampled_from([("info",), ("info", "--json"), ("adapter", "list")]))
def test_cli_reads(engine_copy, rnd, command):
    with damaged_manifest(engine_copy, rnd):
        result = CliRunner().invoke(cli, [*command, str(engine_copy)])
    raise_unless_accepted(*cli_outcome(result), f"lcmrt {' '.join(command)}: {result.output[-2000:]}")


# --- file names leading out of the folder ------------------------------------------------------------------
def loaded_names(doc: dict) -> list[str]:
    """The files and folders Pipeline.load reads from a refittable folder on the CPU with its default adapters:
    the tokenizer, each runtime component's graph variant (refit-inputs, else ort-cpu, else fp32) with its data
    files, the adapter packs and the refit map's data files."""
    names = {doc["tokenizer"]["path"]}
    for name in ("text_encoder", "unet", "vae_decoder"):
        component = doc["components"][name]
        variants = component.get("variants", {})
        graph = next((variants[v] for v in ("refit-inputs", "ort-cpu") if v in variants), component)
        names |= set(graph["sha256"])
    names |= {a["pack"] for a in doc.get("adapters", []) if a.get("pack")}
    names |= {e["file"] for e in doc.get("refit_map", {}).values() if e.get("file")}
    return sorted(names)


def relocate(doc, name: str, new: str):
    """`doc` with every file reference to `name`, or to a file under it, renamed to `new` (values of FILE_KEYS
    and keys of sha256 maps)."""
    def renamed(text: str) -> str:
        return new + text[len(name):] if text == name or text.startswith(name + "/") else text

    if isinstance(doc, list):
        return [relocate(v, name, new) for v in doc]
    if not isinstance(doc, dict):
        return doc
    return {key: (renamed(value) if key in FILE_KEYS and isinstance(value, str)
                  else {renamed(k): v for k, v in value.items()} if key == "sha256" and isinstance(value, dict)
                  else relocate(value, name, new))
            for key, value in doc.items()}


@settings(max_examples=LOADS)
@given(data=st.data(), how=st.sampled_from(["absolute", "relative", "symlink"]))
def test_load_reads_nothing_outside(tiny_refit_engine, tmp_path, data, how):
    """A file of the folder moved outside it, and named there by an absolute path, a ../ path, or a symlink left
    in its place: Pipeline.load refuses the folder (an LcmrtError) without opening the moved file, even though
    it holds the right bytes."""
    folder = Path(shutil.copytree(tiny_refit_engine, tmp_path / "engine", dirs_exist_ok=True))
    outside = tmp_path / "outside"
    try:
        doc = json.loads((folder / MANIFEST_NAME).read_text())
        names = loaded_names(doc) if how == "symlink" else sorted(
            {n for n in map(lambda p: _name_at(doc, p), file_references(doc))
             if not os.path.isabs(n) and (folder / n).exists()})
        name = data.draw(st.sampled_from(names), label="file")
        moved = outside / name
        moved.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(folder / name, moved)
        if how == "symlink":
            (folder / name).symlink_to(moved, target_is_directory=moved.is_dir())
        else:
            new = str(moved) if how == "absolute" else os.path.relpath(moved, folder)
            (folder / MANIFEST_NAME).write_bytes(dumps(relocate(doc, name, new)))
        with OpenedFiles() as opened:
            with pytest.raises(LcmrtError):
                Pipeline.load(folder, backend=BACKEND)
        assert not escaped(opened, folder, tmp_path), f"Pipeline.load opened {escaped(opened, folder, tmp_path)}"
    finally:
        shutil.rmtree(folder)
        shutil.rmtree(outside, ignore_errors=True)


def _name_at(doc, path: tuple) -> str:
    """The file name at a path from file_references: a value, or a sha256 map's key."""
    if path[-1] == "<key>":
        return path[-2]
    for key in path:
        doc = doc[key]
    return doc
