"""Data mixtures: `data.source: {type: mix, sources: [...]}` realises token shares at preparation time."""

import json

import numpy as np
import pytest
import yaml

from hyloom.cli import main
from hyloom.data import DataError, prepare, prepared_path

MQAR = {"type": "mqar", "documents": 1500, "seq_len": 32, "num_kv_pairs": [4], "vocab_size": 32}


def mix_spec(corpus, cache, weights=(0.75, 0.25), mqar_tiers=(), **changes):
    return {"source": {"type": "mix", "sources": [
                {"source": {"type": "jsonl", "path": str(corpus), "id_field": "name"}, "weight": weights[0]},
                {"source": MQAR, "weight": weights[1], "tiers": None if mqar_tiers is None else list(mqar_tiers)}]},
            "tiers": [{"type": "length"}, {"type": "digits"}],
            "tokenizer": {"type": "bpe", "vocab_size": 300}, "eval_fraction": 0.1, "cache_dir": str(cache), **changes}


@pytest.fixture(scope="module")
def mixed(corpus, tmp_path_factory):
    return prepare(mix_spec(corpus, tmp_path_factory.mktemp("cache")), progress=False)


def shards(prepared, split):
    return b"".join((prepared.dir / s["file"]).read_bytes() for s in prepared.manifest["splits"][split]["shards"])


def test_realised_shares_match_the_weights(mixed):
    parts = {p["name"]: p for p in mixed.manifest["mix"]["parts"]}
    train = {name: p["splits"]["train"] for name, p in parts.items()}
    assert train["jsonl"]["share"] == pytest.approx(0.75, abs=0.01)
    assert train["mqar"]["share"] == pytest.approx(0.25, abs=0.01)
    # the corpus is the limiting part: taken whole; mqar drew only what its share needed
    assert mixed.manifest["mix"]["limited_by"]["train"] == "jsonl"
    assert train["jsonl"]["tokens"] == train["jsonl"]["available_tokens"]
    assert train["mqar"]["tokens"] < train["mqar"]["available_tokens"]
    assert sum(t["tokens"] for t in train.values()) == mixed.manifest["splits"]["train"]["tokens"]
    # synthetic documents stay out of the held-out split (it is the filler and loss text of eval tasks)
    assert parts["mqar"]["held_out"] is False and parts["mqar"]["splits"]["eval"]["tokens"] == 0
    # the shards hold what the manifest says: mqar ids sit above the tokenizer's vocabulary
    ids = np.frombuffer(shards(mixed, "train"), dtype=mixed.manifest["dtype"])
    vocab = mixed.tokenizer.vocab_size
    assert mixed.manifest["vocab_size"] == vocab + MQAR["vocab_size"] and ids.max() < vocab + MQAR["vocab_size"]
    # every mqar document is 32 ids (+ EOS), all at or above the tokenizer's vocabulary (filler 0 -> vocab)
    assert (ids >= vocab).sum() == train["mqar"]["documents"] * 32 == train["mqar"]["tokens"] * 32 // 33
    held = np.frombuffer(shards(mixed, "eval"), dtype=mixed.manifest["dtype"])
    assert held.max() < vocab
    records = [json.loads(line) for line in (mixed.dir / "documents.jsonl").read_text().splitlines()]
    drawn = [r for r in records if r["mix"] == "mqar" and r["split"] == "train"]
    assert len(drawn) == train["mqar"]["documents"]


def test_same_spec_same_bytes_and_weights_change_the_cache(mixed, corpus, tmp_path):
    again = prepare(mix_spec(corpus, tmp_path / "other"), progress=False)
    for split in ("train", "eval"):
        assert shards(again, split) == shards(mixed, split)
    assert again.manifest["mix"] == mixed.manifest["mix"]
    other = mix_spec(corpus, tmp_path / "other", weights=(0.5, 0.5))
    assert prepared_path(other).name != again.dir.name
    assert prepared_path(mix_spec(corpus, tmp_path / "other")).name == again.dir.name
    halves = prepare(other, progress=False)
    shares = [p["splits"]["train"]["share"] for p in halves.manifest["mix"]["parts"]]
    assert shares == pytest.approx([0.5, 0.5], abs=0.01)


def test_per_source_tiers(corpus, tmp_path):
    # the data section's digits filter drops every mqar rendering ("3 17 5 ..."): tiers: [] opts out
    with pytest.raises(DataError, match="no document of mqar is left for the train split"):
        prepare(mix_spec(corpus, tmp_path, mqar_tiers=None), progress=False)


def test_mqar_alone_prepares(tmp_path):
    prepared = prepare({"source": MQAR, "tokenizer": {"type": "bpe", "vocab_size": 300},
                        "cache_dir": str(tmp_path)}, progress=False)
    # no text: bpe keeps its bytes and special tokens, the mqar ids follow
    assert prepared.tokenizer.vocab_size == 258
    assert prepared.manifest["vocab_size"] == 258 + 32
    assert prepared.manifest["splits"]["eval"]["tokens"] > 0  # a lone source is split as usual


def blueprint(tmp_path, source):
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump({"extends": "builtin:tiny", "data": {
        "source": source, "tokenizer": {"type": "bpe", "vocab_size": 300}, "cache_dir": str(tmp_path / "cache")}}))
    return str(path)


def test_stats_report_the_realised_shares(corpus, tmp_path, capsys):
    source = mix_spec(corpus, tmp_path)["source"]
    source["sources"][1]["weight"] = 0.1  # weights are normalised: 0.75 and 0.1 -> 0.882 and 0.118
    path = blueprint(tmp_path, source)
    assert main(["data", "prepare", path, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "stats", path]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(next((tmp_path / "cache").glob("data-*/manifest.json")).read_text())
    parts = manifest["mix"]["parts"]
    assert f"jsonl            weight 0.882  train {parts[0]['splits']['train']['share']:.3f}" in out
    assert f"mqar             weight 0.118  train {parts[1]['splits']['train']['share']:.3f}" in out
    assert "(not held out)" in out and "limited by: jsonl" in out
    assert "the model needs vocab_size >= " in out


@pytest.mark.parametrize("item, where, says", [
    ({"source": {"type": "stdlib"}, "weight": -1}, "data.source.sources.1.weight", "greater than 0"),
    ({"source": {"type": "stdlib"}, "weight": 0}, "data.source.sources.1.weight", "greater than 0"),
    ({"source": {"type": "stdlib"}, "weight": ".nan"}, "data.source.sources.1.weight", "finite"),
    ({"source": {"type": "stdlb"}, "weight": 1}, "data.source.sources.1.source", "unknown source type 'stdlb'"),
    ({"source": {"type": "mix", "sources": []}, "weight": 1}, "data.source.sources.1.source", "another mix"),
    ({"source": {"type": "stdlib"}, "weight": 1, "tiers": [{"type": "nope"}]}, "data.source.sources.1.tiers",
     "unknown tier step #0 type 'nope'"),
])
def test_bad_items_are_refused_with_their_key_path(tmp_path, capsys, item, where, says):
    source = {"type": "mix", "sources": [{"source": {"type": "stdlib"}, "weight": 1}, item]}
    path = blueprint(tmp_path, source)
    if item["weight"] == ".nan":  # YAML's NaN, unquoted
        text = open(path).read()
        open(path, "w").write(text.replace("'.nan'", ".nan"))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert where in err and says in err, err
