"""Run (and resume) a search: a ``ray.tune.Tuner`` over ``search.trainable.csl_trial``, tracked in MLflow.

``run_search(space, options)`` is what ``csl-search run`` calls, ``resume_search(path)`` what ``csl-search resume``
calls; both return a ``SearchOutcome`` (paths, ranked rows, the text to print).

The order of a run: check that the storage folder can be written, create the experiment folder (exclusively),
check the tracking store (seconds, before any compute), start Ray, create the MLflow parent run, write
``csl_search.json`` and a copy of the space file, build the searcher, scheduler and callbacks, fit, write
``results.parquet`` / ``history.parquet`` (also logged to the parent run), write the search's report
(``search.report``: ``<experiment folder>/report/``, logged to the parent under ``report/``), end the parent run
(its best trial by ``search.best``), stop Ray. A resume
reads ``csl_search.json`` and the space copy, checks the folder (``search.recovery``), builds the same pieces anew
and lets Tune restore its snapshot into them. Both own SIGINT and SIGTERM while they run (``search.interrupt``).

The experiment folder ``<storage>/<name>/`` holds Ray's state and checkpoints plus ``csl_search.json`` (the MLflow
parent run id, tracking URI, resources and budget: what a resume needs), a copy of the space file, the ledger of
proposed trials (``trials.jsonl``), the ended-trials file a resume hands to the trials, and the tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from search import storage
from search.interrupt import Interrupt, Interrupted
from search.local_ray import init_ray
from search.schedulers import SCHEDULERS
from search.status import FINAL
from search.trainable import ENDED_FILE, ended_lines  # trials that must not train again: resume writes it

log = logging.getLogger(__name__)

SEARCHERS = ("optuna", "random", "grid")
STATE_FILE = "csl_search.json"
SPACE_COPY = "space-{}"  # the space file as the search started, beside its state
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
    workers_per_trial: int | None = None  # Ray Train workers per trial (search.train_trial); default the space's
    mlflow_uri: str | None = None
    experiment: str | None = None
    verbose: int = 1  # 0: the final table only (-q); 1: our progress line, no Ray tables; 2: Ray's tables too (-v)
    system_metrics: bool = True  # MLflow system metrics on every trial's run (search.system_metrics)
    progress_every_s: float = 30.0  # a progress line this often when stderr is not a terminal
    register_model: str | None = None  # register the search's best model under this name (search.models)


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
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM: `csl-search resume` continues it
    notes: list[str] = field(default_factory=list)  # what a resume found and did
    problems: list[str] = field(default_factory=list)  # planned trials the search did not end: it is not complete
    report_path: str | None = None  # the report written at the end (None: it failed; the parent says why)
    model: str = ""  # where the best model is (search.models.log_search_model), one line
    experiment_id: str = ""
    log_path: str | None = None  # the search's log file (search.console): checkpoints, MLflow links, INFO records

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.trials:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    def unfinished(self) -> int:
        return sum(row["status"] not in FINAL for row in self.trials)

    def report(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        stopped = " (interrupted)" if self.interrupted else ""
        lines = [
            *(f"resume: {note}" for note in self.notes),
            f"search {self.experiment_path}{stopped}: {len(self.trials)} trials ({counts}) in {self.wall_time_s:.0f} s",
            f"ranked by best {self.metric} ({self.mode}):",
            self.table,
            "",
            f"results: {self.results_path}",
            f"history: {self.history_path}",
            f"report:  {self.report_path or 'not written (see the parent run tag csl.report_warning)'}",
            *([f"log:     {self.log_path}"] if self.log_path else []),
            f"MLflow: experiment '{self.experiment_name}', parent run {self.parent_run_id}",
            *([self.model] if self.model else []),
        ]
        from search.tracking import runs_url

        if self.tracking_uri.startswith(("http://", "https://")):
            lines.append(f"open it: {runs_url(self.tracking_uri, self.experiment_id)}")
        else:
            lines.append(f"open it: mlflow ui --backend-store-uri {self.tracking_uri}, then "
                         f"{runs_url('http://127.0.0.1:5000', self.experiment_id)}")  # fmt: skip
        lines.append(f"compare: csl-search compare --mlflow-uri {self.tracking_uri} --parent-run {self.parent_run_id}")
        lines.extend(f"problem: {problem}" for problem in self.problems)
        if self.interrupted or self.unfinished() or self.problems:
            lines.append(f"{self.unfinished()} trials unfinished; continue: csl-search resume {self.experiment_path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- pieces


def max_epochs_of(space: Any) -> int:
    return int(space.budget["epochs"])


def shown_columns(space: Any) -> list[str]:
    """Columns of the ranking table: the space's searched aspects, then its other dimensions."""
    return list(dict.fromkeys([*space.aspects(), *space.dimensions]))


