"""A damaged LoRA file against the build stage's LoRA reader (export/lora.py) and its two users: reading and
grouping the file (`read_lora_file`, `group_modules`), `lcmrt adapter add` (export/adapters.py, which locates
the LoRA's modules on the folder's architecture) and the fuse of `lcmrt build --lora` (`fuse_loras`). Each
returns or raises an LcmrtError (LoraError, InputError, ...), whatever the damage to the tiny model's style
LoRA (peft keys) or LCM-LoRA (kohya keys, fp16): keys renamed into other formats or to nothing known, wrong
shapes, rank 0, alpha missing, NaN or negative, integer dtypes, an empty file, a broken header, adapter
metadata that is not a config (tests/fuzz/mutations.py)."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, note, settings
from hypothesis import strategies as st

from fuzz.mutations import lora_mutation
from fuzz.outcomes import cli_outcome, outcome, raise_unless_accepted
from lcmrt.cli import cli
from lcmrt.export.lora import LoraSpec, fuse_loras, group_modules, read_lora_file

EXAMPLES = settings().max_examples  # the profile's (100 under "ci")
SLOW = max(8, EXAMPLES // 10)  # adapter add and a fuse take ~0.3-0.7 s on the tiny model
ROLES = {"style_lora": "style", "lcm_lora": "lcm"}


def damaged_lora(tiny_model, source: str, rnd, out: Path) -> Path:
    mutation = lora_mutation(Path(tiny_model[source]).read_bytes(), rnd)
    note(f"{source} mutation: {mutation}")
    out.write_bytes(mutation.data)
    return out


@settings(max_examples=2 * EXAMPLES)
@given(rnd=st.randoms(), source=st.sampled_from(sorted(ROLES)))
def test_read_lora_file(tiny_model, tmp_path, rnd, source):
    path = damaged_lora(tiny_model, source, rnd, tmp_path / "lora.safetensors")

    def read():
        sd, metadata = read_lora_file(path)
        group_modules(path, sd, metadata)

    raise_unless_accepted(*outcome(read), "read_lora_file")


@settings(max_examples=SLOW)
@given(rnd=st.randoms(), source=st.sampled_from(sorted(ROLES)))
def test_adapter_add(tiny_model, tiny_refit_engine, tmp_path, rnd, source):
    path = damaged_lora(tiny_model, source, rnd, tmp_path / "lora.safetensors")
    folder = shutil.copytree(tiny_refit_engine, tmp_path / "engine", dirs_exist_ok=True)
    try:
        result = CliRunner().invoke(cli, ["adapter", "add", str(folder), str(path), "--name", "fuzzed"])
        raise_unless_accepted(*cli_outcome(result), f"lcmrt adapter add: {result.output[-2000:]}")
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    """The tiny model as the build stage loads it (fp32 StableDiffusionPipeline); tests fuse into copies."""
    from lcmrt.export.loading import load_model

    return load_model(str(tiny_model["model"])).pipe


@settings(max_examples=SLOW)
@given(rnd=st.randoms(), source=st.sampled_from(sorted(ROLES)))
def test_fuse_loras(tiny_model, tiny_pipe, tmp_path, rnd, source):
    path = damaged_lora(tiny_model, source, rnd, tmp_path / "lora.safetensors")
    spec = LoraSpec(path, weight=0.8, name=ROLES[source], role=ROLES[source])
    raise_unless_accepted(*outcome(lambda: fuse_loras(copy.deepcopy(tiny_pipe), [spec])), "fuse_loras")
