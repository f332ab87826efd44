"""The data pipeline: documents from a source, tier steps from L0 to L1, a tokenizer, packed token shards and
the loader that streams them. The components (sources, tier steps, tokenizers) are plugins; this package holds
the contracts and the machinery. See docs/data.md."""

from hyloom.data.documents import DataError, document, file_fingerprint, files_under, stable_hash, texts_hash
from hyloom.data.pipeline import Prepared, data_spec, load_prepared, prepare, prepared_path
from hyloom.data.tiers import Judge, reason_pattern, run_tiers
from hyloom.data.tokenizer import EOS_TOKEN, MASK_TOKEN, HFTokenizer


def __getattr__(name):
    # the loader yields torch tensors: imported on first use, so that registering the data plugin needs no torch
    if name == "TokenLoader":
        from hyloom.data.loader import TokenLoader

        return TokenLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "document", "files_under", "file_fingerprint", "stable_hash", "texts_hash", "TokenLoader",
           "Prepared", "prepare", "prepared_path", "load_prepared", "data_spec", "Judge", "run_tiers",
           "reason_pattern", "HFTokenizer", "EOS_TOKEN", "MASK_TOKEN"]
