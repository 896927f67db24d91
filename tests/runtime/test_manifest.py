"""lcmrt/manifest.py: the engine folder's contract, read and checked in one place."""
import copy
import json
import random
import shutil

import pytest

from lcmrt.errors import EngineFolderError
from lcmrt.manifest import (MANIFEST_NAME, Manifest, RefitEntry, Shapes, read_manifest, write_manifest)

MUTATIONS = 400
_ODD_VALUES = (None, True, False, 0, -1, 1.5, float("inf"), "", "x", "../outside", "/abs", [], [1], {}, {"a": 1})


def _paths(node, path=()):
    """Every (container path, key) in a JSON document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path, key
        yield from _paths(child, (*path, key))


def _mutate(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    path, key = rng.choice(list(_paths(doc)))
    parent = doc
    for p in path:
        parent = parent[p]
    if rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = copy.deepcopy(rng.choice(_ODD_VALUES))
    return doc


@pytest.fixture(scope="module")
def refit_manifest(tiny_refit_engine) -> dict:
    return json.loads((tiny_refit_engine / MANIFEST_NAME).read_text())


def test_reader_types_the_parts(tiny_refit_engine, refit_manifest):
    m = read_manifest(tiny_refit_engine)
    assert m.data == refit_manifest  # the typed view leaves the JSON as it is
    assert m.shapes == Shapes(batch=1, height=128, width=128, latent_channels=4, latent_height=16, latent_width=16,
                              text_length=77, unet_batch_sizes=(1, 2), sizes=((128, 128),))
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    unet = m.components["unet"]
    assert (unet.file, unet.precision) == ("unet.onnx", "fp32") and unet.graph("fp16") is unet.graph_fp32
    assert [(a.name, a.fused) for a in m.adapters] == [("lcm", True), ("style", False)]
    style = m.adapters[1]
    assert style.pack == "adapters/style.safetensors" and set(style.targets) <= set(m.refit_map)
    module, raw = next(iter(refit_manifest["refit_map"].items()))
    entry = m.refit_map[module]
    assert isinstance(entry, RefitEntry) and (entry.component, entry.weight, entry.transpose) == (
        raw["component"], raw["weight"], raw["transpose"]) and list(entry.shape) == raw["shape"]
    assert m.engines == ()


def test_writer_keeps_the_json(tiny_refit_engine, refit_manifest, tmp_path):
    write_manifest(tmp_path, read_manifest(tiny_refit_engine))
    assert (tmp_path / MANIFEST_NAME).read_text() == (tiny_refit_engine / MANIFEST_NAME).read_text()


@pytest.mark.parametrize("bad, key", [
    ({"unet.conv_in": ["unet", "w"]}, "refit_map.unet.conv_in"),
    ({"unet.conv_in": {"component": "unet", "transpose": False}}, "refit_map.unet.conv_in"),
    ({"unet.conv_in": {"component": "controlnet", "weight": "w", "transpose": False}}, "refit_map.unet.conv_in.component"),
    (["unet.conv_in"], "refit_map"),
])
def test_a_refit_map_of_the_wrong_shape_is_rejected_on_read(tiny_refit_engine, refit_manifest, tmp_path, bad, key):
    shutil.copy(tiny_refit_engine / MANIFEST_NAME, tmp_path / MANIFEST_NAME)
    doc = {**refit_manifest, "refit_map": bad}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(EngineFolderError, match=rf"{key}\b.*lcmrt build .*--refittable.*lcmrt adapter add"):
        read_manifest(tmp_path)


def test_random_mutations_give_only_engine_folder_errors(refit_manifest, tmp_path):
    rng = random.Random(0)
    outcomes = {"accepted": 0, "rejected": 0}
    for _ in range(MUTATIONS):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(_mutate(refit_manifest, rng)))
        try:
            m = read_manifest(tmp_path)
            for c in m.components.values():  # what the runtime reads after the load
                assert c.graph("fp16").file and isinstance(c.graph("ort-cpu").key, (dict, type(None)))
            outcomes["accepted"] += 1
        except EngineFolderError:
            outcomes["rejected"] += 1
    print(outcomes)
    # both happen: informational keys (versions, model config) may change, most others are checked
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > MUTATIONS // 2


def test_a_dict_is_wrapped_as_is():
    data = {"components": {}}
    assert Manifest.of(data).data is data and Manifest.of(Manifest(data)).data is data
    with pytest.raises(EngineFolderError, match="no 'unet' component.*lcmrt build"):
        Manifest(data).component("unet")


def test_sizes(refit_manifest):
    shapes = dict(refit_manifest["shapes"])
    legacy = {k: v for k, v in shapes.items() if k != "sizes"}  # folders from before several sizes: their one
    assert Manifest({"shapes": legacy}).shapes.sizes == ((128, 128),)
    several = Manifest({"shapes": {**shapes, "sizes": [[128, 128], [96, 160]]}}).shapes
    assert several.sizes == ((128, 128), (96, 160)) and several.size_names == "128x128, 160x96"
    at = several.at(96, 160)
    assert (at.height, at.width, at.latent_height, at.latent_width) == (96, 160, 12, 20) and at.sizes == several.sizes


@pytest.mark.parametrize("sizes, problem", [
    ([[96, 160]], "the first \\[128, 128\\]"),  # the first size is the default height x width
    ([[128, 128], [128, 128]], "different"),
    ([], "1 to 16"),
    ([[128, 128]] + [[8 * i, 8] for i in range(1, 17)], "1 to 16"),
    ([[128, 128], [100, 128]], "height 100, not a multiple of 8"),
    ([[128, 128], [128, 8200]], "width 8200"),
    ([[128, 128], [128]], "expected \\[height, width\\]"),
    ([[128, 128], ["a", 8]], "expected \\[height, width\\]"),
    ([[128, 128], [True, 8]], "expected \\[height, width\\]"),
    ("128x128", "expected a list"),
])
def test_bad_sizes_are_refused(refit_manifest, sizes, problem):
    doc = {"shapes": {**refit_manifest["shapes"], "sizes": sizes}}
    with pytest.raises(EngineFolderError, match=rf"shapes\.sizes.*{problem}.*lcmrt build"):
        Manifest(doc).shapes
