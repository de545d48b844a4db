"""MiniCode: a synthetic, execution-checked code-instruction benchmark small enough for a CPU.

Natural-language requests for small Python functions in eight families
(list filters, maps, reductions, filter-map pipelines, string transforms,
integer arithmetic, conditionals, loops), generated deterministically from a
seed, with reference solutions and unit tests computed by running them.
See docs/minicode.md for the families, splits and leakage rules.

    from xft.minicode.benchmark import load_tasks
    tasks = load_tasks(split="eval", seed=0)   # HumanEval-format dicts
"""
