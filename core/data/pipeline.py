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


@dataclass
class MixPart:
    """One source of a data mix (a plain `data.source` is a mix of one part with weight 1)."""

    source: Any
    name: str  # the source's type; parts of one type are told apart as "jsonl", "jsonl#2"
    weight: float  # normalised share of the training tokens
    tiers: list | None  # tier configs for this part alone; None: the data section's
    held_out: bool  # whether the part gives documents to the eval split


def _split(documents: list[dict], seed: int, eval_fraction: float, what: str) -> np.ndarray:
    """True for the documents held out for eval. Whole documents are drawn in a seeded order until they hold
    `eval_fraction` of the text (characters), at least one; counting text rather than documents keeps a
    split of a few empty files from having no tokens. At least one document stays in train."""
    n = len(documents)
    if n < 2:
        raise DataError(f"{n} document(s){what} passed the data tiers; at least 2 are needed (one for eval)")
    sizes = np.array([len(d["text"]) for d in documents], dtype=np.int64)
    target = eval_fraction * sizes.sum()
    is_eval = np.zeros(n, dtype=bool)
    held = 0
    for i in np.random.default_rng(seed % 2**63).permutation(n)[:n - 1]:
        is_eval[i] = True
        held += sizes[i]
        if held >= target:
            break
    return is_eval


def _draw(tokens: list[np.ndarray], weights: list[float], seed: int) -> tuple[list[np.ndarray], int | None]:
    """Which documents of each part a split takes so that part k holds `weights[k]` of its tokens.

    `tokens[k]` holds the token count of each candidate document of part k. The total is the largest the
    candidates allow: the part with the fewest tokens per unit of weight is taken whole (the *limiting*
    part, returned), every other part draws documents in a seeded order until it reaches its share (so it
    may overshoot by one document). Returns a boolean mask per part and the limiting part's index."""
    available = [int(t.sum()) for t in tokens]
    live = [k for k, w in enumerate(weights) if w > 0]
    if not live:
        return [np.zeros(len(t), dtype=bool) for t in tokens], None
    limit = min(live, key=lambda k: available[k] / weights[k])
    total = available[limit] / weights[limit]
    masks = []
    for k, counts in enumerate(tokens):
        mask = np.zeros(len(counts), dtype=bool)
        if k == limit:
            mask[:] = True
        elif weights[k] > 0:
            target, taken = weights[k] * total, 0
            for i in np.random.default_rng([seed % 2**63, k]).permutation(len(counts)):
                if taken >= target:
                    break
                mask[i] = True
                taken += counts[i]
        masks.append(mask)
    return masks, limit


def _tokenize(tokenizer, docs: list[dict], dtype, progress: bool, desc: str) -> list[np.ndarray]:
    """Each document's ids: encoded text, or its pre-tokenized `ids` moved above the tokenizer's vocabulary."""
    out = []
    offset = tokenizer.vocab_size
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[start:start + ENCODE_CHUNK]
            texts = [i for i, d in enumerate(chunk) if "ids" not in d]
            encoded = dict(zip(texts, tokenizer.encode_batch([chunk[i]["text"] for i in texts])))
            for i, d in enumerate(chunk):
                ids = encoded[i] if i in encoded else np.asarray(d["ids"], dtype=np.int64) + offset
                out.append(np.asarray(ids, dtype=dtype))
            bar.update(len(chunk))
    return out


