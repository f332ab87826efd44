"""The command-line parsers: the top-level one, and the one way commands make theirs (so every `--help` ends
with examples)."""

from __future__ import annotations

import argparse
import sys


class CommandLine(argparse.ArgumentParser):
    """The top-level `hyloom` parser. argparse matches a command's positionals in one go, so in
    `hyloom train X --resume auto train.steps=600` the override after the option is left over as "unrecognized";
    when that happens the chosen (sub)command's own arguments are parsed again intermixed (options and
    positionals in any order), which is how every command that takes KEY=VALUE overrides accepts them anywhere."""

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        parsed, extras = self.parse_known_args(args, namespace)
        chosen = _chosen_command(self, parsed, args) if extras else None
        if chosen is not None:
            command, tail = chosen
            try:
                vars(parsed).update(vars(command.parse_intermixed_args(tail)))
                return parsed
            except TypeError:
                pass  # a (third-party) parser intermixed parsing cannot handle, e.g. REMAINDER: parsed as written
        return super().parse_args(args, namespace)  # reports the leftovers as usual


def _chosen_command(parser, parsed, args):
    """The innermost command parser `parsed` went into (`data prepare` is two deep), and the arguments after
    its name; None when that cannot be told."""
    command, tail = parser, args
    while True:
        # argparse has no public way to list a parser's subcommands
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if not nested:
            return (command, tail) if command is not parser else None
        name = getattr(parsed, nested[0].dest, None)
        if name not in nested[0].choices or name not in tail:
            return None
        command, tail = nested[0].choices[name], tail[tail.index(name) + 1:]


def command_parser(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """Add subcommand `name` to argparse subparsers `sub`; `examples` are lines shown after the options."""
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
