"""`xft report DIR`: (re)build the report of a run of `xft run` or `xft demo`, finished or not, or of the
outputs of `xft upcycle/train/merge/eval` made by hand (DIR one of them, or a folder of them)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    """Add the `report` subcommand."""
    p = subparsers.add_parser(
        "report", help="write the report (report.md + plots) of an xft run / xft demo directory",
        description="Rebuild DIR/report.md and DIR/plots/*.png from what the run(s) in DIR computed so far "
                    "(a finished or partial run of xft run, or xft demo's folder of seeds), and print the "
                    "pass@1 table. For the outputs of xft upcycle/train/merge/eval made by hand (DIR is one, "
                    "or holds them up to two levels down), DIR/report.md lists every model and evaluation. "
                    "Nothing is trained or evaluated.")
    p.add_argument("dir", metavar="DIR", nargs="?", help="run directory of xft run (holds recipe.yaml), the "
                                                        "--out of xft demo (seed-N/ run directories), or a folder "
                                                        "of xft upcycle/train/merge/eval outputs")
    p.add_argument("--study", metavar="STUDY_JSON",
                   help="instead: the tables and plots of a study (the study.json of xft demo --study), written as "
                        "study.md + PNGs beside it")
    p.add_argument("--markdown", metavar="FILE",
                   help="with --study: also replace the block between FILE's <!-- study:begin --> and "
                        "<!-- study:end --> lines with the tables (e.g. docs/results.md)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from xft.errors import UserError
    from xft.pipeline.report import build_report, find_outputs, outputs_report

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
    try:
        report, summary = build_report(args.dir)
    except UserError as e:  # not a pipeline run: the outputs of single commands, if DIR holds any
        outputs = find_outputs(args.dir)
        if not outputs:
            raise UserError(f"{e}, nor any output of xft upcycle/train/merge/eval") from None
        report, summary = outputs_report(args.dir, outputs)
        print(summary + f"\n\nReport: {report}")
        return 0
    print((summary or "No evaluation has finished yet.") + f"\n\nReport: {report} "
          f"(plots in {os.path.dirname(report)}/plots)")
    return 0
