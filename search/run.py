"""Run (and resume) a search: a ``ray.tune.Tuner`` over ``search.trainable.csl_trial``, tracked in MLflow.

``run_search(space, options)`` is what ``csl-search run`` calls, ``resume_search(path)`` what ``csl-search resume``
calls; both return a ``SearchOutcome`` (paths, ranked rows, the text to print).

The order of a run: check the tracking store (seconds, before any compute), build the searcher and scheduler,
create the MLflow parent run, write ``csl_search.json`` into the experiment folder, start Ray, fit, write
``results.parquet`` / ``history.parquet`` (also logged to the parent run), write the search's report
(``search.report``: ``<experiment folder>/report/``, logged to the parent under ``report/``), end the parent run
(its best trial by ``search.best``), stop Ray.

The experiment folder ``<storage>/<name>/`` holds Ray's state and checkpoints plus ``csl_search.json`` (the MLflow
parent run id, tracking URI, resources and budget: what a resume needs), a copy of the space file, and the tables.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from search import storage
from search.schedulers import SCHEDULERS
from search.status import FINAL
from search.trainable import ENDED_FILE, ended_lines  # trials that must not train again: resume writes it

SEARCHERS = ("optuna", "random", "grid")
STATE_FILE = "csl_search.json"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE = "runs"
DEFAULT_NUM_SAMPLES = 8


@dataclass
class SearchOptions:
    """How to run a search. Defaults are those of ``csl-search run``."""

    scheduler: str = "asha"
    searcher: str = "optuna"
    num_samples: int | None = None  # default: every allowed combination for grid, else budget.num_samples, else 8
    max_concurrent: int | None = None  # default: the space's budget.max_concurrent_trials, else as resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    storage: str = DEFAULT_STORAGE
    name: str | None = None
    address: str | None = None
    num_cpus: int | None = None  # size of a local Ray instance (default: all cores)
    seed: int = 0
    max_failures: int = 2
    mlflow_uri: str | None = None
    experiment: str | None = None
    verbose: int = 1


@dataclass
class SearchOutcome:
    experiment_path: str
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    results_path: str
    history_path: str
    metric: str
    mode: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    wall_time_s: float = 0.0
    report_path: str | None = None  # the report written at the end (None: it failed; the parent says why)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.trials:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    def unfinished(self) -> int:
        return sum(row["status"] not in FINAL for row in self.trials)

    def report(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        lines = [
            f"search {self.experiment_path}: {len(self.trials)} trials ({counts}) in {self.wall_time_s:.0f} s",
            f"ranked by best {self.metric} ({self.mode}):",
            self.table,
            "",
            f"results: {self.results_path}",
            f"history: {self.history_path}",
            f"report:  {self.report_path or 'not written (see the parent run tag csl.report_warning)'}",
            f"MLflow: experiment '{self.experiment_name}', parent run {self.parent_run_id}",
        ]
        if self.tracking_uri.startswith(("http://", "https://")):
            lines.append(f"open it: {self.tracking_uri}/#/experiments")
        else:
            lines.append(f"open it: mlflow ui --backend-store-uri {self.tracking_uri}")
        lines.append(f"compare: csl-search compare --mlflow-uri {self.tracking_uri} --parent-run {self.parent_run_id}")
        if self.unfinished():
            lines.append(f"{self.unfinished()} trials unfinished: csl-search resume {self.experiment_path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- pieces


def max_epochs_of(space: Any) -> int:
    return int(space.budget["epochs"])


def shown_columns(space: Any) -> list[str]:
    """Columns of the ranking table: the space's searched aspects, then its other dimensions."""
    return list(dict.fromkeys([*space.aspects(), *space.dimensions]))


def init_ray(
    address: str | None, num_cpus: int | None, gpus_per_trial: float = 0.0, *, env: Mapping[str, str] | None = None
) -> bool:
    """Start a local Ray instance (or connect to ``address``); True when this call started it.

    ``gpus_per_trial`` is accepted for callers that pass it (the local instance detects the GPUs itself);
    ``env``: more environment variables for the trials' workers.
    """
    import ray

    # CheckpointConfig(num_to_keep=1) makes Tune snapshot the experiment after every reported checkpoint, which a
    # resume wants (the snapshot is never behind the trials' checkpoints); Tune warns each time: hush that.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    # Workers import search.trainable and csl by name: make this checkout importable wherever they start.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, **(env or {})}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # 2.60 turns token auth on by default (stack.md)
        # "local": always a new instance, never one that `ray start` left running on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    return True


def _check_fits(resources: Mapping[str, float]) -> None:
    """A local instance never grows: refuse a trial it could never place (Tune would wait forever)."""
    import ray

    have = ray.cluster_resources()
    for key, name in (("cpu", "CPU"), ("gpu", "GPU")):
        if resources.get(key, 0) > have.get(name, 0):
            raise ValueError(
                f"a trial asks for {resources[key]:g} {name}s but this machine's Ray instance has "
                f"{have.get(name, 0):g}; lower --{key}s-per-trial or connect to a cluster with --address"
            )


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Ray's default name spells out the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def _trainable(resources: Mapping[str, float]) -> Any:
    from ray import tune

    from search.trainable import csl_trial

    return tune.with_resources(csl_trial, dict(resources))


