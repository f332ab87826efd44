"""The one way commands make their parser, so every `--help` ends with examples."""

import argparse


def command_parser(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """Add subcommand `name` to argparse subparsers `sub`; `examples` are lines shown after the options."""
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
