"""`xft report DIR`: (re)build the report of a run of `xft run` or `xft demo`, finished or not."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    """Add the `report` subcommand."""
    p = subparsers.add_parser(
        "report", help="write the report (report.md + plots) of an xft run / xft demo directory",
        description="Rebuild DIR/report.md and DIR/plots/*.png from what the run(s) in DIR computed so far "
                    "(a finished or partial run of xft run, or xft demo's folder of seeds), and print the "
                    "pass@1 table. Nothing is trained or evaluated.")
    p.add_argument("dir", metavar="DIR", help="run directory of xft run (holds recipe.yaml), or the --out of "
                                              "xft demo (seed-N/ run directories)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from xft.report import build_report

    report, summary = build_report(args.dir)
    print((summary or "No evaluation has finished yet.") + f"\n\nReport: {report} "
          f"(plots in {os.path.dirname(report)}/plots)")
    return 0
