"""MLflow for a search: the tracking store, the parent run, and reading the child runs back.

One search = one MLflow parent run (tags: space file hash, git commit, command line, Ray / torch / MLflow versions;
the space file as an artifact; at the end results.parquet and history.parquet); one trial = one nested child run,
written by ``search.callback.MlflowTrialCallback``.

The store defaults to SQLite in the search's storage folder (MLflow 3.17 refuses the plain file store);
``check_reachable`` fails in seconds, before Ray starts, when a tracking server does not answer."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from search.status import ENDED, EPOCH_METRICS, INTERRUPTED, MAX_TAG, NODE_KEYS, RUN_STATUS

log = logging.getLogger(__name__)

TRIAL_TAG = "csl.trial_id"
STATUS_TAG = "csl.status"
ERROR_TAG = "csl.error"
PARENT_TAG = "mlflow.parentRunId"
SEARCH_TAG = "csl.search"  # marks a parent (search) run: value = the Ray experiment folder
CONFIG_TAG = "csl.config_hash"  # a child run's trial config as proposed (config_fingerprint): set when it is created
NOTE_TAG = "mlflow.note.content"  # what MLflow's UI shows as an experiment's (or run's) description



class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached (raised before any compute is spent)."""


# ---------------------------------------------------------------------------------------------------- the store


def local_tracking_uri(folder: str | Path) -> str:
    """The default store: SQLite in the search's storage folder (MLflow 3.17 refuses the plain file store)."""
    return f"sqlite:///{Path(folder).expanduser().resolve() / 'mlflow.db'}"


@contextmanager
def _quick_http(timeout_s: int):
    """Make MLflow's HTTP client give up in seconds instead of ~4 minutes of retries (its defaults: 7, 120 s)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_reachable(uri: str, timeout_s: int = 15, *, given: bool = True) -> None:
    """Fail fast, with one line naming the store, when the tracking store does not answer.

    ``given``: the user named the store (``--mlflow-uri``); else it is the default SQLite file in the storage folder.
    """
    from mlflow import MlflowClient

    with _quick_http(timeout_s):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if uri.startswith(("http://", "https://")):
                hint = ("start it (mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db) "
                        "or leave out --mlflow-uri to track into a SQLite file in the storage folder")  # fmt: skip
            else:
                hint = "allowed: a store you can write" + ("" if given else " (the default lives in --storage)")
            which = "--mlflow-uri" if given else "the default MLflow store"
            raise TrackingUnavailable(f"{which} {uri}: cannot open it ({first[:300]}); {hint}") from None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local SQLite store (``<db>.lock``) while a search creates or migrates it.

    MLflow creates a new SQLite store's tables on first use; two searches doing that at once race (alembic:
    "_alembic_tmp_experiments already exists"), as do two creating the same experiment. Other stores: no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(client: Any, name: str, artifact_location: str | None, description: str = "") -> str:
    """The id of the MLflow experiment ``name``, created (or restored from the trash) when needed.

    ``description`` (the space's) becomes the experiment's description in MLflow's UI (the tag
    ``mlflow.note.content``) when the experiment is created, or when an existing one has none: a description
    someone wrote in the UI is never overwritten. Another search may create the experiment between the look-up and
    the creation: then its id is looked up again.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {NOTE_TAG: description} if description else None
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
        except Exception:  # noqa: BLE001 - MlflowException RESOURCE_ALREADY_EXISTS, or the store's integrity error
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if description and not experiment.tags.get(NOTE_TAG):
        client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, description)
    return experiment.experiment_id