def _check_fits(resources: Mapping[str, float]) -> None:
    """A local instance never grows: refuse a trial it could never place (Tune would wait forever)."""
    import ray

    have = ray.cluster_resources()
    workers = resources.get("workers", 1)
    for key, name in (("cpu", "CPU"), ("gpu", "GPU")):
        if resources.get(key, 0) * workers > have.get(name, 0):
            raise ValueError(
                f"a trial asks for {resources[key] * workers:g} {name}s but this machine's Ray instance has "
                f"{have.get(name, 0):g}; lower --{key}s-per-trial or connect to a cluster with --address"
            )


def _check_population(resources: Mapping[str, float], num_samples: int, scheduler: str) -> None:
    """PBT compares a population that trains side by side, and Tune takes turns (pauses one trial for another)
    only between trials whose resources it reserves itself. Those of several workers reserve nothing (Ray Train
    places their workers): beyond what fits at once, the others would only start once the first had ended, and
    a trial that has ended is never cloned into. So their population must fit the cluster at once."""
    workers = int(resources.get("workers", 1))
    if scheduler != "pbt" or workers == 1:
        return
    slots = _slots(resources, None)
    if num_samples > slots:
        fewer = "fewer --cpus-per-trial/--gpus-per-trial or a bigger cluster (--address)"
        allowed = f"--num-samples up to {slots}, or {fewer}" if slots > 1 else fewer
        raise ValueError(
            f"--scheduler pbt trains its whole population at once when trials have {workers} workers, and "
            f"{num_samples} such trials do not fit this cluster at once (it holds {slots}); allowed: {allowed}"
        )


def _capped(max_concurrent: int | None, resources: Mapping[str, float]) -> int | None:
    """Trials of several workers at once only as far as all their workers fit: Tune would start more (their
    drivers need next to nothing) and half-placed TorchTrainers would wait on each other for ever."""
    if resources.get("workers", 1) == 1:
        return max_concurrent
    return _slots(resources, max_concurrent)


