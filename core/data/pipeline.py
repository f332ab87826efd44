"""`prepare`: source → tiers → train/eval split → tokenizer → packed shards, cached by what went in.

The result is a folder `<cache_dir>/data-<hash>` whose hash covers the source's fingerprint (its files' paths,
sizes and modification times), the source, tier and tokenizer configs, and the split (seed, eval_fraction).
Preparing the same inputs again finds the folder and does no work. The folder is built next to its final
place under a temporary name and renamed at the end, so a crash never leaves a half-written cache behind.

    data-<hash>/
      manifest.json        counts, shards, tokenizer, the spec used
      documents.jsonl      one record per source document: tier, which step dropped it and why, split
      tokenizer.json       the tokenizer (Hugging Face format)
      train-00000.bin ...  token shards (see hyloom.data.shards)
      eval-00000.bin ...
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, TypeAdapter
from tqdm import tqdm

from hyloom.data.documents import DataError, check_document, stable_hash, texts_hash
from hyloom.data.shards import ShardWriter, open_shards, token_counts, token_dtype, unigram_loss
from hyloom.data.tiers import run_tiers, step_names
from hyloom.data.tokenizer import HFTokenizer, ready_tokenizer

FORMAT = 1  # bump when the folder layout changes, so old caches are not misread
ENCODE_CHUNK = 256  # documents per encode_batch call: large enough for the Rust threads, small for the bar


@dataclass
class Prepared:
    dir: Path
    manifest: dict
    tokenizer: HFTokenizer
    unigram_loss: float  # nats/token of the eval split under the train split's unigram distribution

    def loader(self, split: str = "train", **kwargs):
        from hyloom.data.loader import TokenLoader

        kwargs.setdefault("seq_len", self.manifest["seq_len"])
        return TokenLoader(self.dir, split, **kwargs)


def data_spec(value: Any = None) -> BaseModel:
    """A validated `data` section: from None (all defaults), a dict, or a DataSpec (of any registry build)."""
    from hyloom.blueprint import blueprint_model

    annotation = blueprint_model().model_fields["data"].annotation
    model = next(a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None))
    if isinstance(value, model):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return TypeAdapter(model).validate_python(value or {})


def _build(kind: str, cfg: BaseModel):
    from hyloom.registry import registry

    return registry().get(kind, cfg.type).build(cfg)


def _fingerprint(component, fallback):
    """A component's own cheap fingerprint if it has one, else `fallback()` (e.g. hashing every document)."""
    fingerprint = getattr(component, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else fallback()


def _key(spec: BaseModel, source, tokenizer) -> str:
    material = {
        "format": FORMAT,
        "source": spec.source.model_dump(mode="json"),
        "source_fingerprint": _fingerprint(source, lambda: texts_hash(d["text"] for d in source)),
        "tiers": [t.model_dump(mode="json") for t in spec.tiers],
        "tokenizer": spec.tokenizer.model_dump(mode="json"),
        "tokenizer_fingerprint": _fingerprint(tokenizer, lambda: None),
        "split": {"seed": spec.seed, "eval_fraction": spec.eval_fraction},
    }
    return stable_hash(material)[:16]


def prepared_path(spec: Any = None) -> Path:
    """Where `prepare(spec)` puts (or has put) its result; reads no documents when the source has a fingerprint."""
    spec = data_spec(spec)
    key = _key(spec, _build("data_source", spec.source), _build("tokenizer", spec.tokenizer))
    return Path(spec.cache_dir).expanduser() / f"data-{key}"


def load_prepared(path: str | Path) -> Prepared:
    path = Path(path).expanduser()
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise DataError(f"{path} is not a prepared data folder (no manifest.json); run `hyloom data prepare`")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} was prepared by another hyloom version (format {manifest.get('format')}, "
                        f"expected {FORMAT}); delete it and prepare again")
    tok = manifest["tokenizer"]
    tokenizer = HFTokenizer.load(path / tok["file"], eos_token=tok["eos_token"], mask_token=tok["mask_token"])
    return Prepared(path, manifest, tokenizer, manifest["unigram_loss"])


