"""The robustness studies' report: ``python -m experiments.report <experiment name | run id>``, and
``csl-search report`` on a study run (through the entry point ``csl_search.reports: csl.study``, see
``search.report.plugins``). Markdown with tables and PNG plots, logged to the study run under ``report/``.

Everything comes from the tracking store, never from the Ray folders: the study run's ``study.json`` (the design),
its stage runs (tag ``csl.stage``), their trial runs and each trial's metric history. A robustness stage scores a
run by its ``final`` value, its metric at its LAST epoch (the model the budget produced; the best epoch would be
chosen on the test set); a search stage ranks its trials by their best epoch (``search.best``). Failed and diverged
runs have no final value and are counted as failed.

Modules: ``study`` (reading a study run back), ``plots`` (heatmaps, robustness bars), ``sections`` (the robustness
section), ``yadim`` (the rediscovered combination next to YADIM), ``build`` (report.md of a study, and the plugin
``write_study_report``), ``cli`` (``python -m experiments.report``, which reports plain searches too). What every
report shares (statistics, tables, the search section, reading runs) is ``search.report``.
"""
