"""The `xft` command: thin subcommands over library calls.

Each subcommand lives next to the library code it drives and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Only the module of the command being run is imported: `xft --help` and
`xft --version` import none (and so no torch), `xft train --help` only the
train module. Errors meant for the user are raised as `xft.errors.UserError`
and printed as one line (no traceback), with exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from xft import __version__
from xft.errors import UserError

# name -> (module providing `register(subparsers)`, one-line help for `xft --help`, resumable).
# The help here is what `xft --help` shows (keep it equal to the module's own add_parser help);
# a module that does not exist (work in progress) is left out of the command list.
COMMANDS = {
    "upcycle": ("xft.commands.core", "upcycle a dense model into an MoE (every FFN -> N experts)", False),
    "train": ("xft.commands.train", "instruction-tune a dense or MoE model (SFT, EWA)", True),
    "merge": ("xft.commands.train", "merge a trained MoE into a dense model (learned or fixed merges, optional "
                                    "distillation)", True),
    "eval": ("xft.eval.cli", "evaluate a model (or a samples file) on a code benchmark, sandboxed", False),
    "run": ("xft.commands.run", "run a whole XFT experiment from a YAML recipe (resumable stages)", True),
    "demo": ("xft.commands.run", "the whole XFT experiment on MiniCode on a CPU, with a report and plots", True),
    "plan": ("xft.commands.plan", "estimate per-GPU memory of every stage before renting GPUs", False),
    "report": ("xft.commands.report", "write the report (report.md + plots) of an xft run / xft demo directory",
               False),
}


def _available(module: str) -> bool:
    """Whether `module` exists, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported to add its full parser."""
    parser = argparse.ArgumentParser(
        prog="xft",
        description="Upcycle a dense code LLM into a shared-expert MoE, instruction-tune it, "
        "and learn to merge it back into a dense model (XFT).",
    )
    parser.add_argument("--version", action="version", version=f"xft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS and _available(COMMANDS[command][0]):
        importlib.import_module(COMMANDS[command][0]).register(sub)
    # The other commands get a placeholder parser: their name and help line, for `xft --help`.
    for name, (module, help, _) in COMMANDS.items():
        if name not in sub.choices and _available(module):
            sub.add_parser(name, help=help, add_help=False)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """Exit 2 with one line naming the `unknown` arguments and, for an option, the flag meant where we can
    tell (`--learning-rate` -> `--lr`: `xft.config.ALIASES`, or a near miss) among the command's own flags."""
    from xft.config import suggest_option

    command = getattr(args, "command", None)
    sub = parser._subparsers._group_actions[0].choices.get(command) if parser._subparsers else None
    target = sub if sub is not None and sub.get_default("func") else parser
    options = [u.split("=", 1)[0] + suggest_option(u, target._option_string_actions)
               for u in unknown if u.startswith("-")]
    what = f"unknown option{'s' if len(options) > 1 else ''} {', '.join(options)}" if options else \
        f"unrecognized arguments: {' '.join(unknown)}"
    target.exit(2, f"{target.prog}: error: {what}; see {target.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xft` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unrecognized(parser, args, unknown)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"xft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumes = COMMANDS.get(args.command, ("", "", False))[2]
        # With --overwrite the same command would start over and delete what was done: say how to resume.
        again = "re-run it without --overwrite" if getattr(args, "overwrite", False) else "re-run the same command"
        print(f"xft {args.command}: interrupted" + (f"; {again} to resume" if resumes else ""), file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Tear down the process group a command under `accelerate launch` joined, before the interpreter exits:
    gloo's threads torn down at exit can abort a rank ("terminate called without an active exception",
    SIGABRT) after all its work is done. A command that never imported torch.distributed has none."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
