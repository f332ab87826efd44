"""The command-line parsers: the top-level one, and the one way commands make theirs (so every `--help` ends
with examples)."""

from __future__ import annotations

import argparse
import sys


class CommandLine(argparse.ArgumentParser):
    """The top-level `hyloom` parser. argparse matches a command's positionals in one go, so in
    `hyloom train X --resume auto train.steps=600` the override after the option is left over as "unrecognized";
    when that happens the command's own arguments are parsed again intermixed (options and positionals in any
    order), which is how every command that takes KEY=VALUE overrides accepts them anywhere."""

    def add_subparsers(self, **kwargs):
        # the commands are plain parsers: only the top level needs the second pass
        self._commands = super().add_subparsers(parser_class=argparse.ArgumentParser, **kwargs)
        return self._commands

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        parsed, extras = self.parse_known_args(args, namespace)
        name = getattr(parsed, "command", None)
        command = self._commands.choices.get(name) if name and hasattr(self, "_commands") else None
        if extras and command is not None:
            try:
                tail = command.parse_intermixed_args(args[args.index(name) + 1:])
            except TypeError:
                pass  # a (third-party) parser intermixed parsing cannot handle, e.g. REMAINDER: parsed as written
            else:
                vars(parsed).update(vars(tail))
                return parsed
        return super().parse_args(args, namespace)  # reports the leftovers as usual


def command_parser(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """Add subcommand `name` to argparse subparsers `sub`; `examples` are lines shown after the options."""
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
