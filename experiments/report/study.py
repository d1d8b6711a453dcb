"""Reading a study back from MLflow: the study run's ``study.json`` (the design: which key is the combination,
which are the conditions, the grace period, the refused cells) and its stage runs (tag ``csl.stage``), each a
search whose trial runs ``search.report.mlflow_io.load_trials`` reads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from experiments.common import STAGE_TAG, STUDY_FILE, STUDY_TAG
from search.report.mlflow_io import Loaded, ReportError, Stage, children, load_trials


def _study_design(client: Any, run: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="csl-report-") as folder:
        try:
            path = client.download_artifacts(run.info.run_id, STUDY_FILE, folder)
        except Exception as exc:  # noqa: BLE001
            raise ReportError(f"study run {run.info.run_id} has no {STUDY_FILE}: {exc}") from None
        return json.loads(Path(path).read_text())


def load_study(client: Any, tracking_uri: str, run: Any) -> Loaded:
    """The study run, its design and every stage's trials."""
    if STUDY_TAG not in run.data.tags:
        raise ReportError(f"run {run.info.run_id} is not a study run (no tag {STUDY_TAG})")
    experiment_id = run.info.experiment_id
    design = _study_design(client, run)
    loaded = Loaded(tracking_uri, run, client.get_experiment(experiment_id).name, design)
    metric, mode = design.get("metric", "knn_acc"), design.get("mode", "max")
    for child in children(client, experiment_id, run.info.run_id):
        stage = child.data.tags.get(STAGE_TAG)
        if stage is None:
            continue
        runs, history = load_trials(client, experiment_id, child.info.run_id, metric, mode)
        loaded.stages[stage] = Stage(stage, child, dict(design.get("stages", {}).get(stage, {})), runs, history)
    if not loaded.stages:
        raise ReportError(f"study run {run.info.run_id} has no stage runs (did its searches start?)")
    return loaded
