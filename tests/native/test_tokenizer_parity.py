"""The native CLIP tokenizer (lcmrt/csrc/src/tokenizer.cpp, through `lcmrt-probe tokenize`) against the Python
runtime's (lcmrt.tokenizer.PromptTokenizer, the `tokenizers` library): the same ids and the same count of dropped
tokens for every prompt, on the tiny engine's tokenizer.json and on one trained here with a bigger vocabulary."""
import json
import re
import subprocess
import unicodedata
import warnings

import pytest

from lcmrt.tokenizer import PromptTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NFD_CAFE = unicodedata.normalize("NFD", "café crème brûlée")
CORPUS = [
    "",
    "a photo of a cat",
    "A Photo Of An Astronaut Riding A HORSE on the MOON",
    "masterpiece, best quality, (ultra-detailed:1.2), [sharp focus], 8k uhd!!! --ar 16:9",
    "it's I'M you'll we'd they've she'S can't Won'T ''s 'd' '' 'x",
    "o'clock rock'n'roll 'tis y'all",
    "1 12 123 1234567890 3.14159 -42 1e10 ½ ² ٣ 〇 Ⅻ",
    "café crème brûlée",
    NFD_CAFE,
    "Straße STRASSE ẞ",
    "İstanbul IŞIK ıi",
    "ΟΔΟΣ ΣΑΣ σοφός Σ ΣΣ",
    "猫の写真、東京の夜景。한국어 텍스트",
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "مرحبا بالعالم ١٢٣",
    "e\u0301 a\u0308\u0323 \u0301alone Å Å",
    "non\u00a0breaking\u3000ideographic\u2003em\u202fnarrow space",
    "tabs\tand\nnew\r\nlines\x0b\x0c\x85 end",
    "   leading and trailing   ",
    " \t\n ",
    f"{BOS}a cat{EOS}",
    f"before{EOS}after {BOS}{BOS} {EOS}",
    "<|STARTOFTEXT|> <|EndOfText|> <|startoftext|",
    "<|endoftext|>'s<|endoftext|>",
    "ﬁne ﬀ Kelvin K Ω ㎏ ①",
    "nul\x00byte and \x7f delete",
    "\ue000 private \U0010fffd use",
    ", ".join(["a beautiful landscape painting of mountains"] * 12),
    " ".join(str(i) for i in range(100)),
    "supercalifragilisticexpialidocious" * 20,
    "x" * 500,
    "!" * 300,
]
DROPPED = re.compile(r"(\d+) tokens were dropped")


def python_encode(tokenizer: PromptTokenizer, prompt: str) -> tuple[list[int], int]:
    """The Python runtime's ids, and how many tokens its truncation warning says it dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer(prompt)[0].tolist()
    dropped = [int(m.group(1)) for w in caught if (m := DROPPED.search(str(w.message)))]
    return ids, sum(dropped)


def native_encode(probe, tokenizer_json, max_length: int, pad_token_id: int, prompts: list[str]) -> list[tuple]:
    out = json.loads(probe("tokenize", tokenizer_json, max_length, pad_token_id, stdin=json.dumps(prompts).encode()))
    return [(r["ids"], r["dropped"]) for r in out]


def assert_same(probe, tokenizer_json, max_length: int, pad_token_id: int, prompts: list[str]) -> None:
    python = PromptTokenizer(tokenizer_json.parent, max_length=max_length, pad_token_id=pad_token_id)
    native = native_encode(probe, tokenizer_json, max_length, pad_token_id, prompts)
    assert len(native) == len(prompts)
    expected = [python_encode(python, p) for p in prompts]
    mismatches = [(p, e, n) for p, e, n in zip(prompts, expected, native) if e != n]
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} prompts differ; first: {mismatches[0]!r}"


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_engine):
    """(tokenizer.json, max_length, pad_token_id) of the tiny engine folder."""
    info = json.loads((tiny_engine / "manifest.json").read_text())["tokenizer"]
    return tiny_engine / info["path"] / "tokenizer.json", info["max_length"], info["pad_token_id"]


@pytest.fixture(scope="module")
def trained_tokenizer(tiny_tokenizer, tmp_path_factory):
    """The tiny engine's tokenizer.json with a vocabulary trained here on the corpus: multi-byte characters merged
    into tokens, specials at ids 0 and 1, and bytes the corpus lacks left out (they become the unknown token)."""
    from tokenizers import Tokenizer, models, trainers

    path, max_length, _ = tiny_tokenizer
    config = json.loads(path.read_text())
    base = Tokenizer.from_file(str(path))
    trained = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    trained.normalizer, trained.pre_tokenizer = base.normalizer, base.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                                  show_progress=False)
    trained.train_from_iterator([p for p in CORPUS if "x" * 10 not in p] * 3, trainer)
    model = json.loads(trained.to_str())["model"]
    config["model"].update(vocab=model["vocab"], merges=model["merges"])
    ids = {BOS: model["vocab"][BOS], EOS: model["vocab"][EOS]}
    for token in config["added_tokens"]:
        token["id"] = ids[token["content"]]
    config["post_processor"].update(cls=[BOS, ids[BOS]], sep=[EOS, ids[EOS]])
    out = tmp_path_factory.mktemp("trained-tokenizer") / "tokenizer.json"
    out.write_text(json.dumps(config, ensure_ascii=False))
    return out, max_length, ids[EOS]


@pytest.mark.parametrize("which", ["tiny_tokenizer", "trained_tokenizer"])
def test_corpus_matches_python(probe, request, which):
    assert_same(probe, *request.getfixturevalue(which), CORPUS)


def test_truncation_matches_python(probe, tiny_tokenizer):
    path, _, pad_token_id = tiny_tokenizer
    for max_length in (2, 3, 16):
        assert_same(probe, path, max_length, pad_token_id, CORPUS)


@pytest.mark.parametrize("which", ["tiny_tokenizer", "trained_tokenizer"])
def test_every_code_point_matches_python(probe, request, which):
    """Each code point that Python's Unicode data assigns, as "aCaCC": letters join the a's, numbers stand alone,
    punctuation runs, whitespace collapses. Characters newer than ICU's Unicode version differ (see
    tokenizer.cpp), so unassigned code points are left out, as are planes 15 and 16 (private use only)."""
    path, _, pad_token_id = request.getfixturevalue(which)
    chars = [chr(c) for c in range(0xF0000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    prompts = [" ".join(f"a{c}a{c}{c}" for c in chars[i:i + 60]) for i in range(0, len(chars), 60)]
    assert_same(probe, path, 1024, pad_token_id, prompts)


def run_probe(native_build, *args, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([str(native_build / "tests" / "native" / "lcmrt-probe"), *map(str, args)], input=stdin,
                          capture_output=True)


def test_missing_tokenizer_names_the_fix(native_build, tmp_path):
    result = run_probe(native_build, "tokenize", tmp_path / "tokenizer.json", 77, 0, stdin=b"[]")
    assert result.returncode == 1
    assert b"is missing" in result.stderr and b"lcmrt build" in result.stderr


def test_other_tokenizer_configurations_are_refused(native_build, tiny_tokenizer, tmp_path):
    path, max_length, pad_token_id = tiny_tokenizer
    config = json.loads(path.read_text())
    config["normalizer"]["normalizers"].pop()  # no Lowercase
    changed = tmp_path / "tokenizer.json"
    changed.write_text(json.dumps(config))
    result = run_probe(native_build, "tokenize", changed, max_length, pad_token_id, stdin=b"[]")
    assert result.returncode == 1
    assert b"normalizer" in result.stderr and b"lcmrt build" in result.stderr
