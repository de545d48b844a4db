"""`xft report DIR`: (re)build the report of a run of `xft run` or `xft demo`, finished or not, or of the
outputs of `xft upcycle/train/merge/eval` made by hand (DIR one of them, or a folder of them)."""

from __future__ import annotations

import argparse
import json
import os

REPORT = "report.md"
RESULTS = "results.json"  # what `xft eval --out DIR` writes (xft.eval.report)
TRAINING = "xft_training.json"  # what a finished `xft train` / `xft merge` writes beside the weights


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


# ---------------------------------------------------------------- outputs of single commands

def find_outputs(path: str, depth: int = 2) -> list[str]:
    """`path` and the directories under it (`depth` levels) that an xft command wrote: a model directory
    of upcycle/train/merge (its run file, finished or not) or an evaluation (results.json)."""
    from xft.training.rundir import RUN_FILE

    if not os.path.isdir(path):
        return []
    found = [path] if any(os.path.isfile(os.path.join(path, f)) for f in (RUN_FILE, RESULTS)) else []
    if depth > 0:
        for name in sorted(os.listdir(path)):
            sub = os.path.join(path, name)
            if os.path.isdir(sub) and not os.path.islink(sub) and not name.startswith((".", "checkpoint-")):
                found += find_outputs(sub, depth - 1)
    return found


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def model_row(directory: str) -> list[str] | None:
    """| output | command | state | made from | steps | final training loss | final validation loss |"""
    from xft.training.rundir import COMMANDS, RunDir

    run = RunDir(directory)
    record = _read(run.run_file)
    if not record:
        return None
    history = _read(os.path.join(directory, TRAINING)).get("log_history", [])
    last = lambda key: next((f"{h[key]:.4f}" for h in reversed(history) if key in h), "-")  # noqa: E731
    steps = max((h.get("step", 0) for h in history), default=0)
    if run.is_finished():
        state = "finished"
    else:
        done = run.last_checkpoint()
        state = f"interrupted (checkpoint {os.path.basename(done)})" if done else "started, no checkpoint"
    stage = record.get("stage", "?")
    method = f" ({record['method']})" if stage == "merge" and record.get("method") else ""
    source = record.get("model") or record.get("moe") or "-"
    return [directory, f"xft {COMMANDS.get(stage, stage)}{method}", state, f"`{source}`",
            str(steps) if steps else "-", last("loss"), last("eval_loss")]


def eval_row(directory: str) -> list[str] | None:
    """| output | benchmark | model | pass@1 | tasks |"""
    results = _read(os.path.join(directory, RESULTS))
    if "benchmark" not in results:
        return None
    model = results.get("model") or (f"samples {results['samples_file']}" if results.get("samples_file") else "-")
    score = results.get("pass@1")
    return [directory, results["benchmark"], f"`{model}`", f"{100 * score:.1f}" if score is not None else "-",
            str(results.get("n_tasks", "-"))]


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def outputs_report(path: str, outputs: list[str]) -> tuple[str, str]:
    """Write `path`/report.md: a table of the models and one of the evaluations in `outputs`; return (its path,
    the evaluations' table, or the models' when there is none)."""
    from xft.artifacts import atomic_write_text

    shown = lambda d: os.path.relpath(d, path) if d != path else "."  # noqa: E731
    models = [[shown(r[0]), *r[1:]] for r in map(model_row, outputs) if r]
    evals = [[shown(r[0]), *r[1:]] for r in map(eval_row, outputs) if r]
    parts = [f"# xft outputs in {os.path.abspath(path)}", ""]
    model_table = _table(["output", "command", "state", "made from", "steps", "final training loss",
                          "final validation loss"], models)
    eval_table = _table(["output", "benchmark", "model", "pass@1 (%)", "tasks"], evals)
    if models:
        parts += ["## Models", "", model_table, ""]
    if evals:
        parts += ["## Evaluations", "", eval_table, ""]
    report = os.path.join(path, REPORT)
    atomic_write_text(report, "\n".join(parts))
    return report, eval_table if evals else model_table
