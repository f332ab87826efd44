"""Data sources: the stdlib corpus, jsonl, text and parquet files; documents and errors."""

import json
import sys

import pytest

from hyloom.data import DataError
from hyloom.plugins.data.sources import (JsonlConfig, JsonlSource, ParquetConfig, ParquetSource, StdlibConfig,
                                         StdlibSource, TextConfig, TextSource)


def test_stdlib_is_deterministic_within_budget_and_skips_tests():
    source = StdlibSource(StdlibConfig(max_bytes=300_000))
    docs = list(source)
    assert docs == list(StdlibSource(StdlibConfig(max_bytes=300_000)))
    ids = [d["meta"]["id"] for d in docs]
    assert ids == sorted(ids) and len(ids) > 5
    assert sum(p.stat().st_size for p in source.files()) <= 300_000
    assert all(d["meta"]["source"] == "stdlib" and d["meta"]["id"].endswith(".py") for d in docs)
    assert docs[0]["text"] == (source.root / ids[0]).read_text(encoding="utf-8", errors="replace")
    everything = [p.relative_to(source.root).parts for p in StdlibSource(StdlibConfig(max_bytes=10**9)).files()]
    assert not any(set(parts) & {"test", "tests", "idle_test", "site-packages"} for parts in everything)


def test_stdlib_include_tests_reads_test_folders():
    parts = [p.relative_to(s.root).parts for s in [StdlibSource(StdlibConfig(max_bytes=10**9, include_tests=True))]
             for p in s.files()]
    assert any("test" in p for p in parts)


def test_stdlib_fingerprint_follows_the_files():
    small, bigger = StdlibSource(StdlibConfig(max_bytes=100_000)), StdlibSource(StdlibConfig(max_bytes=200_000))
    assert small.fingerprint() == StdlibSource(StdlibConfig(max_bytes=100_000)).fingerprint()
    assert small.fingerprint() != bigger.fingerprint()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first doc", "x": 1}, "", {"text": "second"}, {"text": None}])
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "third"}])
    (tmp_path / "ignored.json").write_text('{"text": "not jsonl"}\n')
    docs = list(JsonlSource(JsonlConfig(path=str(tmp_path))))
    assert [d["text"] for d in docs] == ["first doc", "second", "third"]
    assert [d["meta"]["id"] for d in docs] == ["a.jsonl:1", "a.jsonl:3", "c.jsonl:1"]
    assert docs[0]["meta"]["source"] == "jsonl"
    one = list(JsonlSource(JsonlConfig(path=str(tmp_path / "a.jsonl"))))
    assert [d["text"] for d in one] == ["first doc", "second"]


def test_jsonl_field_names(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "hello", "uid": 7}])
    docs = list(JsonlSource(JsonlConfig(path=str(tmp_path), text_field="content", id_field="uid")))
    assert docs == [{"text": "hello", "meta": {"id": "7", "source": "jsonl", "path": str(tmp_path / "a.jsonl")}}]


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: no 'text' field \(found: body\)"):
        list(JsonlSource(JsonlConfig(path=str(tmp_path))))
    write_jsonl(tmp_path / "a.jsonl", ['{"text": "broken'])
    with pytest.raises(DataError, match=r"a\.jsonl:1: not valid JSON"):
        list(JsonlSource(JsonlConfig(path=str(tmp_path))))
    write_jsonl(tmp_path / "a.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match="is a int, expected a string"):
        list(JsonlSource(JsonlConfig(path=str(tmp_path))))


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nope"
    for make in (lambda: JsonlSource(JsonlConfig(path=str(missing))),
                 lambda: TextSource(TextConfig(path=str(missing)))):
        with pytest.raises(DataError, match=f"{missing} does not exist"):
            make()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.jsonl files under"):
        JsonlSource(JsonlConfig(path=str(tmp_path / "empty")))


def test_text_files_whole_or_by_paragraph(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Para one\nstill one.\n\n  \nPara two.\n")
    (tmp_path / "sub" / "b.md").write_text("# Title\n")
    (tmp_path / "c.py").write_text("print('not read')\n")
    whole = list(TextSource(TextConfig(path=str(tmp_path))))
    assert [(d["meta"]["id"], d["text"]) for d in whole] == [
        ("a.txt", "Para one\nstill one.\n\n  \nPara two.\n"), ("sub/b.md", "# Title\n")]
    split = list(TextSource(TextConfig(path=str(tmp_path), split_on_blank_lines=True)))
    assert [(d["meta"]["id"], d["text"]) for d in split] == [
        ("a.txt#0", "Para one\nstill one."), ("a.txt#1", "Para two."), ("sub/b.md#0", "# Title")]
    single = list(TextSource(TextConfig(path=str(tmp_path / "c.py"))))  # a named file is read whatever its suffix
    assert single[0]["meta"]["id"] == "c.py"


def test_text_source_replaces_bad_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok")
    assert list(TextSource(TextConfig(path=str(tmp_path))))[0]["text"] == "caf\ufffd ok"


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        ParquetSource(ParquetConfig(path=str(tmp_path)))


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    docs = list(ParquetSource(ParquetConfig(path=str(tmp_path), batch_rows=2)))
    assert [(d["meta"]["id"], d["text"]) for d in docs] == [("a.parquet:0", "alpha"), ("a.parquet:2", "gamma")]
    with_ids = list(ParquetSource(ParquetConfig(path=str(tmp_path), id_field="n")))
    assert [d["meta"]["id"] for d in with_ids] == ["1", "3"]
    with pytest.raises(DataError, match="no 'body' column"):
        list(ParquetSource(ParquetConfig(path=str(tmp_path), text_field="body")))