def _slots(resources: Mapping[str, float], max_concurrent: int | None) -> int:
    """How many trials the cluster holds at once now (at least 1), within ``max_concurrent``."""
    import ray

    have = ray.cluster_resources()
    workers = resources.get("workers", 1)
    fits = [int(have.get(name, 0) // (resources[key] * workers)) for key, name in (("cpu", "CPU"), ("gpu", "GPU"))
            if resources.get(key)]  # fmt: skip
    slots = max(1, min(fits)) if fits else 1
    return min(slots, int(max_concurrent)) if max_concurrent else slots


@contextlib.contextmanager
def _pending_trials(state: Mapping[str, Any]) -> Iterator[None]:
    """Let Tune ask the searcher for as many trials as the cluster runs at once.

    For a searcher that is not its own grid/random generator, Ray 2.60 keeps one trial pending at a time (or
    ``max_concurrent`` under a ``ConcurrencyLimiter``: ``tune_controller._get_max_pending_trials``). With short
    trials and reused actors, the one pending trial then always finds the previous trial's actor free before a
    second actor has started, and the search runs one trial at a time on one core (measured here: 24 trials of
    the encoder study in sequence, one worker process, 2 CPUs). ``TUNE_MAX_PENDING_TRIALS_PG`` set by the user
    wins."""
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(_slots(state["resources"], state.get("max_concurrent")))
    try:
        yield
    finally:
        os.environ.pop(key, None)


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Ray's default name spells out the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def _trainable(resources: Mapping[str, float], metric: str | None = None, mode: str | None = None) -> Any:
    """The trial function with its resources. A trial of several Train workers (search.train_trial) reserves
    nothing itself: its TorchTrainer places the workers, each with the CPUs and GPUs of ``--*-per-trial``."""
    from ray import tune

    from search.trainable import csl_trial

    # metric and mode: each epoch's checkpoint score is computed in the trial (search.trainable)
    workers = int(resources.get("workers", 1))
    if workers == 1:
        return tune.with_resources(tune.with_parameters(csl_trial, metric=metric, mode=mode), dict(resources))
    per_worker = {"CPU": float(resources.get("cpu", 1.0)), "GPU": float(resources.get("gpu", 0.0))}
    # Tune refuses an empty request and any CPU share would keep a worker off the driver's node: a trial asks for
    # a token of memory (1 MiB), which every node has.
    driver = tune.PlacementGroupFactory([{"memory": float(2**20)}])
    trial = tune.with_parameters(csl_trial, metric=metric, mode=mode, worker_resources=per_worker)
    return tune.with_resources(trial, driver)


def workers_per_trial(space: Any, workers: int | None) -> int:
    """The Train workers of every trial: ``--workers-per-trial`` (written into the space's fixed keys, so every
    trial's config and MLflow params say it), else the space's ``fixed.workers_per_trial``, else 1."""
    if workers:
        space.fixed["workers_per_trial"] = int(workers)
    return int(space.fixed.get("workers_per_trial") or 1)


def _monitored(trainable: Any, state: Mapping[str, Any]) -> Any:
    """The trainable with MLflow system metrics around each trial (``search.system_metrics``), unless turned off.

    ``functools.wraps`` carries ``with_resources``' ``_resources`` and the name over to the wrapper."""
    if not state["options"].get("system_metrics", True):
        return trainable
    from search.system_metrics import monitored

    return monitored(trainable, tracking_uri=state["tracking_uri"], experiment_id=state["experiment_id"],
                     parent_run_id=state["parent_run_id"])  # fmt: skip


def _run_config(state: Mapping[str, Any], callbacks: list[Any], verbose: int) -> Any:
    from ray import tune

    # Keep the best checkpoint by the trial's score (search.trainable: its best epoch by search.best) and, beside
    # it, Tune always keeps the latest, which a resume continues from: at most two per trial (epochs of a big
    # encoder add up). PBT keeps every checkpoint: it clones a trial's checkpoint of its last perturbation, which
    # may no longer be its best or latest when another trial takes it, and Tune's bookkeeping deleted such a
    # checkpoint under a PBT pause (measured: tests/test_pbt.py failed on a clone's missing state.pt with 3 kept).
    from search.trainable import SCORE

    keep = None if state["options"]["scheduler"] == "pbt" else 1
    return tune.RunConfig(
        name=state["name"],
        storage_path=state["storage"],
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=int(state["max_failures"])),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=SCORE,
                                                checkpoint_score_order="max"),
        verbose=max(verbose - 1, 0),  # Ray's tables only at -v: by default the progress line says it (search.progress)
    )


# ---------------------------------------------------------------------------------------------------- the Tuner


