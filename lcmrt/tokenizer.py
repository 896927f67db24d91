"""CLIP prompt tokenization for the runtime, with the `tokenizers` library alone (no transformers, no torch).

Encodes a prompt the way diffusers' StableDiffusionPipeline does before the text encoder:
`tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`, i.e. bos + tokens + eos, cut to
`max_length` keeping eos last, then right-padded with the pad id. The engine folder's `tokenizer/` holds
the `tokenizer.json` the build stage saved, and its manifest records `max_length` and the pad id.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import EngineFolderError
from .manifest import REBUILD, TOKENIZER_FILE, TokenizerInfo, folder_file, verify_files

END_OF_WORD = "</w>"


class PromptTokenizer:
    def __init__(self, folder: str | Path, max_length: int, pad_token_id: int):
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise EngineFolderError(
                f"{path} is missing: the engine folder's tokenizer was not written. "
                "Rebuild the folder with `lcmrt build`.")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception on a malformed file
            raise EngineFolderError(f"{path} is not a tokenizer file ({e}). {REBUILD}") from None
        # transformers saves whatever padding/truncation its last call left on the backend; we do both here.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    @classmethod
    def from_folder(cls, folder: str | Path, info: TokenizerInfo) -> "PromptTokenizer":
        """One of the engine folder's tokenizers (`Manifest.tokenizers`), after checking its file's hash."""
        verify_files(folder, {info.file: info.sha256})
        return cls(folder_file(folder, info.path), max_length=info.max_length, pad_token_id=info.pad_token_id)

    def __call__(self, prompt: str) -> np.ndarray:
        """Input ids for one prompt. ids: [1, max_length] int64."""
        ids = self._tokenizer.encode(prompt).ids  # bos, tokens..., eos
        if len(ids) > self.max_length:
            dropped = ids[self.max_length - 1:-1]
            warnings.warn(
                f"The prompt is {len(ids)} tokens long but the text encoder takes {self.max_length}: "
                f"{len(dropped)} tokens were dropped from its end: {self._decode(dropped)!r}", stacklevel=2)
            # Keep the eos: the text encoder pools at it.
            ids = ids[: self.max_length - 1] + ids[-1:]
        ids = ids + [self.pad_token_id] * (self.max_length - len(ids))
        return np.array([ids], dtype=np.int64)

    def _decode(self, ids: list[int]) -> str:
        # CLIP marks word ends with "</w>" inside tokens; the byte-level decoder leaves it in.
        return self._tokenizer.decode(ids).replace(END_OF_WORD, " ").strip()
