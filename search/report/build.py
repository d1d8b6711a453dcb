"""Assembling report.md of a search, writing it with its plots, logging it to the run under ``report/``; and the
dispatch of ``csl-search report <target>`` (a search here, any other kind of run through ``search.report.plugins``).

A search writes its report when it ends (``end_of_search_report``, called by ``search.run``); ``write_report``
writes it again from MLflow alone, with as many bootstrap resamples as asked.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search import storage
from search.report import plugins
from search.report.mlflow_io import Loaded, ReportError, default_out, find_run, load_search
from search.report.sections import RANKING_RULE, search_section, status_counts
from search.report.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES
from search.report.tables import metric_label
from search.tracking import MAX_TAG, SEARCH_TAG

log = logging.getLogger(__name__)

WARNING_TAG = "csl.report_warning"  # on a search's parent run: why its end-of-search report was not written


@dataclass
class ReportResult:
    path: Path
    markdown: str
    headline: str
    plots: list[Path]
    run_id: str


def method_notes(n_resamples: int, seed: int) -> list[str]:
    """The notes every report ends with: intervals, what "best" means, the early-stopping check."""
    return [
        f"- Intervals: percentile bootstrap (`scipy.stats.bootstrap`, {n_resamples} resamples, RNG seed {seed}, "
        f"{int(DEFAULT_CONFIDENCE * 100)}%).",
        f"- Best: trials are {RANKING_RULE} (`search.best`: the rule of every command, the table a search prints, "
        "results.parquet, `csl-search compare` and the parent run's `csl.best_trial`).",
        "- Early-stopping check: Spearman rank correlation (average ranks for ties) between each trial's metric "
        "at the grace period and at its last epoch; below 0.5 the report warns that ASHA may prune slow starters.",
    ]


def mlflow_line(loaded: Loaded) -> str:
    """Where a report's runs live."""
    run = loaded.run
    return (f"- MLflow: experiment `{loaded.experiment_name}`, run `{run.info.run_id}` ({run.info.run_name}), "
            f"store `{loaded.tracking_uri}`")


def _setup_lines(loaded: Loaded) -> list[str]:
    design = loaded.design
    metric, mode = design.get("metric", "knn_acc"), design.get("mode", "max")
    lines = [f"# {design['title']}", "",
             f"- space `{design.get('space') or '?'}`"
             + (f" (sha256 `{design['space_hash'][:12]}`)" if design.get("space_hash") else ""),
             mlflow_line(loaded),
             f"- metric: {metric_label(metric)}, {'higher' if mode == 'max' else 'lower'} is better; each trial is "
             "scored by its best value over its epochs"]
    data = design.get("data") or {}
    if data.get("data"):
        limits = ", ".join(f"{k} {data[k]}" for k in ("train_limit", "eval_data", "eval_train_limit", "test_limit")
                           if k in data)
        lines.append(f"- data: {data['data']}" + (f" ({limits})" if limits else ""))
    if design.get("command"):
        lines.append(f"- command: `{design['command']}`")
    return lines


def build_search_report(loaded: Loaded, out: Path, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                        ) -> ReportResult:
    """Write report.md and its plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stage = loaded.stages["search"]
    lines = [*_setup_lines(loaded), "", "## Trials"]
    section = search_section(stage, loaded.design, out, n_resamples=n_resamples, seed=seed)
    lines += section.lines
    lines += ["", "## Method notes", "", *method_notes(n_resamples, seed)]
    markdown = "\n".join(lines) + "\n"
    path = out / "report.md"
    path.write_text(markdown)
    headline = [f"{loaded.design['title']}: {len(stage.runs)} trials ({status_counts(stage.runs)})",
                *section.headline]
    return ReportResult(path, markdown, "\n".join(headline), section.plots, loaded.run.info.run_id)


def write_report(tracking_uri: str, target: str, out_dir: str | Path | None = None, *,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, log_to_mlflow: bool = True,
                 reporters: Mapping[str, Any] | None = None) -> ReportResult:
    """Report ``target`` (a run id, or an experiment name: its newest top-level run) from MLflow into ``out_dir``
    (default: beside the run's folder) and log it to the run under ``report/``.

    A search run is reported here; a run that carries a tag of ``reporters`` (default: the installed plugins,
    ``search.report.plugins``) is handed to that plugin.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    reporters = plugins.installed() if reporters is None else reporters
    run = find_run(client, target, [*reporters, SEARCH_TAG])
    reporter = plugins.reporter_for(run, reporters)
    if reporter is not None:
        return reporter(tracking_uri, run.info.run_id, out_dir, n_resamples=n_resamples, seed=seed,
                        log_to_mlflow=log_to_mlflow)
    if SEARCH_TAG not in run.data.tags:
        raise ReportError(
            f"run {run.info.run_id} is not a csl-search run, and no installed report plugin (entry point group "
            f"{plugins.GROUP}) reports it; for a robustness study's run: python -m experiments.report "
            f"{run.info.run_id} (or install the checkout, pip install -e ., to make csl-search report it)"
        )
    out = Path(out_dir) if out_dir is not None else default_out(run)
    result = build_search_report(load_search(client, tracking_uri, run), out, n_resamples=n_resamples, seed=seed)
    if log_to_mlflow:
        client.log_artifacts(run.info.run_id, str(out), "report")
    return result


def end_of_search_report(tracking_uri: str, run_id: str, experiment_path: str, *,
                         n_resamples: int = DEFAULT_RESAMPLES) -> str | None:
    """The report of a search that has just ended, in ``<experiment folder>/report`` and under the parent run's
    ``report/``; its path, or None when it could not be written: a report never fails a search, the reason goes to
    the parent's tag ``csl.report_warning`` and to the log.

    The same report as ``csl-search report`` writes with its defaults: the bootstrap is cheap (a search's report
    with 10,000 resamples took about a second here, most of it matplotlib), so it is not scaled down.
    """
    try:
        if not storage.is_uri(experiment_path):
            return str(write_report(tracking_uri, run_id, Path(experiment_path) / "report", n_resamples=n_resamples,
                                    reporters={}).path)
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="csl-report-") as folder:
            write_report(tracking_uri, run_id, folder, n_resamples=n_resamples, reporters={})
            fs, base = storage.filesystem(storage.join(experiment_path, "report"))
            pafs.copy_files(folder, base, destination_filesystem=fs)
        return storage.join(experiment_path, "report/report.md")
    except Exception as exc:  # noqa: BLE001 - the search's results stand without their report
        reason = f"the report of this search was not written: {type(exc).__name__}: {exc}"
        log.warning("%s (csl-search report %s writes it again)", reason, run_id)
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=tracking_uri).set_tag(run_id, WARNING_TAG, reason[:MAX_TAG])
        except Exception:  # noqa: BLE001 - never hide the search's end behind the tracking store's trouble
            log.exception("could not tag MLflow run %s", run_id)
        return None
