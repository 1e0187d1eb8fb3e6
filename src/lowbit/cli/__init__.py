"""The `lowbit` command line: argparse in parser.py, the subcommands in commands.py."""
from lowbit.cli.parser import main

__all__ = ["main"]