def _run_config(state: Mapping[str, Any], callback: Any, verbose: int) -> Any:
    from ray import tune

    from search.results import FinalStatus

    # Keep the latest checkpoint only (epochs of a big encoder add up), except under PBT, which clones other
    # trials' checkpoints and wants them kept a little longer (Tune warns below 3).
    keep = 3 if state["options"]["scheduler"] == "pbt" else 1
    return tune.RunConfig(
        name=state["name"],
        storage_path=state["storage"],
        callbacks=[callback, FinalStatus()],
        failure_config=tune.FailureConfig(max_failures=int(state["max_failures"])),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        verbose=verbose,
    )


# ---------------------------------------------------------------------------------------------------- run / resume


def run_search(space: Any, options: SearchOptions, *, command: str | None = None) -> SearchOutcome:
    """Run a whole search over ``space`` (a loaded ``search.space.Space``)."""
    from mlflow import MlflowClient

    from search.callback import MlflowTrialCallback
    from search.tracking import check_reachable, ensure_experiment, local_tracking_uri, start_parent_run

    if options.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{options.scheduler}'; choose one of: {', '.join(SCHEDULERS)}")
    if options.searcher not in SEARCHERS:
        raise ValueError(f"unknown searcher '{options.searcher}'; choose one of: {', '.join(SEARCHERS)}")
    started = time.time()
    root = storage.normalise(options.storage)
    local = not storage.is_uri(root)
    name = options.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_path = storage.join(root, name)
    if local:
        Path(root).mkdir(parents=True, exist_ok=True)
    tracking_uri = options.mlflow_uri or local_tracking_uri(root if local else ".")
    check_reachable(tracking_uri)  # before any compute

    from ray import tune

    from search.schedulers import build_scheduler, initial_population
    from search.searchers import make_searcher

    budget = dict(space.budget)
    max_epochs = max_epochs_of(space)
    searcher = make_searcher(options.searcher, space, max_epochs=max_epochs, seed=options.seed)
    if options.searcher == "grid":
        num_samples = min(options.num_samples or searcher.allowed(), searcher.allowed())
    else:
        num_samples = int(options.num_samples or budget.get("num_samples") or DEFAULT_NUM_SAMPLES)
    max_concurrent = options.max_concurrent or budget.get("max_concurrent_trials")
    param_space: dict[str, Any] = {}  # the searchers return whole configs
    if options.scheduler == "pbt":
        search_alg, param_space = initial_population(searcher, num_samples, max_concurrent)
    elif max_concurrent:
        from ray.tune.search import ConcurrencyLimiter

        search_alg = ConcurrencyLimiter(searcher, max_concurrent=int(max_concurrent))
    else:
        search_alg = searcher
    scheduler = build_scheduler(options.scheduler, space, max_epochs, options.seed)
    resources = {"cpu": float(options.cpus_per_trial)}
    if options.gpus_per_trial:
        resources["gpu"] = float(options.gpus_per_trial)

    started_ray = init_ray(options.address, options.num_cpus)
    parent_run_id = None
    try:
        if started_ray and not options.address:
            _check_fits(resources)
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_name = options.experiment or space.name
        # A SQLite store keeps artifacts under the experiment's location: put it beside the database.
        artifact_location = storage.join(root, "mlartifacts") if local and tracking_uri.startswith("sqlite") else None
        experiment_id = ensure_experiment(client, experiment_name, artifact_location)
        command = command or " ".join(shlex.quote(a) for a in sys.argv)
        params = {k: v for k, v in asdict(options).items() if v is not None}
        params.update(num_samples=num_samples, experiment_path=experiment_path, max_epochs=max_epochs)
        parent_run_id = start_parent_run(
            client, experiment_id, space=space, run_name=name, experiment_path=experiment_path, command=command,
            params=params, repo=REPO,
        )  # fmt: skip
        state = {
            "name": name,
            "storage": root,
            "experiment_path": experiment_path,
            "tracking_uri": tracking_uri,
            "experiment_name": experiment_name,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
            "metric": space.metric,
            "mode": space.mode,
            "max_epochs": max_epochs,
            "resources": resources,
            "max_failures": options.max_failures,
            "address": options.address,
            "num_cpus": options.num_cpus,
            "shown": shown_columns(space),
            "space_name": space.name,
            "space_hash": space.content_hash,
            "options": asdict(options),
            "num_samples": num_samples,
            "command": command,
        }
        storage.write_text(storage.join(experiment_path, STATE_FILE), json.dumps(state, indent=2, default=str))
        storage.write_text(storage.join(experiment_path, f"space-{Path(str(space.path)).name}"), space.text)
        callback = MlflowTrialCallback(
            tracking_uri, experiment_id, parent_run_id, metric=space.metric, max_epochs=max_epochs,
            searched=list(space.dimensions), space=space,
        )  # fmt: skip
        tuner = tune.Tuner(
            _trainable(resources),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=num_samples,
                time_budget_s=budget.get("time_budget_s"),
                reuse_actors=True,  # one worker per slot imports torch once (stack.md)
                trial_dirname_creator=trial_dirname,
            ),
            run_config=_run_config(state, callback, options.verbose),
        )
        return _fit_and_finish(tuner, state, started)
    except BaseException as exc:
        if parent_run_id is not None:
            from search.tracking import abandon_parent

            abandon_parent(tracking_uri, parent_run_id, exc)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def load_state(experiment_path: str) -> dict[str, Any]:
    path = storage.normalise(experiment_path)
    try:
        return json.loads(storage.read_text(storage.join(path, STATE_FILE)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a csl-search experiment folder (no {STATE_FILE})") from None


def resume_search(experiment_path: str, *, address: str | None = None, num_cpus: int | None = None) -> SearchOutcome:
    """Continue an interrupted search: ended trials stay as they are, unfinished and errored ones continue.

    The restored Tuner brings the first run's searcher and scheduler state, callbacks and output settings.
    """
    from mlflow import MlflowClient
    from ray import tune

    from search.trainable import ENDED_ENV
    from search.tracking import abandon_parent, check_reachable, ended_results, reopen_run, trial_runs

    started = time.time()
    state = load_state(experiment_path)
    path = state["experiment_path"] = storage.normalise(experiment_path)  # the folder may have moved
    check_reachable(state["tracking_uri"])
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    reopen_run(client, state["parent_run_id"])
    resumes = int(client.get_run(state["parent_run_id"]).data.tags.get("csl.resumes", "0")) + 1
    client.set_tag(state["parent_run_id"], "csl.resumes", str(resumes))
    state["resumes"] = resumes
    # A trial that MLflow holds as ended may come back from Tune's snapshot as unfinished: it must not train again.
    ended_file = storage.join(path, ENDED_FILE)
    runs = trial_runs(client, state["experiment_id"], state["parent_run_id"])
    storage.write_text(ended_file, ended_lines(ended_results(runs)))
    address, num_cpus = address or state.get("address"), num_cpus or state.get("num_cpus")
    started_ray = init_ray(address, num_cpus, env={ENDED_ENV: ended_file})
    try:
        tuner = tune.Tuner.restore(
            path, trainable=_trainable(state["resources"]), resume_unfinished=True, resume_errored=True
        )
        return _fit_and_finish(tuner, state, started)
    except BaseException as exc:
        abandon_parent(state["tracking_uri"], state["parent_run_id"], exc)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _fit_and_finish(tuner: Any, state: dict[str, Any], started: float) -> SearchOutcome:
    from mlflow import MlflowClient

    from search.report.build import end_of_search_report
    from search.results import best_trial
    from search.tracking import finish_parent

    tuner.fit()
    outcome = write_results(state)
    outcome.wall_time_s = time.time() - started
    outcome.report_path = end_of_search_report(state["tracking_uri"], state["parent_run_id"], outcome.experiment_path)
    local = [] if storage.is_uri(outcome.results_path) else [outcome.results_path, outcome.history_path]
    finish_parent(
        MlflowClient(tracking_uri=state["tracking_uri"]), state["parent_run_id"], files=local, counts=outcome.counts(),
        best=best_trial(outcome.trials, outcome.metric, outcome.mode), interrupted=bool(outcome.unfinished()),
        step=int(state.get("resumes", 0)),
    )  # fmt: skip
    return outcome


def write_results(state: Mapping[str, Any]) -> SearchOutcome:
    """Read the experiment folder back and write the two tables (MLflow is only read)."""
    from mlflow import MlflowClient

    from search.results import STATUS_FILE, collect, ranking_text, score, write_tables
    from search.tracking import backfill_history, run_columns, trial_runs

    path = state["experiment_path"]
    try:
        statuses = json.loads(storage.read_text(storage.join(path, STATUS_FILE)))
    except (FileNotFoundError, ValueError):
        statuses = {}
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    runs = trial_runs(client, state["experiment_id"], state["parent_run_id"])
    trials, history = collect(path, max_epochs=int(state["max_epochs"]), extra=run_columns(runs), statuses=statuses)
    backfill_history(client, trials, history)
    score(trials, history, metric=state["metric"], mode=state["mode"])
    meta = {"csl.metric": state["metric"], "csl.mode": state["mode"], "csl.space": state.get("space_name", "")}
    results_path, history_path = write_tables(path, trials, history, meta, searched=state.get("shown", []))
    return SearchOutcome(
        experiment_path=path,
        tracking_uri=state["tracking_uri"],
        experiment_name=state["experiment_name"],
        parent_run_id=state["parent_run_id"],
        results_path=results_path,
        history_path=history_path,
        metric=state["metric"],
        mode=state["mode"],
        trials=trials,
        table=ranking_text(trials, metric=state["metric"], mode=state["mode"], shown=state.get("shown", [])),
    )