def prepare(spec: Any = None, progress: bool = True) -> Prepared:
    """Run the data pipeline for a `data` section (a DataSpec, a dict or None for the defaults), or reuse its
    cached result."""
    spec = data_spec(spec)
    source = _build("data_source", spec.source)
    tokenizer = _build("tokenizer", spec.tokenizer)
    cache = Path(spec.cache_dir).expanduser()
    final = cache / f"data-{_key(spec, source, tokenizer)}"
    if (final / "manifest.json").is_file():
        return load_prepared(final)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write(spec, source, tokenizer, tmp, progress)
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same folder first: theirs is as good as ours
            if not (final / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp)
        _fsync(cache)  # makes the rename itself durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:  # next to the progress bars, on stderr: stdout stays for the caller's own report
        print(f"data: prepared {final}", file=sys.stderr)
    return load_prepared(final)


def _split(documents: list[dict], spec: BaseModel) -> np.ndarray:
    """True for the documents held out for eval. Whole documents are drawn in a seeded order until they hold
    `eval_fraction` of the text (characters), at least one; counting text rather than documents keeps a
    split of a few empty files from having no tokens. At least one document stays in train."""
    n = len(documents)
    if n < 2:
        raise DataError(f"{n} document(s) passed the data tiers; at least 2 are needed (one for eval)")
    sizes = np.array([len(d["text"]) for d in documents], dtype=np.int64)
    target = spec.eval_fraction * sizes.sum()
    is_eval = np.zeros(n, dtype=bool)
    held = 0
    for i in np.random.default_rng(spec.seed % 2**63).permutation(n)[:n - 1]:
        is_eval[i] = True
        held += sizes[i]
        if held >= target:
            break
    return is_eval


def _write(spec: BaseModel, source, tokenizer, out: Path, progress: bool) -> None:
    documents = [check_document(d, i) for i, d in enumerate(tqdm(source, desc="read", unit="doc",
                                                                   disable=not progress))]
    types = [t.type for t in spec.tiers]
    steps = [(name, cfg.type, _build("data_tier", cfg)) for name, cfg in zip(step_names(types), spec.tiers)]
    kept, records, reports = run_tiers(documents, steps, progress=progress, total=len(documents))
    is_eval = _split(kept, spec)
    splits = {"train": [d for d, e in zip(kept, is_eval) if not e], "eval": [d for d, e in zip(kept, is_eval) if e]}
    for record, held_out in zip((r for r in records if r["tier"] == 1), is_eval):
        record["split"] = "eval" if held_out else "train"

    tokenizer = ready_tokenizer(tokenizer, lambda: [d["text"] for d in splits["train"]],
                                cache_dir=Path(spec.cache_dir).expanduser() / "tokenizers", progress=progress)
    tokenizer.save(out / "tokenizer.json")
    dtype = token_dtype(tokenizer.vocab_size)
    split_info = {}
    for name, docs in splits.items():
        writer = ShardWriter(out, name, dtype, tokenizer.eos_id)
        tokens = 0
        with tqdm(total=len(docs), desc=f"tokenize {name}", unit="doc", disable=not progress) as bar:
            for start in range(0, len(docs), ENCODE_CHUNK):
                chunk = docs[start:start + ENCODE_CHUNK]
                for ids in tokenizer.encode_batch([d["text"] for d in chunk]):
                    writer.add(ids)
                    tokens += len(ids) + 1
                bar.update(len(chunk))
        split_info[name] = {"documents": len(docs), "tokens": tokens, "shards": writer.close()}

    vocab = tokenizer.vocab_size
    counts = {name: token_counts(open_shards(out, info["shards"], dtype.name), vocab)
              for name, info in split_info.items()}
    with open(out / "documents.jsonl", "w") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json"),
        "seq_len": spec.seq_len,
        "tiers": {"L0": len(documents), "L1": len(kept)},
        "steps": [r.to_json() for r in reports],
        "tokenizer": {"type": spec.tokenizer.type, "file": "tokenizer.json", "vocab_size": vocab,
                      "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id,
                      "mask_token": tokenizer.mask_token, "mask_id": tokenizer.mask_id},
        "dtype": dtype.name,
        "splits": split_info,
        "unigram_loss": unigram_loss(counts["train"], counts["eval"]),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
