"""Reading a search back from MLflow: the report (and ``csl-search compare``) never look at the Ray folders.

The tracking store is the one record a search leaves that is complete and shared: the parent run (tag
``csl.search``; its params hold the options, the budget, the scheduler's parameters and the data sets:
``search.tracking.start_parent_run``), its trial runs (params under the flat config names, tag ``csl.status``) and
each trial's metric history. Each trial gets its ``best`` value and ``best_epoch`` (``search.best``: the one
meaning of best) and its ``final`` value, the metric at its last epoch (the robustness studies score a run by it;
failed and diverged runs have none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from search import best
from search.parent_params import DATA_KEYS
from search.tracking import PARENT_TAG, SEARCH_TAG, STATUS_TAG, TRIAL_TAG

FAILED = ("failed", "diverged")


class ReportError(LookupError):
    """The run or experiment asked for does not exist, or holds nothing to report."""


@dataclass
class TrialRecord:
    """One trial run as MLflow holds it: params as logged (strings), the metric's history, its best and final."""

    run_id: str
    trial_id: str
    status: str
    epochs: int
    params: dict[str, str]
    tags: dict[str, str]
    points: list[tuple[int, float]]  # (epoch, value) of the metric, finite values only, by epoch
    best: best.Best
    final: float  # the value at the last epoch with one; nan for failed and diverged runs
    error: str


@dataclass
class Stage:
    name: str
    run: Any
    info: dict[str, Any]
    runs: pd.DataFrame  # one row per trial run
    history: pd.DataFrame  # trial, epoch, value


@dataclass
class Loaded:
    tracking_uri: str
    run: Any  # the search run (or a study's run)
    experiment_name: str
    design: dict[str, Any]
    stages: dict[str, Stage] = field(default_factory=dict)


def children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50_000)


def latest_run(client: Any, experiment_id: str, tags: Sequence[str], *, top_level: bool = False) -> Any | None:
    """The newest run of an experiment carrying one of ``tags`` (a run without a parent, with ``top_level``)."""
    found = []
    for tag in tags:
        found += client.search_runs([experiment_id], filter_string=f"tags.`{tag}` LIKE '%'",
                                    order_by=["attributes.start_time DESC"], max_results=1000 if top_level else 1)
    if top_level:
        found = [run for run in found if PARENT_TAG not in run.data.tags]
    return max(found, key=lambda run: run.info.start_time, default=None)


def find_run(client: Any, target: str, tags: Sequence[str]) -> Any:
    """A run by id, else the newest top-level run of the experiment named ``target`` that carries one of ``tags``."""
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        try:
            return client.get_run(target)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for a bad id
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise ReportError(f"'{target}' is neither a run id nor an experiment name "
                              f"({str(exc).splitlines()[0][:200]}); experiments: {', '.join(names)}") from None
    run = latest_run(client, experiment.experiment_id, tags, top_level=True)
    if run is None:
        raise ReportError(f"experiment '{target}' holds no run to report (a top-level run tagged "
                          f"{' or '.join(tags)})")
    return run


