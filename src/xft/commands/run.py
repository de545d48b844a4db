"""`xft run RECIPE` and `xft demo`: thin wrappers over `xft.pipeline` and `xft.pipeline.report`.

`register` imports nothing heavy (no torch, transformers or the pipeline), so
`xft --help` and `xft run --help` stay fast; the commands import what they run.
"""

from __future__ import annotations

import argparse
import os
import shlex

from xft import recipes
from xft.device import add_threads_option, start_model_command


def run_name(recipe: str) -> str:
    """The default run directory name of RECIPE: the bundled recipe's name, or the file name without .yaml/.yml."""
    name = os.path.basename(recipe.rstrip("/\\"))
    stem, ext = os.path.splitext(name)
    return stem if ext in (".yaml", ".yml") else name  # "deepseek-coder-1.3b" is a name, not a file ".3b"


def _command(*words: str, overrides: list[str] = ()) -> str:
    """The command line as a user would retype it (recorded in the run for its report)."""
    return shlex.join([*words, *(w for o in overrides for w in ("--set", o))])


def register(subparsers) -> None:
    """Add the `run` and `demo` subcommands."""
    p = subparsers.add_parser(
        "run", help="run a whole XFT experiment from a YAML recipe (resumable stages)",
        description="Run every stage of RECIPE (base -> upcycle -> MoE SFT -> merge -> evaluate, plus the "
                    "baselines it lists) into --out. Finished stages are skipped, an interrupted one resumes; "
                    "re-run the same command after an interruption. Everything the run needs (model, data, "
                    "benchmark data, settings) is checked before any stage starts. Changing only eval.* "
                    "settings keeps the finished training stages and re-runs the evaluations they change. "
                    "Ends with a pass@1 table and OUT/report.md (rebuild it any time with xft report OUT).",
        epilog=f"Bundled recipes: {', '.join(recipes.names())} (xft/recipes/*.yaml). Multi-GPU: "
               "accelerate launch --config_file CONFIG -m xft.cli run RECIPE ...")
    p.add_argument("recipe", help="recipe file, or the name of a bundled recipe (e.g. minicode)")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. --set train.max_steps=2 --set model=/path "
                        "--set eval.data.mbpp+=FILE (values are read as YAML; repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what xft wrote in --out (stages, report, logs) and start over; needed to run "
                        "other training settings in a directory with finished or started stages")
    p.add_argument("--device", default="auto", help="evaluation device: auto (CUDA if available), cpu, cuda, ...")
    add_threads_option(p)
    p.add_argument("--jobs", type=int, default=1,
                   help="stages run at once, each in its own process with --threads divided among them (default: "
                        "1); it never oversubscribes the cores. Measured speed-ups: README, "
                        "benchmarks/bench_pipeline.py")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write OUT/report.md at the end (xft report OUT writes it later)")
    p.set_defaults(func=_run)

    p = subparsers.add_parser(
        "demo", help="the whole XFT experiment on MiniCode on a CPU, with a report and plots",
        description="Run recipes/minicode.yaml (tiny pretrained code model, MiniCode instruction data and "
                    "held-out benchmark): base, dense SFT, MoE, EWA, init / uniform / learned merges; then "
                    "print the pass@1 table and write DIR/report.md with plots (rebuild it with xft report DIR). "
                    "Minutes on a laptop CPU (measured times: docs/results.md); re-running skips what is "
                    "finished.")
    p.add_argument("--out", default="xft-demo", help="output directory (default: ./xft-demo)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fine-tuning seeds, one run each, reported as mean ± 95%% CI (default: 1, or 3 with --full)")
    p.add_argument("--full", action="store_true",
                   help="the larger budget: more training steps and every baseline incl. the ablations, "
                        "3 seeds (several times the default's time; docs/results.md)")
    p.add_argument("--study", action="store_true",
                   help="the powered study (recipe minicode-study): every method's learning rate chosen on "
                        "MiniCode's validation split with the same grid, then every method on 8 paired seeds; "
                        "writes OUT/study.json (xft report --study OUT/study.json turns it into tables). Its cost "
                        "is in docs/results.md")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the minicode recipe (as xft run --set)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what xft wrote in each seed's run directory and start over (as xft run --overwrite)")
    p.add_argument("--device", default="auto", help="evaluation device: auto (CUDA if available), cpu, cuda, ...")
    add_threads_option(p, default=1, help="CPU threads for training and generation (default: 1, what the demo's "
                                          "time budget was measured with; one thread per process is also much "
                                          "faster when the machine is busy)")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run at once, each in its own process with --threads threads (default: one per "
                        "CPU core, at most 4: the demo's independent stages)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_demo)


def _run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from xft.device import resolve_device
    from xft.pipeline import load_recipe, run_pipeline
    from xft.pipeline.report import build_report

    recipe = load_recipe(args.recipe, args.overrides)
    device = resolve_device(args.device)
    start_model_command(args.threads)
    out = args.out or os.path.join("runs", run_name(args.recipe))
    run_pipeline(recipe, out, device=device, progress=args.progress, log=print, jobs=args.jobs,
                 threads=args.threads, overwrite=args.overwrite,
                 command=_command("xft", "run", args.recipe, "--out", out, overrides=args.overrides))
    if not PartialState().is_main_process:  # under accelerate launch: one report, written by the main process
        return 0
    if not args.report:
        print(f"\nxft run: finished: {out}")
        return 0
    report, summary = build_report(out)
    print(f"\nxft run: finished.\n\n{summary}\n\nReport: {report} (plots in {os.path.dirname(report)}/plots; "
          f"results in {out}/eval/<method>/<benchmark>/results.json)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xft.device import resolve_device
    from xft.errors import UserError
    from xft.pipeline.demo import FULL_SEEDS, run_demo

    if args.study:
        return _study(args)
    seeds = args.seeds if args.seeds is not None else (FULL_SEEDS if args.full else 1)
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    device = resolve_device(args.device)
    start_model_command(args.threads)
    jobs = args.jobs if args.jobs is not None else max(1, min(4, os.cpu_count() or 1))
    words = ["xft", "demo", "--out", args.out] + (["--full"] if args.full else []) + (
        ["--seeds", str(seeds)] if args.seeds is not None else [])
    report, table = run_demo(args.out, seeds=seeds, full=args.full, device=device,
                             progress=args.progress, extra_overrides=args.overrides, jobs=jobs,
                             threads=args.threads, overwrite=args.overwrite,
                             command=_command(*words, overrides=args.overrides))
    print("\n" + table + f"\n\nReport: {report} (plots in {os.path.dirname(report)}/plots)")
    return 0


def _study(args: argparse.Namespace) -> int:
    from xft.errors import UserError
    from xft.study.design import STUDY_RECIPE, run_study
    from xft.study.report import study_report

    if args.full or args.seeds is not None:
        raise UserError("--study has its own protocol (recipe minicode-study: seeds, grid); use "
                        "--set study.seeds=N instead of --full / --seeds")
    jobs = args.jobs if args.jobs is not None else max(1, min(4, os.cpu_count() or 1))
    command = _command("xft", "demo", "--study", "--out", args.out, "--jobs", str(jobs), overrides=args.overrides)
    run_study(STUDY_RECIPE, args.out, args.overrides, jobs=jobs, command=command)
    path, text = study_report(os.path.join(args.out, "study.json"))
    print("\n" + text + f"\n\nStudy: {args.out}/study.json; report: {path}")
    return 0
