"""The report of a search: Markdown and PNG plots read back from MLflow, written when a search ends
(``search.run``) and again by ``csl-search report <experiment name | run id>``, logged to the run under
``report/``.

What a search's report holds: its setup (space, budget, scheduler and its parameters, data), its trials ranked by
their best value (``search.best``), the best trial, the marginal effect of each aspect value with bootstrap
intervals, and the early-stopping check (does the ranking at the grace period predict the ranking at the end?).

Modules, each importing only the ones before it: ``stats`` (bootstrap intervals, cells, Spearman, the
early-stopping check), ``tables`` (Markdown), ``plots`` (PNG), ``mlflow_io`` (reading the runs back), ``sections``
(the searched stage's section, and the marginals and check every section ends with), ``plugins`` (reports of other
kinds of run, e.g. the robustness studies of ``experiments.report``, found through entry points), ``build``
(report.md, the dispatch, the end-of-search report) and ``cli`` (the ``report`` subcommand). The package imports
none of them itself, so importing one never imports the rest.
"""