def metric_points(client: Any, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of a run's metric: the latest value logged at each step, finite values only, by epoch."""
    points: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.value is None or not math.isfinite(m.value):
            continue
        if m.step not in points or m.timestamp >= points[m.step][0]:
            points[m.step] = (m.timestamp, float(m.value))
    return [(step, points[step][1]) for step in sorted(points)]


def trial_records(client: Any, experiment_id: str, parent_id: str, metric: str, mode: str) -> list[TrialRecord]:
    """The trial runs under ``parent_id``, by trial id."""
    records = []
    for run in children(client, experiment_id, parent_id):
        run_id, tags = run.info.run_id, run.data.tags
        points = metric_points(client, run_id, metric)
        status = tags.get(STATUS_TAG, run.info.status.lower())
        epochs = tags.get("csl.epochs_run")
        records.append(TrialRecord(
            run_id=run_id, trial_id=tags.get(TRIAL_TAG, run_id), status=status,
            epochs=int(epochs) if epochs and epochs.isdigit() else (points[-1][0] if points else 0),
            params=dict(run.data.params), tags=dict(tags), points=points, best=best.best_of(points, mode),
            final=points[-1][1] if points and status not in FAILED else math.nan, error=tags.get("csl.error", ""),
        ))  # fmt: skip
    return sorted(records, key=lambda r: r.trial_id)


def number(text: Any) -> Any:
    """An MLflow param (a string) as int / float where it is one."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


RUN_COLUMNS = ["run_id", "trial_id", "status", "epochs", "best", "best_epoch", "final", "error"]


def load_trials(client: Any, experiment_id: str, parent_id: str, metric: str, mode: str
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of the trial runs under ``parent_id``: one row per run (``RUN_COLUMNS``, then its params
    as numbers where they are), and one per (run, epoch) with the metric's value."""
    rows, history = [], []
    for record in trial_records(client, experiment_id, parent_id, metric, mode):
        history += [{"trial": record.run_id, "epoch": epoch, "value": value} for epoch, value in record.points]
        row = {"run_id": record.run_id, "trial_id": record.trial_id, "status": record.status,
               "epochs": record.epochs, "best": record.best.value if record.best.found else math.nan,
               "best_epoch": record.best.epoch, "final": record.final, "error": record.error}
        for key, text in record.params.items():
            row.setdefault(key, number(text))
        rows.append(row)
    runs = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    return runs, pd.DataFrame(history, columns=["trial", "epoch", "value"])


def search_design(run: Any) -> dict[str, Any]:
    """The design of a plain search, from its parent run: metric, mode, budget, scheduler and its parameters."""
    tags, params = run.data.tags, run.data.params
    budget = {key.split(".", 1)[1]: number(value) for key, value in params.items() if key.startswith("budget.")}
    scheduler = {key.split(".", 1)[1]: number(value) for key, value in params.items() if key.startswith("scheduler.")}
    budget.setdefault("epochs", number(params.get("max_epochs", "0")))
    info = {"role": "search", "scheduler": params.get("scheduler", "?"), "searcher": params.get("searcher", "?"),
            "epochs": budget.get("epochs"), "grace_period": budget.get("grace_period"),
            "reduction_factor": budget.get("reduction_factor"), "num_samples": budget.get("num_samples"),
            "budget": budget, "scheduler_settings": scheduler}
    data = {key: params[key] for key in DATA_KEYS if key in params}
    return {"kind": "search", "title": f"Search {run.info.run_name}", "metric": tags.get("csl.metric", "knn_acc"),
            "mode": tags.get("csl.mode", "max"), "space": tags.get("csl.space"),
            "space_hash": tags.get("csl.space_hash"),
            "command": tags.get("csl.command"), "data": data, "stages": {"search": info}}


def load_search(client: Any, tracking_uri: str, run: Any) -> Loaded:
    """A plain search run as a one-stage design."""
    if SEARCH_TAG not in run.data.tags:
        raise ReportError(f"run {run.info.run_id} is not a csl-search run (no tag {SEARCH_TAG})")
    design = search_design(run)
    experiment_id = run.info.experiment_id
    runs, history = load_trials(client, experiment_id, run.info.run_id, design["metric"], design["mode"])
    loaded = Loaded(tracking_uri, run, client.get_experiment(experiment_id).name, design)
    loaded.stages["search"] = Stage("search", run, design["stages"]["search"], runs, history)
    return loaded


def default_out(run: Any, folder_tags: Sequence[str] = (SEARCH_TAG,)) -> Path:
    """The run's own folder (the first of ``folder_tags`` naming a local folder that exists) + ``report``, so the
    report sits beside the runs; else ``reports/<run name>``."""
    for tag in folder_tags:
        folder = run.data.tags.get(tag)
        if folder and "://" not in folder and Path(folder).is_dir():
            return Path(folder) / "report"
    return Path("reports") / run.info.run_name

