import json

import pytest

from hyloom.data import prepare
from hyloom.plugins.data.sources import StdlibConfig, StdlibSource

SOUP = "{}[]<>!@#$%^&*()+=|\\/?~`;:" * 40 + " and then a few words"


def stdlib_texts(max_bytes: int) -> list[tuple[str, str]]:
    return [(d["meta"]["id"], d["text"]) for d in StdlibSource(StdlibConfig(max_bytes=max_bytes))]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A jsonl corpus of real text (stdlib files of 200+ chars) plus a symbol soup and an exact copy."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = [(i, t) for i, t in stdlib_texts(250_000) if len(t) >= 200]
    rows = [{"text": t, "name": i} for i, t in texts]
    rows.insert(3, {"text": SOUP, "name": "soup"})
    rows.append({"text": texts[0][1], "name": "copy-of-first"})
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def corpus_spec(corpus, cache, **changes):
    spec = {"source": {"type": "jsonl", "path": str(corpus), "id_field": "name"},
            "tiers": [{"type": "length"}, {"type": "symbols"}, {"type": "dedup_exact"}, {"type": "dedup_near"}],
            "tokenizer": {"type": "bpe", "vocab_size": 400}, "eval_fraction": 0.1, "cache_dir": str(cache)}
    spec.update(changes)
    return spec


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    return prepare(corpus_spec(corpus, tmp_path_factory.mktemp("cache")), progress=False)
