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
    p.add_argument("dir", metavar="DIR", nargs="?", help="run directory of xft run (holds recipe.yaml), or the "
                                                        "--out of xft demo (seed-N/ run directories)")
    p.add_argument("--study", metavar="STUDY_JSON",
                   help="instead: the tables and plots of a study (the study.json of xft demo --study), written as "
                        "study.md + PNGs beside it")
    p.add_argument("--markdown", metavar="FILE",
                   help="with --study: also replace the block between FILE's <!-- study:begin --> and "
                        "<!-- study:end --> lines with the tables (e.g. docs/results.md)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from xft.errors import UserError
    from xft.pipeline.report import build_report

    if args.study:
        from xft.study.report import study_report

        if args.dir:
            raise UserError("give either DIR (a run's report) or --study STUDY_JSON, not both")
        path, text = study_report(args.study, markdown=args.markdown)
        print(text + f"\n\nWritten: {path}" + (f" and the study block of {args.markdown}" if args.markdown else ""))
        return 0
    if args.markdown:
        raise UserError("--markdown goes with --study")
    if not args.dir:
        raise UserError("give a run directory DIR, or --study STUDY_JSON")
    report, summary = build_report(args.dir)
    print((summary or "No evaluation has finished yet.") + f"\n\nReport: {report} "
          f"(plots in {os.path.dirname(report)}/plots)")
    return 0