def _write(spec: BaseModel, source, tokenizer, out: Path, progress: bool) -> None:
    parts = getattr(source, "parts", None)
    mixed = parts is not None
    if not mixed:
        parts = [MixPart(source, spec.source.type, 1.0, None, True)]
    names = step_names([p.name for p in parts])
    all_records, reports = [], []
    candidates, records_of = [], []  # [k][split]: part k's documents in that split, and their records
    n_read = n_kept = 0
    for k, (part, name) in enumerate(zip(parts, names)):
        what = f" of {name}" if mixed else ""
        documents = [check_document(d, i) for i, d in enumerate(tqdm(part.source, desc=f"read {name}", unit="doc",
                                                                       disable=not progress))]
        tier_cfgs = spec.tiers if part.tiers is None else part.tiers
        steps = [(f"{name}/{step}" if mixed else step, cfg.type, _build("data_tier", cfg))
                 for step, cfg in zip(step_names([t.type for t in tier_cfgs]), tier_cfgs)]
        kept, records, part_reports = run_tiers(documents, steps, progress=progress, total=len(documents))
        if part.held_out:
            is_eval = _split(kept, spec.seed + k, spec.eval_fraction, what)
        else:
            is_eval = np.zeros(len(kept), dtype=bool)
        kept_records = [r for r in records if r["tier"] == 1]
        for record, held_out in zip(kept_records, is_eval):
            record["split"] = "eval" if held_out else "train"
        if mixed:
            for record in records:
                record["mix"] = name
        candidates.append({"train": [d for d, e in zip(kept, is_eval) if not e],
                           "eval": [d for d, e in zip(kept, is_eval) if e]})
        records_of.append({"train": [r for r, e in zip(kept_records, is_eval) if not e],
                           "eval": [r for r, e in zip(kept_records, is_eval) if e]})
        all_records += records
        reports += part_reports
        n_read, n_kept = n_read + len(documents), n_kept + len(kept)

    # The tokenizer learns from every candidate training text (the draw needs token counts, so it comes
    # first); with only pre-tokenized documents there is no text and bpe keeps its bytes and special tokens.
    train_texts = [d["text"] for c in candidates for d in c["train"] if "ids" not in d]
    tokenizer = ready_tokenizer(tokenizer, lambda: train_texts or [""],
                                cache_dir=Path(spec.cache_dir).expanduser() / "tokenizers", progress=progress)
    tokenizer.save(out / "tokenizer.json")
    extra = max((int(np.max(d["ids"], initial=-1)) + 1 for c in candidates for s in c.values() for d in s
                 if "ids" in d), default=0)
    vocab = tokenizer.vocab_size + extra  # pre-tokenized ids sit just above the tokenizer's own
    dtype = token_dtype(vocab)

    split_info, mix_info = {}, [{"name": n, "source": p.name, "weight": p.weight, "held_out": p.held_out, "splits": {}}
                                for n, p in zip(names, parts)]
    limits = {}
    for split in ("train", "eval"):
        ids = [_tokenize(tokenizer, c[split], dtype, progress, f"tokenize {names[k]} {split}" if mixed
                         else f"tokenize {split}") for k, c in enumerate(candidates)]
        counts = [np.array([len(x) + 1 for x in part_ids], dtype=np.int64) for part_ids in ids]
        weights = [p.weight if (split == "train" or p.held_out) else 0.0 for p in parts]
        for name, w, c in zip(names, weights, counts):
            if w and not len(c):
                raise DataError(f"no document of {name} is left for the {split} split after its tiers")
        masks, limit = _draw(counts, weights, spec.seed + (split == "eval"))
        limits[split] = names[limit] if limit is not None else None
        writer = ShardWriter(out, split, dtype, tokenizer.eos_id)
        tokens = documents = 0
        for k in range(len(parts)):
            for record, x, take in zip(records_of[k][split], ids[k], masks[k]):
                if take:
                    writer.add(x)
                else:
                    record["split"] = None  # not drawn: the mix had enough of this part
            mix_info[k]["splits"][split] = {"documents": int(masks[k].sum()), "tokens": int(counts[k][masks[k]].sum()),
                                            "available_tokens": int(counts[k].sum())}
            tokens += mix_info[k]["splits"][split]["tokens"]
            documents += mix_info[k]["splits"][split]["documents"]
        for item in mix_info:
            item["splits"][split]["share"] = item["splits"][split]["tokens"] / tokens if tokens else 0.0
        split_info[split] = {"documents": documents, "tokens": tokens, "shards": writer.close()}
        if not tokens:
            raise DataError(f"the {split} split is empty: no document was drawn for it")
    counts = {name: token_counts(open_shards(out, info["shards"], dtype.name), vocab)
              for name, info in split_info.items()}
    with open(out / "documents.jsonl", "w") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in all_records)
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json"),
        "seq_len": spec.seq_len,
        "tiers": {"L0": n_read, "L1": n_kept},
        "steps": [r.to_json() for r in reports],
        "tokenizer": {"type": spec.tokenizer.type, "file": "tokenizer.json", "vocab_size": tokenizer.vocab_size,
                      "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id,
                      "mask_token": tokenizer.mask_token, "mask_id": tokenizer.mask_id},
        "vocab_size": vocab,
        "dtype": dtype.name,
        "splits": split_info,
        "unigram_loss": unigram_loss(counts["train"], counts["eval"]),
    }
    if mixed:
        manifest["mix"] = {"parts": mix_info, "limited_by": limits}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