def _search_alg(searcher: Any, state: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(search_alg, param_space) for the Tuner: the searcher, within a concurrency limit, or PBT's population."""
    from search.schedulers import initial_population

    options, max_concurrent = state["options"], state.get("max_concurrent")
    if options["scheduler"] == "pbt":
        return initial_population(searcher, int(state["num_samples"]), max_concurrent)
    if max_concurrent:
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(searcher, max_concurrent=int(max_concurrent)), {}
    return searcher, {}  # the searchers return whole configs


def _tuner(state: Mapping[str, Any], space: Any, searcher: Any, callbacks: list[Any], *, resume: bool) -> Any:
    """A new Tuner over the experiment folder, the same for a run and a resume.

    A resume does not use ``Tuner.restore``, which unpickles ``tuner.pkl`` (the searcher, scheduler and callbacks
    as the first run pickled them): it builds them anew from ``csl_search.json`` and the space file and lets Tune
    restore only its snapshot of the trials and of the searcher (``ResumeConfig``, which ``Tuner.restore`` passes
    to Tune the same way).
    """
    from ray import tune
    from ray.tune import ResumeConfig

    from search.schedulers import build_scheduler

    search_alg, param_space = _search_alg(searcher, state)
    options = state["options"]
    again = ResumeConfig.ResumeType.RESUME
    kwargs = {"resume_config": ResumeConfig(unfinished=again, errored=again)} if resume else None
    return tune.Tuner(
        _monitored(_trainable(state["resources"], state["metric"], state["mode"]), state),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=state["metric"],
            mode=state["mode"],
            search_alg=search_alg,
            scheduler=build_scheduler(options["scheduler"], space, int(state["max_epochs"]), int(options["seed"])),
            num_samples=int(state["num_samples"]),
            time_budget_s=space.budget.get("time_budget_s"),
            # one worker per slot imports torch once (stack.md); a trial of several workers starts new Train
            # workers anyway, and Tune cannot reset its with_parameters wrapper for another trial
            reuse_actors=int(state["resources"].get("workers", 1)) == 1,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=_run_config(state, callbacks, int(options.get("verbose", 1))),
        _tuner_kwargs=kwargs,
    )


def _callbacks(state: Mapping[str, Any], space: Any, ledger: Any, interrupt: Interrupt) -> list[Any]:
    from search.callback import MlflowTrialCallback
    from search.results import FinalStatus

    mlflow = MlflowTrialCallback(
        state["tracking_uri"], state["experiment_id"], state["parent_run_id"], metric=state["metric"],
        mode=state["mode"], max_epochs=int(state["max_epochs"]), searched=list(space.dimensions), space=space,
        ledger=ledger, interrupt=interrupt,
    )  # fmt: skip
    callbacks = [mlflow, FinalStatus(interrupt)]
    if int(state["resources"].get("workers", 1)) > 1:
        from search.train_trial import TrainCleanup

        callbacks.append(TrainCleanup())
    if int(state["options"].get("verbose", 1)) >= 1:
        callbacks.append(_progress(state, space, mlflow))
    return callbacks


def _progress(state: Mapping[str, Any], space: Any, mlflow: Any) -> Any:
    """The progress line, told the trials' run names and, for the log file, each ended trial's MLflow link."""
    from search.progress import Printer, Progress
    from search.tracking import resolved_config, runs_url, trial_run_name

    uri, experiment_id = state["tracking_uri"], state["experiment_id"]
    printer = Printer(tty=None if int(state["options"].get("verbose", 1)) < 2 else False)  # -v: lines under Ray's
    search_log = logging.getLogger("csl.search_log")

    def name(trial: Any) -> str:
        return trial_run_name(resolved_config(dict(trial.config)), trial.trial_id)

    def ended(trial: Any, status: str) -> None:
        run_id = mlflow._runs.get(trial.trial_id)
        server = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        link = runs_url(server, experiment_id, run_id) if run_id else "(no MLflow run)"
        search_log.info("trial %s (%s) %s: MLflow run %s", trial.trial_id, name(trial), status, link)

    return Progress(
        total=int(state["num_samples"]), max_epochs=int(state["max_epochs"]), metric=state["metric"],
        mode=state["mode"], printer=printer, watch=mlflow.watch,
        every_s=float(state["options"].get("progress_every_s", 30.0)), name=name, on_end=ended,
    )  # fmt: skip


def _searcher(state: Mapping[str, Any], space: Any, ledger: Any) -> Any:
    from search.searchers import make_searcher

    options = state["options"]
    searcher = make_searcher(options["searcher"], space, max_epochs=int(state["max_epochs"]),
                             seed=int(options["seed"]))  # fmt: skip
    if options["scheduler"] != "pbt":  # PBT's population is drawn before Tune starts and is Tune's own state
        searcher.ledger = ledger
    return searcher


# ---------------------------------------------------------------------------------------------------- run / resume


def run_search(space: Any, options: SearchOptions, *, command: str | None = None) -> SearchOutcome:
    """Run a whole search over ``space`` (a loaded ``search.space.Space``)."""
    from mlflow import MlflowClient

    from search.ledger import Ledger
    from search.searchers import GridSearcher
    from search.tracking import check_reachable, ensure_experiment, local_tracking_uri, start_parent_run, store_lock

    if options.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{options.scheduler}'; choose one of: {', '.join(SCHEDULERS)}")
    if options.searcher not in SEARCHERS:
        raise ValueError(f"unknown searcher '{options.searcher}'; choose one of: {', '.join(SEARCHERS)}")
    started = time.time()
    root = storage.normalise(options.storage)
    local = not storage.is_uri(root)
    storage.check_writable(root)  # seconds, before anything is made
    name = options.name or storage.unique_name(space.name)
    experiment_path = storage.join(root, name)
    storage.create_folder(experiment_path)  # exclusively: never two searches in one folder
    tracking_uri = options.mlflow_uri or local_tracking_uri(root if local else ".")
    try:
        with store_lock(tracking_uri):  # two first searches on a new SQLite store must not both create its tables
            check_reachable(tracking_uri, given=options.mlflow_uri is not None)  # before any compute
    except BaseException:
        storage.remove_empty_folder(experiment_path)
        raise

    budget = dict(space.budget)
    max_epochs = max_epochs_of(space)
    if options.searcher == "grid":
        allowed = GridSearcher(space).allowed()
        num_samples = min(options.num_samples or allowed, allowed)
    else:
        num_samples = int(options.num_samples or budget.get("num_samples") or DEFAULT_NUM_SAMPLES)
    resources = {"cpu": float(options.cpus_per_trial)}
    if options.gpus_per_trial:
        resources["gpu"] = float(options.gpus_per_trial)
    workers = workers_per_trial(space, options.workers_per_trial)
    if workers > 1:
        resources["workers"] = float(workers)

    interrupt = Interrupt()
    with interrupt.catching():
        started_ray = init_ray(options.address, options.num_cpus)
        interrupt.reclaim()
        parent_run_id = None
        try:
            if started_ray and not options.address:
                _check_fits(resources)
            _check_population(resources, num_samples, options.scheduler)
            client = MlflowClient(tracking_uri=tracking_uri)
            experiment_name = options.experiment or space.name
            # A SQLite store keeps artifacts under the experiment's location: put it beside the database.
            sqlite = local and tracking_uri.startswith("sqlite")
            artifact_location = storage.join(root, "mlartifacts") if sqlite else None
            with store_lock(tracking_uri):
                experiment_id = ensure_experiment(client, experiment_name, artifact_location, space.description)
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
                "space_file": SPACE_COPY.format(Path(str(space.path)).name),
                "options": asdict(options),
                "num_samples": num_samples,
                "max_concurrent": _capped(options.max_concurrent or budget.get("max_concurrent_trials"), resources),
                "command": command,
            }
            storage.write_text(storage.join(experiment_path, state["space_file"]), space.text)
            storage.write_text(storage.join(experiment_path, STATE_FILE), json.dumps(state, indent=2, default=str))
            ledger = Ledger(experiment_path)
            searcher = _searcher(state, space, ledger)
            callbacks = _callbacks(state, space, ledger, interrupt)
            tuner = _tuner(state, space, searcher, callbacks, resume=False)
            return _fit_and_finish(tuner, state, started, interrupt, ledger, callbacks=callbacks)
        except BaseException as exc:
            if parent_run_id is not None:
                from search.tracking import abandon_parent

                abandon_parent(tracking_uri, parent_run_id, exc)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
                resumable = storage.exists(storage.join(experiment_path, STATE_FILE))
                raise Interrupted(experiment_path if resumable else None) from exc
            raise
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def load_state(experiment_path: str) -> dict[str, Any]:
    """``csl_search.json`` of an experiment folder; ResumeError (one line) when there is none or it is damaged."""
    from search.recovery import ResumeError

    path = storage.normalise(experiment_path)
    file = storage.join(path, STATE_FILE)
    try:
        state = json.loads(storage.read_text(file))
    except FileNotFoundError:
        raise ResumeError(f"{path}: not a csl-search experiment folder (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ResumeError(f"{file}: damaged ({type(exc).__name__}: {exc}); the search cannot be resumed without "
                          "it (its trials are in MLflow)") from None  # fmt: skip
    missing = {"parent_run_id", "tracking_uri", "experiment_id", "options", "num_samples"} - set(state)
    if missing:
        raise ResumeError(f"{file}: damaged (no {', '.join(sorted(missing))})")
    return state


