"""The `hyloom` command line. Subcommands are registered through `hyloom_register_commands`."""

from __future__ import annotations

import argparse
import sys

from hyloom import __version__
from hyloom.blueprint import BlueprintError
from hyloom.cli.parser import CommandLine
from hyloom.data import DataError
from hyloom.errors import SetupError, TrainingError
from hyloom.registry import CapabilityError, PluginError, UnknownComponentError, registry, reset

EPILOG = """examples:
  hyloom ls mixer                      list the registered mixers
  hyloom show builtin:tiny --tree      layers, parameters, cache bytes per token
  hyloom validate my.yaml model.n_layers=8
  hyloom <command> --help              examples for each command
"""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLine(prog="hyloom", description="Compose hybrid language models from YAML blueprints.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hyloom {__version__}")
    parser.add_argument("--no-plugins", action="store_true", help="load built-in plugins only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for reg in registry().all("command"):
        reg.build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reset(no_plugins="--no-plugins" in argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return args.func(args) or 0
    except (BlueprintError, CapabilityError, DataError, PluginError, UnknownComponentError, SetupError) as exc:
        print(f"hyloom: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"hyloom: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
