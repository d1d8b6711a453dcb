"""Reading a study (or a plain search) back from MLflow: the report never looks at the Ray folders.

The tracking store is the one record a study leaves that is complete and shared: the study run's ``study.json``
(the design: which key is the combination, which are the conditions, the grace period, the refused cells), its
stage runs (tag ``csl.stage``), their trial runs (params under the flat config names, tag ``csl.status``) and
each trial's metric history. A run's score is its metric at its LAST epoch (the model the budget produced; the
best epoch would be chosen on the test set). Failed and diverged runs have no score and are counted as failed.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.common import PARENT_TAG, STAGE_TAG, STUDY_FILE, STUDY_TAG

SEARCH_TAG = "csl.search"
STATUS_TAG = "csl.status"
TRIAL_TAG = "csl.trial_id"
FAILED = ("failed", "diverged")


class ReportError(LookupError):
    """The run or experiment asked for does not exist, or holds nothing to report."""


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
    run: Any  # the study run, or the search run
    experiment_name: str
    design: dict[str, Any]
    stages: dict[str, Stage] = field(default_factory=dict)


def find_run(client: Any, target: str) -> Any:
    """A run by id, else the latest study run (or, without one, the latest search run) of an experiment by name."""
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        try:
            return client.get_run(target)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for a bad id
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise ReportError(f"'{target}' is neither a run id nor an experiment name "
                              f"({str(exc).splitlines()[0][:200]}); experiments: {', '.join(names)}") from None
    for tag in (STUDY_TAG, SEARCH_TAG):
        found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{tag}` LIKE '%'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    raise ReportError(f"experiment '{target}' holds no study or search run")


def _children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50_000)


def _number(text: Any) -> Any:
    """An MLflow param (a string) as int / float where it is one."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def load_trials(client: Any, experiment_id: str, parent_id: str, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of the trial runs under ``parent_id``: params, status, epochs run, last-epoch value."""
    rows, history = [], []
    for run in _children(client, experiment_id, parent_id):
        run_id = run.info.run_id
        points: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, metric):
            if m.value is None or not math.isfinite(m.value):
                continue
            if m.step not in points or m.timestamp >= points[m.step][0]:
                points[m.step] = (m.timestamp, float(m.value))
        steps = sorted(points)
        history += [{"trial": run_id, "epoch": s, "value": points[s][1]} for s in steps]
        status = run.data.tags.get(STATUS_TAG, run.info.status.lower())
        value = points[steps[-1]][1] if steps and status not in FAILED else math.nan
        row = {"run_id": run_id, "trial_id": run.data.tags.get(TRIAL_TAG, run_id), "status": status,
               "epochs": steps[-1] if steps else 0, "value": value,
               "best": max((p[1] for p in points.values()), default=math.nan),
               "error": run.data.tags.get("csl.error", "")}
        for key, text in run.data.params.items():
            row.setdefault(key, _number(text))
        rows.append(row)
    runs = pd.DataFrame(rows)
    if len(runs):
        runs = runs.sort_values("trial_id").reset_index(drop=True)
    return runs, pd.DataFrame(history, columns=["trial", "epoch", "value"])


def _study_design(client: Any, run: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="csl-report-") as folder:
        try:
            path = client.download_artifacts(run.info.run_id, STUDY_FILE, folder)
        except Exception as exc:  # noqa: BLE001
            raise ReportError(f"study run {run.info.run_id} has no {STUDY_FILE}: {exc}") from None
        return json.loads(Path(path).read_text())


def load(tracking_uri: str, target: str) -> Loaded:
    """The study run (its design and every stage's trials), or a plain search run dressed as a one-stage design."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = find_run(client, target)
    experiment_id = run.info.experiment_id
    experiment_name = client.get_experiment(experiment_id).name
    tags = run.data.tags
    if STUDY_TAG in tags:
        design = _study_design(client, run)
        loaded = Loaded(tracking_uri, run, experiment_name, design)
        metric = design.get("metric", "knn_acc")
        for child in _children(client, experiment_id, run.info.run_id):
            stage = child.data.tags.get(STAGE_TAG)
            if stage is None:
                continue
            runs, history = load_trials(client, experiment_id, child.info.run_id, metric)
            loaded.stages[stage] = Stage(stage, child, dict(design.get("stages", {}).get(stage, {})), runs, history)
        if not loaded.stages:
            raise ReportError(f"study run {run.info.run_id} has no stage runs (did its searches start?)")
        return loaded
    if SEARCH_TAG not in tags:
        raise ReportError(f"run {run.info.run_id} is neither a study run ({STUDY_TAG}) nor a search ({SEARCH_TAG})")
    metric = tags.get("csl.metric", "knn_acc")
    params = run.data.params
    design = {"kind": "search", "title": f"Search {run.info.run_name}", "metric": metric,
              "mode": tags.get("csl.mode", "max"), "stages": {"search": {
                  "role": "search", "scheduler": params.get("scheduler", "?"), "searcher": params.get("searcher", "?"),
                  "grace_period": None, "epochs": _number(params.get("max_epochs", "0"))}}}
    runs, history = load_trials(client, experiment_id, run.info.run_id, metric)
    loaded = Loaded(tracking_uri, run, experiment_name, design)
    loaded.stages["search"] = Stage("search", run, design["stages"]["search"], runs, history)
    return loaded


def default_out(loaded: Loaded) -> Path:
    """The study's (or search's) own folder when it is a local one, so the report sits beside the runs."""
    folder = loaded.run.data.tags.get("csl.study_folder") or loaded.run.data.tags.get(SEARCH_TAG)
    if folder and "://" not in folder and Path(folder).is_dir():
        return Path(folder) / "report"
    return Path("reports") / loaded.run.info.run_name