def _saved_space(state: Mapping[str, Any]) -> Any:
    """The space the search was started with: the copy in its folder, validated again."""
    from search.recovery import ResumeError
    from search.space import SpaceError, load_space

    folder = state["experiment_path"]
    if storage.is_uri(folder):
        raise ResumeError(f"{folder}: resuming a search whose folder is a URI needs a local copy of the folder")
    copies = sorted(Path(folder).glob(SPACE_COPY.format("*")))
    path = Path(folder) / state["space_file"] if state.get("space_file") else copies[0] if copies else None
    if path is None or not path.is_file():
        raise ResumeError(f"{folder}: the copy of the space file the search started with is missing")
    try:
        return load_space(path)
    except SpaceError as exc:
        raise ResumeError(f"{exc} (the copy of the space file the search started with)") from None


def resume_search(
    experiment_path: str, *, address: str | None = None, num_cpus: int | None = None, rebuild: bool = False,
    register_model: str | None = None,
    verbose: int | None = None, progress_every_s: float | None = None,
) -> SearchOutcome:
    """Continue an interrupted or killed search (``search.recovery``): ended trials stay as they are, unfinished
    ones continue from their last checkpoints, trials Tune lost are proposed again.

    Before anything runs, it checks what Tune's snapshot, the ledger and MLflow hold; a search that cannot be
    continued as it is raises ResumeError naming the file and what to do.
    """
    from mlflow import MlflowClient

    from search.ledger import Ledger
    from search.recovery import ResumeError, plan_resume, restore_checkpoints, set_aside_snapshot
    from search.trainable import ENDED_ENV
    from search.tracking import abandon_parent, check_reachable, ended_results, reopen_run, trial_runs

    started = time.time()
    state = load_state(experiment_path)
    if register_model:
        state["register_model"] = register_model  # this resume's choice (the run's own is in state["options"])
    path = state["experiment_path"] = storage.normalise(experiment_path)  # the folder may have moved
    state["name"], state["storage"] = path.rstrip("/").rsplit("/", 1)[1], path.rstrip("/").rsplit("/", 1)[0]
    if verbose is not None:  # -q / -v of the resume, not of the first run
        state["options"]["verbose"] = int(verbose)
    if progress_every_s is not None:
        state["options"]["progress_every_s"] = float(progress_every_s)
    check_reachable(state["tracking_uri"])
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    try:
        client.get_run(state["parent_run_id"])
    except Exception:  # noqa: BLE001 - any failure: the store does not hold this search
        raise ResumeError(f"{storage.join(path, STATE_FILE)}: parent_run_id: MLflow run {state['parent_run_id']} is "
                          f"not in {state['tracking_uri']}; allowed: the store the search was started with") from None
    plan = plan_resume(path, state, rebuild=rebuild)
    space = _saved_space(state)
    if plan.mode == "rebuild":
        moved = set_aside_snapshot(path)
        if moved:
            plan.notes.append(f"Tune's snapshot moved to {moved}")
    restore_checkpoints(plan)
    for note in plan.notes:
        log.warning("resume: %s", note)

    interrupt = Interrupt()
    with interrupt.catching():
        reopen_run(client, state["parent_run_id"])
        resumes = int(client.get_run(state["parent_run_id"]).data.tags.get("csl.resumes", "0")) + 1
        client.set_tag(state["parent_run_id"], "csl.resumes", str(resumes))
        state["resumes"] = resumes
        # A trial that MLflow holds as ended may come back from Tune's snapshot as unfinished: it must not train again.
        ended_file = storage.join(path, ENDED_FILE)
        runs = trial_runs(client, state["experiment_id"], state["parent_run_id"])
        storage.write_text(ended_file, ended_lines(ended_results(runs)))
        address, num_cpus = address or state.get("address"), num_cpus or state.get("num_cpus")
        workers_per_trial(space, state["options"].get("workers_per_trial"))
        started_ray = init_ray(address, num_cpus, env={ENDED_ENV: ended_file})
        interrupt.reclaim()
        try:
            ledger = Ledger(path)
            searcher = _searcher(state, space, ledger)
            searcher.replays = list(plan.replays)
            callbacks = _callbacks(state, space, ledger, interrupt)
            tuner = _tuner(state, space, searcher, callbacks, resume=plan.mode == "restore")
            return _fit_and_finish(tuner, state, started, interrupt, ledger, plan.notes, callbacks=callbacks)
        except BaseException as exc:
            abandon_parent(state["tracking_uri"], state["parent_run_id"], exc)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
                raise Interrupted(path) from exc
            raise
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def log_path(state: Mapping[str, Any]) -> str:
    """The search's log file: in its experiment folder, or, when that is a URI, in the local temp folder."""
    from search.console import LOG_FILE

    path = state["experiment_path"]
    if storage.is_uri(path):
        import tempfile

        return str(Path(tempfile.gettempdir()) / "csl-search" / f"{state['name']}.log")
    return str(Path(path) / LOG_FILE)


