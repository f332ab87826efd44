"""prepare: tiers recorded per document, train/eval split, shards equal the tokenized documents + EOS, the
unigram baseline, and the cache (same inputs: no work; atomic writes)."""

import json
import math
import os
from collections import Counter

import numpy as np
import pytest

import hyloom.data.pipeline as pipeline
from hyloom.data import DataError, load_prepared, prepare, prepared_path
from conftest import SOUP, corpus_spec


def read_records(prepared):
    return [json.loads(line) for line in (prepared.dir / "documents.jsonl").read_text().splitlines()]


def split_tokens(prepared, split):
    info = prepared.manifest["splits"][split]
    return np.concatenate([np.fromfile(prepared.dir / s["file"], dtype=prepared.manifest["dtype"])
                           for s in info["shards"]])


def test_documents_jsonl_records_every_decision(prepared, corpus):
    records = {r["id"]: r for r in read_records(prepared)}
    rows = [json.loads(line) for line in (corpus / "docs.jsonl").read_text().splitlines()]
    assert len(records) == len(rows) == prepared.manifest["tiers"]["L0"]
    soup = records["soup"]
    assert (soup["tier"], soup["dropped_by"]) == (0, "symbols") and soup["reason"].startswith("symbol ratio")
    copy = records["copy-of-first"]
    assert (copy["dropped_by"], copy["reason"]) == ("dedup_exact", f"exact duplicate of '{rows[0]['name']}'")
    kept = [r for r in records.values() if r["tier"] == 1]
    assert all(r["dropped_by"] is None and r["split"] in ("train", "eval") for r in kept)
    assert len(kept) == prepared.manifest["tiers"]["L1"] == len(rows) - 2
    steps = {s["name"]: s for s in prepared.manifest["steps"]}
    assert steps["symbols"]["dropped"] == 1 and steps["dedup_exact"]["dropped"] == 1
    assert steps["dedup_near"]["seen"] == len(rows) - 2


def test_shards_hold_the_tokenized_documents_with_eos(prepared, corpus):
    rows = {r["name"]: r["text"] for r in map(json.loads, (corpus / "docs.jsonl").read_text().splitlines())}
    records = read_records(prepared)
    tok, manifest = prepared.tokenizer, prepared.manifest
    assert manifest["dtype"] == "uint16"
    for split in ("train", "eval"):
        ids = [r["id"] for r in records if r.get("split") == split]
        expected = [t for i in ids for t in tok.encode(rows[i]) + [tok.eos_id]]
        stream = split_tokens(prepared, split)
        assert stream.tolist() == expected
        assert manifest["splits"][split] | {"shards": None} == {"documents": len(ids), "tokens": len(expected),
                                                                 "shards": None}
    assert (prepared.dir / "tokenizer.json").is_file() and manifest["tokenizer"]["eos_id"] == tok.eos_id


def test_eval_split_is_whole_documents_about_eval_fraction_of_the_text(prepared):
    records = [r for r in read_records(prepared) if r["tier"] == 1]
    held = sum(r["chars"] for r in records if r["split"] == "eval")
    total = sum(r["chars"] for r in records)
    assert 0.1 <= held / total < 0.1 + max(r["chars"] for r in records) / total


def test_unigram_loss_matches_a_direct_computation(prepared):
    train, held_out = Counter(split_tokens(prepared, "train").tolist()), split_tokens(prepared, "eval").tolist()
    vocab, n_train = prepared.tokenizer.vocab_size, sum(train.values())
    direct = -sum(math.log((train[t] + 1) / (n_train + vocab)) for t in held_out) / len(held_out)
    assert prepared.unigram_loss == pytest.approx(direct, rel=1e-9)
    assert prepared.manifest["unigram_loss"] == prepared.unigram_loss
    assert 0 < direct < math.log(vocab) + 1


def test_second_prepare_reuses_the_folder_without_work(prepared, corpus, monkeypatch):
    spec = corpus_spec(corpus, prepared.dir.parent)
    assert prepared_path(spec) == prepared.dir
    monkeypatch.setattr(pipeline, "_write", lambda *a: pytest.fail("prepared again"))
    again = prepare(spec, progress=False)
    assert again.dir == prepared.dir and again.manifest == prepared.manifest
    assert again.tokenizer.encode("def f(): pass") == prepared.tokenizer.encode("def f(): pass")
    assert load_prepared(prepared.dir).unigram_loss == prepared.unigram_loss
    assert not [p for p in prepared.dir.parent.iterdir() if ".tmp-" in p.name]


def test_the_cache_key_follows_inputs(corpus, tmp_path):
    base = prepared_path(corpus_spec(corpus, tmp_path))
    assert base.parent == tmp_path and base.name.startswith("data-")
    assert prepared_path(corpus_spec(corpus, tmp_path, seq_len=64)) == base  # windows are cut by the loader
    changes = [{"seed": 1}, {"eval_fraction": 0.2}, {"tiers": []}, {"tokenizer": {"type": "bpe", "vocab_size": 300}}]
    for change in changes:
        assert prepared_path(corpus_spec(corpus, tmp_path, **change)) != base, change
    (corpus / "docs.jsonl").touch()
    os.utime(corpus / "docs.jsonl", ns=(0, 0))  # a changed modification time means changed content
    assert prepared_path(corpus_spec(corpus, tmp_path)) != base


def test_a_failed_prepare_leaves_nothing_behind(corpus, tmp_path, monkeypatch):
    def crash(spec, source, tokenizer, out, progress):
        (out / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "_write", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(corpus_spec(corpus, tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_stdlib_source_prepares(tmp_path, capsys):
    spec = {"source": {"type": "stdlib", "max_bytes": 120_000}, "tokenizer": {"type": "bpe", "vocab_size": 300},
            "cache_dir": str(tmp_path)}
    prepared = prepare(spec, progress=True)
    assert f"prepared {prepared.dir}" in capsys.readouterr().err
    assert prepared.manifest["tiers"]["L0"] == prepared.manifest["tiers"]["L1"] > 2  # no tier steps configured
    assert prepared.manifest["spec"]["source"] == {"type": "stdlib", "max_bytes": 120_000, "include_tests": False}
    assert (tmp_path / "tokenizers").is_dir()


def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} does not exist"):
        prepare(corpus_spec(tmp_path / "missing", tmp_path), progress=False)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jsonl").write_text(json.dumps({"text": SOUP}) + "\n" + json.dumps({"text": "fine text " * 20}) + "\n")
    with pytest.raises(DataError, match=r"1 document\(s\) passed the data tiers; at least 2"):
        prepare(corpus_spec(one, tmp_path), progress=False)
