"""The tokenizer object the rest of hyloom uses, and how prepare gets a ready one from a `tokenizer` component.

A registered tokenizer's `build(config)` returns either a ready tokenizer (`encode`, `decode`, `vocab_size`,
`eos_id`, `save`) or a *trainer*: an object with `train(texts, cache_dir=..., progress=...)` returning one
(e.g. `bpe`, which learns its merges from the training split). Prepared folders and checkpoints keep the
tokenizer as a Hugging Face `tokenizer.json`, which `HFTokenizer.load` reads back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from hyloom.data.documents import DataError

EOS_TOKEN = "<|endoftext|>"  # separates documents in the token stream
MASK_TOKEN = "<|mask|>"  # reserved for masked-diffusion objectives


class HFTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with the ids hyloom needs by name."""

    def __init__(self, tokenizer, *, eos_token: str = EOS_TOKEN, mask_token: str | None = MASK_TOKEN):
        self.hf = tokenizer
        self.eos_token, self.mask_token = eos_token, mask_token
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"the tokenizer has no {eos_token!r} token; set eos_token to its end-of-text token")
        self.eos_id: int = eos_id
        self.mask_id: int | None = tokenizer.token_to_id(mask_token) if mask_token else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens stay in the text: decode(encode(x)) == x even when x contains "<|endoftext|>".
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (into `path` if it is a folder or has no .json suffix); atomic."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.hf.save(str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, eos_token: str = EOS_TOKEN, mask_token: str | None = MASK_TOKEN):
        from tokenizers import Tokenizer

        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"{path} is not a Hugging Face tokenizer.json: {exc}") from None
        return cls(hf, eos_token=eos_token, mask_token=mask_token)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, mask_id={self.mask_id})"


def ready_tokenizer(built, train_texts, *, cache_dir: Path, progress: bool = False):
    """A tokenizer component's built object, trained on `train_texts()` first if it is a trainer."""
    if hasattr(built, "train"):
        return built.train(train_texts(), cache_dir=cache_dir, progress=progress)
    return built
