"""The `pysource` data source: installed Python source, each distinct file once, in a fixed order, within a byte
budget; copies never straddle the train/held-out split."""

import json

import pytest

from hyloom.data import DataError, prepare
from hyloom.plugins.data import pysource
from hyloom.plugins.data.dedup import normalise
from hyloom.plugins.data.pysource import PysourceConfig, PysourceSource
from hyloom.registry import registry

BODY = "def {name}(x):\n    '''Return x plus {n}.'''\n    return x + {n}\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    """A fake stdlib and two site-packages folders: packages, a vendored copy, a stdlib backport, tests and
    caches that are never read."""
    std = tmp_path / "lib" / "python3.x"
    write(std / "os.py", BODY.format(name="stdlib_os", n=1))
    write(std / "site-packages" / "inside.py", "not the stdlib's")
    site_a, site_b = tmp_path / "a" / "site-packages", tmp_path / "b" / "site-packages"
    for k in range(6):
        write(site_a / f"pkg{k}" / "core.py", BODY.format(name=f"f{k}", n=k))
    write(site_a / "pkg0" / "_vendor" / "copy.py", BODY.format(name="f1", n=1).upper())  # a copy of pkg1/core.py
    write(site_b / "backport.py", "  " + BODY.format(name="stdlib_os", n=1))  # a copy of the stdlib's os.py
    write(site_b / "pkg0" / "core.py", BODY.format(name="other", n=9))  # same relative path, other root
    write(site_a / "pkg1" / "tests" / "test_core.py", BODY.format(name="test", n=0))
    write(site_a / "pkg1" / "__pycache__" / "core.py", "cached")
    write(site_a / "pkg1" / "data.txt", "not python")
    return {"stdlib": std, "sites": [site_a, site_b]}


def source(tree, monkeypatch, **cfg):
    monkeypatch.setattr(pysource, "package_folders", lambda: tree["sites"])
    return PysourceSource(PysourceConfig(**cfg), stdlib_root=tree["stdlib"])


def ids(src):
    return [d["meta"]["id"] for d in src]


def test_registered_as_a_data_source():
    assert "pysource" in registry().names("data_source")


def test_every_distinct_file_once_in_a_fixed_order(tree, monkeypatch):
    src = source(tree, monkeypatch)
    docs = list(src)
    assert ids(docs) == ids(source(tree, monkeypatch))  # deterministic
    texts = [normalise(d["text"]) for d in docs]
    assert len(set(texts)) == len(texts)  # no two documents alike, even up to case and spacing
    got = set(ids(docs))
    assert {"site-packages/pkg0/core.py", "site-packages#2/pkg0/core.py"} <= got
    # one of each pair of copies stays (whichever comes first in the source's order)
    assert len(got & {"site-packages/pkg1/core.py", "site-packages/pkg0/_vendor/copy.py"}) == 1
    assert len(got & {"stdlib/os.py", "site-packages#2/backport.py"}) == 1
    assert not any("tests/" in i or "__pycache__" in i or "inside.py" in i or i.endswith(".txt") for i in got)
    assert all(d["meta"]["source"] == "pysource" for d in docs)
    with_tests = ids(source(tree, monkeypatch, include_tests=True))
    assert "site-packages/pkg1/tests/test_core.py" in with_tests


def test_stdlib_false_leaves_out_the_stdlib_and_its_copies(tree, monkeypatch):
    got = ids(source(tree, monkeypatch, stdlib=False))
    assert not any(i.startswith("stdlib/") for i in got)
    assert "site-packages#2/backport.py" not in got  # a copy of stdlib/os.py
    assert "site-packages#2/pkg0/core.py" in got


def test_max_bytes_and_max_file_bytes(tree, monkeypatch):
    everything = source(tree, monkeypatch)
    sizes = [p.stat().st_size for _, p in everything.files()]
    budget = sum(sizes) - 1  # one file short of everything
    src = source(tree, monkeypatch, max_bytes=budget)
    assert sum(p.stat().st_size for _, p in src.files()) <= budget
    assert len(src.files()) == len(sizes) - 1
    big = write(tree["sites"][0] / "generated.py", "x = 1\n" * 2000)
    assert "site-packages/generated.py" in ids(source(tree, monkeypatch))
    assert "site-packages/generated.py" not in ids(source(tree, monkeypatch, max_file_bytes=big.stat().st_size - 1))


def test_explicit_paths_and_the_fingerprint(tree, monkeypatch):
    site_a = tree["sites"][0]
    src = source(tree, monkeypatch, paths=[str(site_a), str(tree["sites"][1] / "backport.py")])
    got = ids(src)
    assert "site-packages/pkg3/core.py" in got and "backport.py/backport.py" in got
    assert not any(i.startswith("stdlib/") for i in got)  # paths given: only those
    before = src.fingerprint()
    assert source(tree, monkeypatch, paths=[str(site_a), str(tree["sites"][1] / "backport.py")]).fingerprint() \
        == before
    write(site_a / "pkg9" / "new.py", "def new(): pass\n")
    assert source(tree, monkeypatch, paths=[str(site_a), str(tree["sites"][1] / "backport.py")]).fingerprint() \
        != before
    with pytest.raises(DataError, match="does not exist"):
        source(tree, monkeypatch, paths=[str(tree["stdlib"] / "nope")])


def test_no_copy_on_both_sides_of_the_split(tmp_path, monkeypatch):
    """Many copies of few files (as vendored trees): prepared with a large held-out share, the held-out split
    shares no document with the train split."""
    site = tmp_path / "site-packages"
    for k in range(40):
        text = BODY.format(name=f"f{k % 8}", n=k % 8) * 3  # 8 distinct files, 5 copies each
        write(site / f"pkg{k}" / "mod.py", text if k % 2 else text.replace("    ", "\t"))
    spec = {"source": {"type": "pysource", "paths": [str(site)]}, "tokenizer": {"type": "bpe", "vocab_size": 300},
            "seq_len": 16, "eval_fraction": 0.3, "cache_dir": str(tmp_path / "cache")}
    prepared = prepare(spec, progress=False)
    records = [json.loads(line) for line in (prepared.dir / "documents.jsonl").read_text().splitlines()]
    assert len(records) == 8
    texts = {r["id"]: normalise((site / r["id"].split("/", 1)[1]).read_text()) for r in records}
    held = {texts[r["id"]] for r in records if r["split"] == "eval"}
    trained = {texts[r["id"]] for r in records if r["split"] == "train"}
    assert held and trained and not held & trained
