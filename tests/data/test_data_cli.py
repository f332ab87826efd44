"""`hyloom data prepare` and `hyloom data stats`."""

import json

import pytest
import yaml

from hyloom.cli import main


def blueprint(tmp_path, **data):
    path = tmp_path / "bp.yaml"
    section = {"source": {"type": "stdlib", "max_bytes": 150_000},
               "tiers": [{"type": "length"}, {"type": "digits"}, {"type": "dedup_exact"}],
               "tokenizer": {"type": "bpe", "vocab_size": 300}, "cache_dir": str(tmp_path / "cache"), **data}
    path.write_text(yaml.safe_dump({"extends": "builtin:tiny", "data": section}))
    return str(path)


def test_prepare_then_stats(tmp_path, capsys):
    path = blueprint(tmp_path)
    assert main(["data", "stats", path, "data.seed=1"]) == 2
    err = capsys.readouterr().err
    # the hint prepares what stats looked for: the overrides are part of it
    assert "not prepared yet" in err and f"run `hyloom data prepare {path} data.seed=1` first" in err, err

    assert main(["data", "prepare", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    folder = next((tmp_path / "cache").glob("data-*"))
    assert f"data: {folder}" in out
    manifest = json.loads((folder / "manifest.json").read_text())

    for target in (path, str(folder)):
        assert main(["data", "stats", target]) == 0
        stats = capsys.readouterr().out
        assert f"L0 documents: {manifest['tiers']['L0']:,}" in stats
        assert f"L1 documents: {manifest['tiers']['L1']:,}" in stats
        assert "too short: # chars < # (" in stats  # the stdlib's empty __init__.py files
        assert f"tokens train: {manifest['splits']['train']['tokens']:,}" in stats
        assert f"tokens eval: {manifest['splits']['eval']['tokens']:,}" in stats
        assert "tokenizer: bpe, vocab 300" in stats
        assert "unigram baseline:" in stats
    steps = [line.split()[0] for line in stats.splitlines() if line.startswith("  ")]
    assert steps == ["length", "digits", "dedup_exact"]

    assert main(["data", "stats", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == manifest


def test_overrides_reach_the_data_section(tmp_path, capsys):
    path = blueprint(tmp_path)
    assert main(["data", "prepare", path, "data.tiers=[]", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(no tier steps: every document is L1)" in out


def test_errors_exit_with_status_2(tmp_path, capsys):
    path = blueprint(tmp_path, source={"type": "jsonl", "path": str(tmp_path / "missing")})
    assert main(["data", "prepare", path, "--no-progress"]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main(["data", "prepare", path, "data.source.type=jsnol"]) == 2
    assert "did you mean 'jsonl'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "prepare", "--help"], ["data", "stats", "--help"]])
def test_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "examples:" in capsys.readouterr().out


def test_every_registered_data_component_is_documented_and_its_example_builds(tmp_path):
    from pathlib import Path

    from hyloom.data import DataError
    from hyloom.registry import registry

    docs = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    for kind in ("data_source", "data_tier", "tokenizer"):
        for reg in registry().all(kind):
            assert f"`{reg.name}`" in docs, (kind, reg.name)
            cfg = reg.config.model_validate(reg.example)
            try:
                reg.build(cfg)
            except DataError as exc:  # examples name files that need not exist here (or pyarrow)
                assert "does not exist" in str(exc) or "pip install pyarrow" in str(exc)
