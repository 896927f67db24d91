"""lcmrt.tokenizer: prompt ids equal to what diffusers' StableDiffusionPipeline feeds its text encoder."""
import warnings

import numpy as np
import pytest

from lcmrt.errors import EngineFolderError
from lcmrt.tokenizer import PromptTokenizer

LONG = ", ".join(["a highly detailed painting of a castle on a hill at sunset"] * 12)
PROMPTS = [
    "",
    "cat",
    "a photo of a cat",
    "A Photo   of a CAT\n\twith\u00a0tabs",
    "Café crème brûlée, naïve façade",
    "日本の城、桜 🌸 and 😺!",
    "(masterpiece:1.2), [blurry], <lora:foo:0.8>, 4k!!! ... don't won't it's",
    "numbers 12345 67.89 and symbols #@$%^&*",
    "x" * 300,
    LONG,
]


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model["model"] / "tokenizer"


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder, reference):
    return PromptTokenizer(folder, max_length=77, pad_token_id=reference.pad_token_id)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_diffusers_tokenization(tokenizer, reference, prompt):
    expected = reference(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    untruncated = len(reference(prompt).input_ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer(prompt)
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids, expected)
    assert ids[0, 0] == reference.bos_token_id
    assert reference.eos_token_id in ids[0]
    if untruncated > 77:
        assert len(caught) == 1
        assert f"{untruncated - 77} tokens were dropped" in str(caught[0].message)
        assert ids[0, -1] == reference.eos_token_id
    else:
        assert not caught, [str(w.message) for w in caught]


def test_long_prompts_are_exercised(reference):
    assert len(reference(LONG).input_ids) > 77
    assert len(reference("x" * 300).input_ids) > 77
    assert len(reference("").input_ids) == 2


def test_warning_names_the_dropped_text(tokenizer, reference):
    # "a" is one token (every byte is), so bos + 75 x "a" fills all but the eos slot: the rest is dropped
    dropped = len(reference("dog horse").input_ids) - 2
    prompt = "a " * 75 + "dog horse"
    with pytest.warns(UserWarning, match=rf"{77 + dropped} tokens long .* {dropped} tokens were dropped .*'dog horse'"):
        ids = tokenizer(prompt)
    assert ids[0, 1:76].tolist() == [reference.convert_tokens_to_ids("a</w>")] * 75


def test_other_length_and_pad(folder, reference):
    tok = PromptTokenizer(folder, max_length=10, pad_token_id=0)
    ids = tok("cat")
    n = len(reference("cat").input_ids)
    assert ids[0, :n].tolist() == reference("cat").input_ids
    assert ids[0, n:].tolist() == [0] * (10 - n)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(EngineFolderError, match="tokenizer.json is missing"):
        PromptTokenizer(tmp_path, max_length=77, pad_token_id=0)


def test_runtime_tokenizer_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, lcmrt.tokenizer; sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
