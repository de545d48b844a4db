"""The whole XFT experiment as named, resumable stages driven by a YAML recipe (`xft run`, `xft demo`).

    from xft.pipeline import load_recipe, run_pipeline
    recipe = load_recipe("minicode", ["train.max_steps=20"])   # a bundled recipe name, or a file
    run_pipeline(recipe, "runs/minicode")

Modules: `methods` (the table of models an experiment produces), `recipe`
(typed config + overrides), `stages` (the stage graph),
`runner` (skip / resume / atomic artifacts), `evaluate` (generation + sandboxed
tests), `demo` (the CPU demo's budgets and seeds). Tables and plots: `xft.pipeline.report`.
"""

from xft.pipeline.methods import METHODS, Method
from xft.pipeline.recipe import Recipe, load_recipe
from xft.pipeline.runner import run_pipeline
from xft.pipeline.stages import plan

__all__ = ["METHODS", "Method", "Recipe", "load_recipe", "plan", "run_pipeline"]
