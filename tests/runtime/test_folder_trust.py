"""The engine folder is the trust boundary: every file the runtime reads is a plain name inside the folder
(symlinks included) with a hash in the manifest, checked before it is used."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lcmrt.errors import AdapterError, EngineFolderError
from lcmrt.manifest import MANIFEST_NAME, read_manifest
from lcmrt.pipeline import Pipeline

PROMPT = "a fox"


@pytest.fixture
def folder(tiny_refit_engine, tmp_path):
    """A copy of the refittable tiny folder, free to damage."""
    return shutil.copytree(tiny_refit_engine, tmp_path / "engine")


def _edit(folder, change):
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _image(pipe):
    return pipe(PROMPT, seed=0, num_inference_steps=2, output="np")


@pytest.mark.parametrize("where", [
    lambda d: d["components"]["unet"].__setitem__("file", "../unet.onnx"),
    lambda d: d["components"]["unet"]["sha256"].__setitem__("/etc/passwd", "0" * 64),
    lambda d: d["tokenizer"].__setitem__("path", "/tmp"),
    lambda d: d["adapters"][1].__setitem__("pack", "adapters/../../style.safetensors"),
    lambda d: d["adapters"][1].__setitem__("pack", "./adapters/style.safetensors"),
    lambda d: next(iter(d["refit_map"].values())).__setitem__("file", "C:\\weights.bin"),
], ids=["component", "hashed-file", "tokenizer", "pack-dotdot", "pack-dot", "refit-backslash"])
def test_a_path_leaving_the_folder_is_refused(folder, where):
    _edit(folder, where)
    with pytest.raises(EngineFolderError, match="not a plain file name inside the engine folder"):
        read_manifest(folder)


def test_a_symlink_out_of_the_folder_is_refused_even_to_identical_bytes(folder, tmp_path):
    outside = tmp_path / "elsewhere.json"
    tokenizer = folder / "tokenizer" / "tokenizer.json"
    shutil.copy(tokenizer, outside)
    tokenizer.unlink()
    os.symlink(outside, tokenizer)
    with pytest.raises(EngineFolderError, match="outside the engine folder"):
        Pipeline.load(folder)


def test_a_symlink_inside_the_folder_is_followed(folder):
    tokenizer = folder / "tokenizer" / "tokenizer.json"
    os.replace(tokenizer, folder / "tokenizer" / "real.json")
    os.symlink("real.json", tokenizer)
    assert Pipeline.load(folder).tokenizer(PROMPT).shape == (1, 77)


def test_a_changed_tokenizer_is_refused(folder):
    """A shuffled vocabulary tokenizes every prompt into other ids: a different image with exit 0."""
    path = folder / "tokenizer" / "tokenizer.json"
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    names, ids = list(vocab), list(vocab.values())
    doc["model"]["vocab"] = dict(zip(names, ids[1:] + ids[:1]))
    path.write_text(json.dumps(doc))
    with pytest.raises(EngineFolderError, match="tokenizer.json does not match the hash"):
        Pipeline.load(folder)


@pytest.mark.parametrize("drop", [
    lambda d: d["tokenizer"].pop("sha256"),
    lambda d: d["tokenizer"].__setitem__("sha256", {}),
    lambda d: d["adapters"][1].pop("pack_sha256"),
    lambda d: d["components"]["vae_decoder"].__setitem__("sha256", {}),
    lambda d: d["components"]["unet"]["sha256"].__setitem__("unet.onnx", ""),
], ids=["tokenizer", "tokenizer-empty", "pack", "graph-empty", "graph-digest-empty"])
def test_a_manifest_without_a_files_hash_is_refused(folder, drop):
    _edit(folder, drop)
    with pytest.raises(EngineFolderError, match="sha256|hash"):
        read_manifest(folder)


def test_external_data_the_manifest_does_not_hash_is_refused(folder):
    """The graph names its weight file; a manifest that lists only the graph must not let it load unchecked."""
    _edit(folder, lambda d: d["components"]["unet"]["variants"]["refit-inputs"]["sha256"].pop("unet.onnx.data"))
    with pytest.raises(EngineFolderError, match="unet.onnx.data, which the manifest does not list"):
        Pipeline.load(folder, adapters={})


def test_a_flipped_bit_in_a_pack_is_refused_not_a_different_image(folder):
    """The pack stays valid safetensors: before packs were hashed this gave another image with exit 0."""
    pack = folder / "adapters" / "style.safetensors"
    tensors = load_file(pack)
    name = sorted(k for k in tensors if k.endswith(".up"))[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.float32(1e3)
    save_file(tensors, pack, metadata={"format": "lcmrt-adapter/1"})
    with pytest.raises(AdapterError, match="style.*does not match the hash"):
        Pipeline.load(folder)


def test_a_refit_map_pointing_at_another_file_is_refused(folder):
    """Bytes of any file (here the tokenizer) would otherwise become UNet weights."""
    def point_at_tokenizer(d):
        for entry in d["refit_map"].values():
            entry["file"] = "tokenizer/tokenizer.json"
    _edit(folder, point_at_tokenizer)
    with pytest.raises(EngineFolderError, match="not a file of the .* graph"):
        read_manifest(folder)


def test_a_refit_location_past_the_end_of_its_file_is_refused(folder):
    def far(d):
        for entry in d["refit_map"].values():
            entry["offset"] += 1 << 40
    _edit(folder, far)
    with pytest.raises(EngineFolderError, match="past the end"):
        Pipeline.load(folder)


@pytest.mark.parametrize("shapes, key", [
    ({"latent_height": 10 ** 9}, "shapes.latent_height"),
    ({"batch": 0}, "shapes.batch"),
    ({"height": 100}, "shapes"),
    ({"unet_batch_sizes": [1, 7]}, "shapes.unet_batch_sizes"),
])
def test_absurd_shapes_are_refused_naming_the_key(folder, shapes, key):
    _edit(folder, lambda d: d["shapes"].update(shapes))
    with pytest.raises(EngineFolderError, match=key.replace(".", r"\.")):
        read_manifest(folder)


@pytest.mark.parametrize("text, problem", [
    ('{"format_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
    ('{"format_version": 1, "x": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"format_version": 1, "x": "\\ud800"}', "not valid Unicode"),
], ids=["nested-deeper-than-python-recurses", "integer-too-long-to-read", "lone-surrogate"])
def test_a_manifest_python_cannot_read_is_a_folder_error(folder, text, problem):
    (folder / MANIFEST_NAME).write_text(text)
    with pytest.raises(EngineFolderError, match=problem):
        read_manifest(folder)


def test_a_number_too_large_for_a_float_is_refused(folder):
    _edit(folder, lambda d: d["vae"].__setitem__("scaling_factor", 10 ** 400))
    with pytest.raises(EngineFolderError, match=r"vae\.scaling_factor .*a finite number"):
        read_manifest(folder)


def test_a_file_name_no_file_system_holds_is_refused(folder):
    _edit(folder, lambda d: d["adapters"][1].__setitem__("pack", "adapters/" + "x" * 300 + ".safetensors"))
    with pytest.raises(EngineFolderError, match="not a plain file name inside the engine folder"):
        read_manifest(folder)


@pytest.mark.parametrize("damage", [
    lambda d: d.__setitem__("build", "yesterday"),
    lambda d: d.__setitem__("source", ["a", "list"]),
    lambda d: d["adapters"][1].__setitem__("modules", "all"),
    lambda d: d["adapters"][1].__setitem__("ranks", {"unet": 4}),
    lambda d: d["components"]["unet"].__setitem__("validation", 3),
], ids=["build", "source", "modules", "ranks", "validation"])
def test_info_and_adapter_list_show_informational_fields_of_any_type(folder, damage):
    from click.testing import CliRunner

    from lcmrt.cli import cli

    _edit(folder, damage)
    for command in (["info", str(folder)], ["adapter", "list", str(folder)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
        assert "style" in result.output


def test_an_intact_folder_still_loads_and_runs(folder, tiny_refit_engine):
    assert np.array_equal(_image(Pipeline.load(folder)), _image(Pipeline.load(tiny_refit_engine)))
