"""Tokenizers: `bpe`, a byte-level BPE learned from the training split (offline, Hugging Face `tokenizers`),
and `file`, an existing tokenizer.json.

`bpe` is cached by content: the same training texts and config map to the same
`<cache_dir>/tokenizers/bpe-<hash>/tokenizer.json`, so it is never trained twice.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, PositiveInt

from hyloom.data import EOS_TOKEN, MASK_TOKEN, DataError, HFTokenizer, file_fingerprint, stable_hash, texts_hash


class BPEConfig(BaseModel):
    vocab_size: int = Field(4096, ge=260, description="tokens including the 256 bytes and the special tokens; "
                            "at most model.vocab_size (a small corpus may yield fewer)")
    min_frequency: PositiveInt = Field(2, description="merge only pairs seen at least this often")
    extra_special_tokens: list[str] = Field([], description="more special tokens, after <|endoftext|> and <|mask|>")


def _train(texts: list[str], cfg: BPEConfig, special: list[str], progress: bool):
    """A byte-level BPE: text is split GPT-2 style and every byte has a token, so any string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


class BPETrainer:
    """What `bpe` builds: it becomes a tokenizer once `train` has seen the training texts."""

    def __init__(self, cfg: BPEConfig):
        self.cfg = cfg
        reserved = [EOS_TOKEN, MASK_TOKEN]
        self.special = reserved + [t for t in cfg.extra_special_tokens if t not in reserved]

    def cache_path(self, texts: list[str], cache_dir: str | Path) -> Path:
        key = stable_hash({"config": self.cfg.model_dump(mode="json"), "texts": texts_hash(texts)})[:16]
        return Path(cache_dir).expanduser() / f"bpe-{key}" / "tokenizer.json"

    def train(self, texts: list[str], *, cache_dir: str | Path, progress: bool = False) -> HFTokenizer:
        path = self.cache_path(texts, cache_dir)
        if path.is_file():
            return HFTokenizer.load(path)
        if not texts:
            raise DataError("bpe: no training documents to learn a vocabulary from")
        tokenizer = HFTokenizer(_train(texts, self.cfg, self.special, progress))
        tokenizer.save(path)  # atomic: a reader never sees half a file
        return tokenizer


class FileTokenizerConfig(BaseModel):
    path: str = Field(description="a Hugging Face tokenizer.json (or a folder holding one)")
    eos_token: str = Field(EOS_TOKEN, description="the token put between documents")
    mask_token: str | None = Field(MASK_TOKEN, description="the mask token, if the vocabulary has one")


class FileTokenizer(HFTokenizer):
    def __init__(self, cfg: FileTokenizerConfig):
        loaded = HFTokenizer.load(cfg.path, eos_token=cfg.eos_token, mask_token=cfg.mask_token)
        super().__init__(loaded.hf, eos_token=cfg.eos_token, mask_token=cfg.mask_token)
        path = Path(cfg.path).expanduser()
        self.path = path / "tokenizer.json" if path.is_dir() else path

    def fingerprint(self):
        return file_fingerprint([self.path])
