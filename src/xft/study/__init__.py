"""A seed-paired study of every method under one protocol (`xft demo --study`), above the pipeline it drives.

    from xft.study import run_study, study_report
    run_study("minicode-study", "runs/study", jobs=2)     # tune on validation, then every method × seed
    study_report("runs/study/study.json")                 # tables and plots from study.json alone

Modules: `design` (the protocol: tuning grids, choices, the runs and their
scheduling), `collect` (what study.json records: results, diagnostics, merge
gaps, provenance), `report` (the tables, claims and plots computed from
study.json; the statistics are `xft.stats`).
"""

from xft.study.design import STUDY_FILE, STUDY_RECIPE, run_study
from xft.study.report import study_report

__all__ = ["STUDY_FILE", "STUDY_RECIPE", "run_study", "study_report"]
