"""The command line: every command runs, every --help has examples, bad input exits with status 2."""

import argparse
import json
import subprocess
import sys

import pytest

from hyloom.cli import build_parser, main
from hyloom.cli.parser import CommandLine
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
    assert main(["ls", "objective"]) == 0
    assert "next_token" in capsys.readouterr().out
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


def test_overrides_may_follow_options(capsys):
    assert main(["show", "builtin:tiny", "--tree", "model.n_layers=2", "model.layout=SL"]) == 0
    assert capsys.readouterr().out.count("layers.") == 2
    assert main(["show", "builtin:tiny", "model.n_layers=2", "--tree", "model.layout=SL"]) == 0
    assert capsys.readouterr().out.count("layers.") == 2
    args = build_parser().parse_args(["train", "builtin:tiny", "--resume", "auto", "train.steps=600", "--no-progress",
                                      "train.lr=1e-3"])
    assert (args.blueprint, args.overrides, args.resume, args.no_progress) == (
        "builtin:tiny", ["train.steps=600", "train.lr=1e-3"], "auto", True)
    with pytest.raises(SystemExit, match="2"):  # an unknown option is still an error
        build_parser().parse_args(["show", "builtin:tiny", "--tree", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_nested_and_third_party_commands_parse_too():
    args = build_parser().parse_args(["data", "prepare", "builtin:tiny", "--no-progress", "data.seq_len=64"])
    assert (args.blueprint, args.overrides, args.no_progress) == ("builtin:tiny", ["data.seq_len=64"], True)
    # a third-party command with its own subcommands
    parser = CommandLine(prog="hyloom")
    command = parser.add_subparsers(dest="command").add_parser("remote")
    command.add_argument("--host")
    nested = command.add_subparsers(dest="action").add_parser("run")
    nested.add_argument("scripts", nargs="*")
    nested.add_argument("--fast", action="store_true")
    args = parser.parse_args(["remote", "--host", "h", "run", "a.py", "--fast", "b.py"])
    assert (args.host, args.action, args.scripts, args.fast) == ("h", "run", ["a.py", "b.py"], True)
    with pytest.raises(SystemExit, match="2"):  # leftovers are still reported
        parser.parse_args(["remote", "run", "a.py", "--fast", "--bogus"])
    # one intermixed parsing cannot handle (REMAINDER) is parsed as written, without a TypeError from argparse
    remainder = CommandLine(prog="hyloom")
    command = remainder.add_subparsers(dest="command").add_parser("exec")
    command.add_argument("--env")
    command.add_argument("rest", nargs=argparse.REMAINDER)
    assert remainder.parse_args(["exec", "--env", "e", "ls", "-l"]).rest == ["ls", "-l"]
    with pytest.raises(SystemExit, match="2"):  # leftovers: intermixed parsing is tried, refuses, plain parsing reports
        remainder.parse_args(["exec", "--bogus", "ls"])


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "2"], "argument --top-p: '2': expected a number in (0, 1]"),
    (["--top-p", "0"], "argument --top-p: '0': expected a number in (0, 1]"),
    (["--temperature", "-1"], "argument --temperature: '-1': expected a number >= 0"),
    (["--temperature", "nan"], "argument --temperature: 'nan': expected a number >= 0"),
    (["--top-k", "0"], "argument --top-k: '0': expected an integer >= 1"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: '-1': expected an integer >= 0"),
    (["--max-new-tokens", "ten"], "argument --max-new-tokens: 'ten': expected an integer >= 0"),
])
def test_generate_refuses_bad_sampling_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["generate", str(tmp_path), "--prompt", "x"] + argv)
    assert message in capsys.readouterr().err


def test_generate_names_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope: does not exist" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a checkpoint (no blueprint.yaml) nor a run directory with checkpoints" in capsys.readouterr().err
