"""The `xft` command: thin subcommands over library calls.

Each subcommand lives next to the library code it drives and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Errors meant for the user are raised as `xft.errors.UserError` and printed as
one line (no traceback), with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xft.errors import UserError

# Modules that provide `register(subparsers)`; a missing one (work in progress) is skipped.
_SUBCOMMAND_MODULES = (
    "xft.commands.core",  # upcycle
    "xft.commands.train",  # train, merge
    "xft.eval.cli",  # eval
    "xft.commands.run",  # run, demo
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="xft",
        description="Upcycle a dense code LLM into a shared-expert MoE, instruction-tune it, "
        "and learn to merge it back into a dense model (XFT).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xft` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"xft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