def runs_url(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow 3 UI's page of an experiment's runs (or of one run), in its "Model training" view.

    MLflow 3.17 opens an experiment on its GenAI view (Traces); its bundled UI (``getExperimentPageTabRoute``,
    ``experimentPageTabRuns``) reads the view from the ``workflowType`` query parameter.
    """
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}{'/' + run_id if run_id else ''}?workflowType=machine_learning"


def compare_url(server: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of ``run_ids`` (parallel coordinates, metric and param tables)."""
    from urllib.parse import quote

    runs, experiments = json.dumps(list(run_ids)), json.dumps([experiment_id])
    return f"{server.rstrip('/')}/#/compare-runs?runs={quote(runs)}&experiments={quote(experiments)}"


def trial_run_name(params: Mapping[str, Any], trial_id: str) -> str:
    """A trial's MLflow run name: its five aspects as it trains (presets filled in) and a short id.

    ``simclr·resnet18·last_vector·cosine·infonce·a47a``: what the trial is, readable in the runs table and the
    compare view; the short id (the trial id's first four characters) tells apart trials of one design with other
    hyperparameters. ``csl.trial_id`` holds the whole id.
    """
    from search.space.schema import ASPECT_KEYS

    parts = [str(params.get(key) or "-") for key in ASPECT_KEYS]
    return "·".join([*parts, str(trial_id)[:4]])


def git_commit(folder: str | Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def start_parent_run(
    client: Any,
    experiment_id: str,
    *,
    space: Any,
    run_name: str,
    experiment_path: str,
    command: str,
    params: Mapping[str, Any],
    repo: str | Path,
) -> str:
    """Create the search's parent run with its provenance tags, its options and setup as params
    (``search.parent_params``), the space as artifact, its data sets as MLflow dataset inputs."""
    from search.parent_params import search_datasets, setup_params

    datasets = search_datasets(space)
    params = {**params, **setup_params(space, params, datasets)}
    tags = {
        SEARCH_TAG: experiment_path,
        "csl.space": space.name,
        "csl.space_path": str(space.path),
        "csl.space_hash": space.content_hash,
        "csl.command": command[:MAX_TAG],
        "csl.metric": space.metric,
        "csl.mode": space.mode,
        "csl.ray_version": version("ray"),
        "csl.torch_version": version("torch"),
        "csl.mlflow_version": version("mlflow"),
        "mlflow.source.name": "csl-search",
    }
    commit = git_commit(repo)
    if commit:
        tags["csl.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in sorted(params.items())])
    client.log_text(run_id, space.text, f"space/{Path(str(space.path)).name}")
    inputs = [found for found in (dataset_input(d) for d in datasets) if found is not None]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return run_id


def reopen_run(client: Any, run_id: str) -> None:
    client.update_run(run_id, status="RUNNING")


# ---------------------------------------------------------------------------------------------------- helpers


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of a trial config as the searcher proposed it.

    A resumed search replays the proposals its driver made after the last experiment snapshot; the replay of a
    trial Tune lost has a new Ray trial id but the same config, and this is what finds the lost trial's run
    (``search.callback``). A tag set in ``create_run`` itself, so a run never exists without it.
    """
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolved_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config filled from its preset and the trainer defaults, as the trainer will see it.

    ``csl.config.resolve`` also checks every name against the registries, which needs the aspect packages
    (and torch) imported; the driver only needs the values, so it merges the same public tables itself and
    falls back to the raw config if they are missing.
    """
    try:
        from csl.config import TRAINER_DEFAULTS
        from csl.presets import PRESETS
    except Exception:  # noqa: BLE001
        return dict(config)
    merged = dict(TRAINER_DEFAULTS)
    method = config.get("method")
    if method in PRESETS:
        merged.update(PRESETS[method])
    merged.update({k: v for k, v in config.items() if v is not None})
    return merged


def dataset_input(config: Mapping[str, Any]) -> Any | None:
    """The trial's data set as an MLflow ``DatasetInput`` (metadata only: name, where it lives, the limits)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    spec = str(config.get("data") or "cifar10-mini")
    kind, sep, path = spec.partition(":")
    if sep and kind in ("parquet", "imagefolder"):
        location = path
    elif spec == "cifar10-mini":
        import importlib.util

        found = importlib.util.find_spec("csl")
        folders = list(found.submodule_search_locations or []) if found else []
        location = str(Path(folders[0]) / "_data" / "cifar10-mini") if folders else spec
    else:
        root = config.get("data_root") or os.environ.get("CSL_DATA") or "~/.cache/csl/data"
        location = str(Path(str(root)).expanduser() / spec)
    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(location)
        dataset = MetaDataset(source, name=spec)
        tags = [InputTag("mlflow.data.context", "train")]
        for key in ("train_limit", "test_limit"):
            if config.get(key) is not None:
                tags.append(InputTag(f"csl.{key}", str(config[key])))
        return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)
    except Exception as exc:  # noqa: BLE001 - a data set we cannot describe is not worth failing a trial for
        log.warning("not logging data set %s as an MLflow input: %s", spec, exc)
        return None


# ---------------------------------------------------------------------------------------------------- reading back


def trial_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The child runs of a search (one per trial)."""
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=50_000
    )


def run_columns(runs: list[Any]) -> dict[str, dict[str, Any]]:
    """Per Ray trial id: its MLflow run id (and its variant, for a neighbourhood space), for results.parquet."""
    columns: dict[str, dict[str, Any]] = {}
    for run in runs:
        if TRIAL_TAG in run.data.tags:
            row = {"mlflow_run_id": run.info.run_id}
            if "variant" in run.data.params:
                row["variant"] = run.data.params["variant"]
            columns[run.data.tags[TRIAL_TAG]] = row
    return columns


def ended_results(runs: list[Any]) -> dict[str, dict[str, Any]]:
    """{Ray trial id: last result as its run holds it} for the trials that ended (finished, stopped, diverged)."""
    ended: dict[str, dict[str, Any]] = {}
    for run in runs:
        tags, status = run.data.tags, run.data.tags.get(STATUS_TAG)
        if TRIAL_TAG not in tags or status not in ENDED or run.info.status == "RUNNING":
            continue
        result: dict[str, Any] = {name: run.data.metrics.get(name, math.nan) for name in EPOCH_METRICS}
        if status == "diverged":
            result.update(ssl_loss=math.nan, error=tags.get(ERROR_TAG, "loss became NaN/inf"))
        result.update(epoch=int(tags.get("csl.epochs_run") or 0), diverged=int(status == "diverged"))
        result.update({key: tags.get(f"csl.{key}", "") for key in NODE_KEYS})
        ended[tags[TRIAL_TAG]] = result
    return ended


def backfill_history(client: Any, trials: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """Add epochs missing from Tune's result files (a trial that ended just before its driver died) from MLflow."""
    have: dict[str, set[int]] = {}
    for row in history:
        have.setdefault(row["trial_id"], set()).add(row["epoch"])
    for trial in trials:
        missing = set(range(1, int(trial["epochs"] or 0) + 1)) - have.get(trial["trial_id"], set())
        if not missing or not trial.get("mlflow_run_id"):
            continue
        rows = {e: {"trial_id": trial["trial_id"], "epoch": e, "diverged": 0} for e in sorted(missing)}
        for name in EPOCH_METRICS:
            for metric in client.get_metric_history(trial["mlflow_run_id"], name):
                if metric.step in rows:
                    rows[metric.step][name] = metric.value
                    rows[metric.step]["timestamp"] = metric.timestamp // 1000
        history.extend(rows.values())
    history.sort(key=lambda r: (r["trial_id"], r["epoch"]))


def finish_parent(
    client: Any, run_id: str, *, files: list[str], counts: Mapping[str, int], best: Any, interrupted: bool,
    step: int = 0,
) -> None:  # fmt: skip
    """End the parent run: the tables as artifacts, trial counts and the best trial, the status.

    ``best``: a ``search.best.BestTrial`` (or None): tags ``csl.best_trial``, ``csl.best_run_id``,
    ``csl.best_epoch``, metrics ``best_<metric>`` and ``best_epoch``. ``step``: how many times the search was
    resumed (the metrics of each end sit at their own step).
    """
    from mlflow.entities import Metric

    for path in files:
        client.log_artifact(run_id, path, "results")
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"trials_{status}", float(n), stamp, step) for status, n in counts.items()]
    metrics.append(Metric("trials", float(sum(counts.values())), stamp, step))
    if best is not None:
        metrics += [Metric(f"best_{best.metric}", best.value, stamp, step),
                    Metric("best_epoch", float(best.epoch), stamp, step)]
        client.set_tag(run_id, "csl.best_trial", best.trial_id)
        client.set_tag(run_id, "csl.best_epoch", str(best.epoch))
        if best.run_id:
            client.set_tag(run_id, "csl.best_run_id", best.run_id)
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, "csl.search_status", INTERRUPTED if interrupted else "finished")
    client.set_terminated(run_id, status=RUN_STATUS[INTERRUPTED] if interrupted else "FINISHED")


def abandon_parent(tracking_uri: str, run_id: str, exc: BaseException) -> None:
    """Mark the parent run when the driver itself fails: failed with the reason, or interrupted (Ctrl-C, SIGTERM:
    the search can be resumed)."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        interrupted = isinstance(exc, KeyboardInterrupt)
        client.set_tag(run_id, "csl.search_status", INTERRUPTED if interrupted else "failed")
        if not interrupted:
            client.set_tag(run_id, "csl.error", f"{type(exc).__name__}: {exc}"[:MAX_TAG])
        client.set_terminated(run_id, status=RUN_STATUS[INTERRUPTED] if interrupted else "FAILED")
    except Exception:  # noqa: BLE001 - never hide the original error
        log.exception("could not mark MLflow run %s", run_id)
