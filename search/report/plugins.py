"""Reports of runs that are not plain searches, from the packages that make them, found through entry points.

``search`` never imports the packages above it (``experiments`` runs searches, not the other way round), yet
``csl-search report <run>`` must report a robustness study's run too. A package declares, in its metadata, an entry
point in the group ``csl_search.reports`` named after the tag that marks the runs it reports, pointing to a function
``(tracking_uri, run_id, out_dir, *, n_resamples, seed, log_to_mlflow) -> search.report.build.ReportResult``.
This project declares ``csl.study = "experiments.report.build:write_study_report"`` in ``pyproject.toml``; a
checkout installed with ``pip install -e .`` (``make install``) has it. Entry points are the packaging standard
for this (the plugin is found without ``search`` naming it, and a third-party package can add a kind of run), and
the module is imported only when a run of its kind is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

GROUP = "csl_search.reports"


def installed() -> dict[str, Any]:
    """{tag: entry point} of the installed report plugins (nothing is imported yet)."""
    return {entry.name: entry for entry in metadata.entry_points(group=GROUP)}


def reporter_for(run: Any, reporters: Mapping[str, Any]) -> Callable[..., Any] | None:
    """The reporter of the first tag of ``reporters`` that ``run`` carries (an entry point is loaded), else None."""
    for tag, reporter in reporters.items():
        if tag in run.data.tags:
            return reporter.load() if hasattr(reporter, "load") else reporter  # an entry point, or a callable
    return None