def _fit_and_finish(
    tuner: Any, state: dict[str, Any], started: float, interrupt: Interrupt, ledger: Any, notes: list[str] = (),
    *, callbacks: list[Any] = (),
) -> SearchOutcome:
    from search.console import routed
    from search.progress import Printer, Progress

    progress = next((c for c in callbacks if isinstance(c, Progress)), None)
    printer = progress.printer if progress is not None else Printer()
    ray_verbose = max(int(state["options"].get("verbose", 1)) - 1, 0)
    try:
        with routed(log_path(state), printer, ray_verbose=ray_verbose):
            return _fit_and_finish_routed(tuner, state, started, interrupt, ledger, notes)
    finally:
        if progress is not None:
            progress.close()


def _fit_and_finish_routed(
    tuner: Any, state: dict[str, Any], started: float, interrupt: Interrupt, ledger: Any, notes: list[str] = ()
) -> SearchOutcome:
    from mlflow import MlflowClient

    from search.recovery import missing_trials
    from search.report.build import end_of_search_report
    from search.results import best_trial
    from search.tracking import finish_parent

    with interrupt.fitting(), _pending_trials(state):
        tuner.fit()
    outcome = write_results(state)
    outcome.wall_time_s = time.time() - started
    outcome.interrupted = interrupt.requested
    outcome.notes = list(notes)
    outcome.log_path = log_path(state)
    lost = missing_trials(ledger.planned(), outcome.trials)
    if lost and not outcome.interrupted:
        outcome.problems.append(f"{len(lost)} planned trials did not run: {', '.join(p.trial_id for p in lost)}")
    outcome.report_path = end_of_search_report(state["tracking_uri"], state["parent_run_id"], outcome.experiment_path)
    local = [] if storage.is_uri(outcome.results_path) else [outcome.results_path, outcome.history_path]
    best = best_trial(outcome.trials, outcome.metric, outcome.mode)
    if not outcome.interrupted:  # the best trial's model on the parent, registered if asked (search.models)
        from search.models import log_search_model

        register = state.get("register_model") or state["options"].get("register_model")
        outcome.model = log_search_model(state["tracking_uri"], state["parent_run_id"], best.run_id if best else None,
                                         register=register)  # fmt: skip
    finish_parent(
        MlflowClient(tracking_uri=state["tracking_uri"]), state["parent_run_id"], files=local, counts=outcome.counts(),
        best=best,
        interrupted=outcome.interrupted or bool(outcome.unfinished()) or bool(outcome.problems),
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
        experiment_id=str(state["experiment_id"]),
        table=ranking_text(trials, metric=state["metric"], mode=state["mode"], shown=state.get("shown", [])),
    )
