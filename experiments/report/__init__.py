"""``csl-search report <experiment name | run id>``: read a study (or any search) back from MLflow and write a
Markdown report with tables and PNG plots, logged to the run as artifacts under ``report/``.

Everything comes from the tracking store, never from the Ray folders: the study run's ``study.json`` (the design:
which key is the combination, which are the conditions, the grace period, the refused cells), its stage runs
(tag ``csl.stage``), their trial runs (params under the flat config names, tag ``csl.status``) and each trial's
metric history. A run's score is its metric at its LAST epoch (the model the budget produced; the best epoch
would be chosen on the test set). Failed and diverged runs have no score and are counted as failed.

Given a plain search run (``csl-search run``, no study), the report ranks its trials and shows the marginal
effect of each design choice and the early-stopping check.

Python: ``write_report(tracking_uri, target, out_dir)``; command line: ``main(argv)`` (``python -m
experiments.report``), or ``csl-search report`` once search/cli.py forwards to ``add_arguments`` / ``run``.

Modules: ``mlflow_io`` (reading the runs back), ``tables`` (Markdown), ``plots`` (PNG), ``sections`` (the robustness
and search sections), ``yadim`` (the rediscovered combination next to YADIM), ``build`` (report.md itself), ``cli``.
"""

from experiments.report.build import ReportResult, build_report, write_report
from experiments.report.cli import add_arguments, main, run
from experiments.report.mlflow_io import Loaded, ReportError, Stage, default_out, find_run, load, load_trials
from experiments.report.plots import early_stopping_plot, heatmap, marginal_plot, robustness_bars
from experiments.report.sections import Section, robustness_section, search_section
from experiments.report.tables import ci, fmt, md_table, metric_label

__all__ = [
    "Loaded", "ReportError", "ReportResult", "Section", "Stage", "add_arguments", "build_report", "ci",
    "default_out", "early_stopping_plot", "find_run", "fmt", "heatmap", "load", "load_trials", "main",
    "marginal_plot", "md_table", "metric_label", "robustness_bars", "robustness_section", "run", "search_section",
    "write_report",
]
