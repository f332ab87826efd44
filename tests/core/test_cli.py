"""The command line: every command runs, every --help has examples, bad input exits with status 2."""

import json
import subprocess
import sys

import pytest

from hyloom.cli import build_parser, main
from hyloom.registry import registry


def test_every_help_has_examples(capsys):
    # hyloom's own commands: an installed third-party plugin's are its authors' to test (docs/plugins.md)
    commands = [reg.name for reg in registry().all("command") if reg.dist == "hyloom"]
    assert {"plugins", "ls", "show", "validate", "schema", "cp"} <= set(commands)
    for argv in [[]] + [[c] for c in commands]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv + ["--help"])
        assert "examples:" in capsys.readouterr().out, argv


def test_show_tree(capsys):
    assert main(["show", "builtin:tiny", "--tree"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,410,688" in out
    # 2 sparse layers × (K and V + 1/4 of K compressed) × 2 heads × 32 × 2 bytes; 2 linear layers × 4 × 32² × 4 bytes
    assert "576B per token + 32.8KB fixed" in out
    assert out.count("layers.") == 4


def test_ls_and_plugins(capsys):
    assert main(["ls", "mixers"]) == 0
    assert "attention" in capsys.readouterr().out
    assert main(["ls", "blueprints"]) == 0
    assert "builtin:qwen3-1.7b" in capsys.readouterr().out
    assert main(["ls", "mixxer"]) == 2
    assert main(["plugins", "--json"]) == 0
    plugins = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in plugins} >= {"hyloom.plugins.transformer", "hyloom.plugins.position"}


def test_validate_a_9b_blueprint(capsys):
    assert main(["validate", "builtin:llama3-8b", "model.n_layers=30", "model.layout={repeat: A, times: 30}"]) == 0
    assert "30 layers" in capsys.readouterr().out


def test_schema_is_json_with_every_component(capsys):
    assert main(["schema"]) == 0
    text = capsys.readouterr().out
    json.loads(text)
    for name in registry().names("mixer") + registry().names("position"):
        assert f'"{name}"' in text


def test_cp(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "builtin:tiny", str(dest)]) == 0
    assert "d_model: 128" in dest.read_text()
    assert main(["cp", "builtin:tiny", str(dest)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["validate", str(dest)]) == 0


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "hyloom", "validate", "builtin:tiny", "model.d_model=0"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "model.d_model: Input should be greater than 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_data_is_a_message_not_a_traceback(tmp_path, capsys):
    argv = ["train", "builtin:tiny", "data.source={type: jsonl, path: /nonexistent/corpus.jsonl}",
            f"data.cache_dir={tmp_path}", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/corpus.jsonl does not exist" in err and "Traceback" not in err
