"""One stage of a run directory in its own process: what `run_pipeline(..., jobs=N)` starts N of.

    python -m xft.pipeline.worker RUN_DIR STAGE [--device cpu] [--threads 1]

The recipe is read from RUN_DIR/recipe.yaml (the runner writes it before
starting any worker), so a worker computes exactly what the sequential runner
would. Exit status: 0 done, 2 a `UserError` (message on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Run one stage of an existing run directory; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m xft.pipeline.worker", description=__doc__.split("\n")[0])
    p.add_argument("root", help="run directory holding recipe.yaml")
    p.add_argument("stage", help="stage name, e.g. moe or eval/xft")
    p.add_argument("--device", default="cpu", help="evaluation device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of this process")
    p.add_argument("--progress", action="store_true", help="show the stage's own progress bars")
    args = p.parse_args(argv)

    from xft.errors import UserError

    try:
        import torch
        from transformers.utils import logging as hf_logging

        from xft.pipeline.recipe import load_recipe
        from xft.pipeline.runner import RECIPE_FILE, run_stage
        from xft.pipeline.stages import Context, all_stages

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        hf_logging.disable_progress_bar()
        recipe = load_recipe(os.path.join(args.root, RECIPE_FILE))
        stages = all_stages(recipe)
        if args.stage not in stages:
            raise UserError(f"unknown stage {args.stage!r}; this recipe has {', '.join(stages)}")
        ctx = Context(recipe=recipe, root=args.root, device=args.device, progress=args.progress)
        run_stage(stages[args.stage], ctx)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
