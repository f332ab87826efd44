"""Commands that only list or describe (ls, --help, plugins, schema) must not import torch and friends: torch
alone takes seconds to import. Each command runs in a fresh interpreter, since this one has torch loaded."""

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "triton", "matplotlib", "transformers")

COMMANDS = [["ls"], ["ls", "mixer"], ["--help"], ["train", "--help"], ["generate", "--help"], ["import-hf", "--help"],
            ["data", "prepare", "--help"], ["plugins"], ["schema"], ["schema", "--markdown"]]

PROBE = f"""
import contextlib, io, sys
from hyloom.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        status = main(sys.argv[1:])
    except SystemExit as exc:  # --help
        status = exc.code
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & {set(HEAVY)!r})
print(status, *heavy)
"""


def _imports_for(argv):
    """The exit status of `hyloom ARGV` and the heavy packages it imported."""
    # third-party plugins installed here may import torch themselves (their business): built-ins only
    env = {**os.environ, "HYLOOM_DISABLE_PLUGINS": "all"}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return out[0], out[1:]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_listing_and_help_import_no_torch(argv):
    assert _imports_for(argv) == ("0", [])


def test_the_probe_sees_torch_when_a_command_needs_it():
    """The check above can fail: a command that builds a model is seen importing torch."""
    status, heavy = _imports_for(["validate", "builtin:tiny"])
    assert status == "0" and "torch" in heavy
