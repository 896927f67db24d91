"""A damaged adapter pack (`adapters/style.safetensors` of tiny_refit_engine) against its readers
(lcmrt/adapters.py and its users): `AdapterBank.pack` and the weights computed from it, `Pipeline.load` with the
adapter active and `Pipeline.set_adapters` switching to it return or raise an LcmrtError, whatever the
damage: bit flips, truncation, random bytes, valid files with missing or extra keys, wrong shapes or dtypes,
NaN values, rank 0 (tests/fuzz/mutations.py). Where the manifest records the pack's hash, the test records
the damaged pack's, as a tool rewriting both would: the reader has to cope with the bytes themselves."""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, note, settings
from hypothesis import strategies as st

from fuzz.mutations import dumps, pack_mutation
from fuzz.outcomes import outcome, raise_unless_accepted
from lcmrt.adapters import AdapterBank
from lcmrt.manifest import MANIFEST_NAME, read_manifest
from lcmrt.pipeline import Pipeline

EXAMPLES = settings().max_examples  # the profile's (100 under "ci")
LOADS = max(8, EXAMPLES // 10)  # two Pipeline.loads per example, ~0.3 s each
BACKEND = "onnxruntime-cpu"


@contextmanager
def damaged_pack(folder: Path, rnd):
    """The folder with its refittable adapter's pack randomly mutated (restored afterwards); yields the
    adapter's name."""
    manifest_path = folder / MANIFEST_NAME
    manifest = manifest_path.read_bytes()
    doc = json.loads(manifest)
    record = next(a for a in doc["adapters"] if not a["fused"])
    pack = folder / record["pack"]
    original = pack.read_bytes()
    mutation = pack_mutation(original, rnd)
    note(f"pack mutation: {mutation}")
    pack.write_bytes(mutation.data)
    if "pack_sha256" in record:
        record["pack_sha256"] = hashlib.sha256(mutation.data).hexdigest()
        manifest_path.write_bytes(dumps(doc))
    try:
        yield record["name"]
    finally:
        pack.write_bytes(original)
        manifest_path.write_bytes(manifest)


@settings(max_examples=EXAMPLES)
@given(rnd=st.randoms())
def test_adapter_bank(refit_copy, rnd):
    with damaged_pack(refit_copy, rnd) as name:
        def read():
            bank = AdapterBank(refit_copy, read_manifest(refit_copy))
            bank.pack(name)
            bank.weights_for({}, {name: 0.8})

        raise_unless_accepted(*outcome(read), "AdapterBank")


@settings(max_examples=LOADS)
@given(rnd=st.randoms(), weight=st.sampled_from([0.5, 1.0, -2.0]))
def test_pipeline_adapters(refit_copy, rnd, weight):
    with damaged_pack(refit_copy, rnd) as name:
        # active from the start: the pack is read while loading
        raise_unless_accepted(*outcome(lambda: Pipeline.load(refit_copy, backend=BACKEND)), "Pipeline.load")

        # switched on later, then used and switched off again
        def switch():
            pipe = Pipeline.load(refit_copy, backend=BACKEND, adapters={name: 0.0})
            pipe.set_adapters({name: weight})
            pipe("a fox", num_inference_steps=1, seed=0, output="latent")
            pipe.set_adapters({})

        raise_unless_accepted(*outcome(switch), "Pipeline.set_adapters")
