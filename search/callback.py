"""``MlflowTrialCallback``: every Ray trial as a child run of the search's MLflow parent run.

Ray's ``MLflowLoggerCallback`` logs flat runs (no parent/child: ray issues #19978, #46569, #47903) and
``setup_mlflow`` inside a trial leaves runs RUNNING when a scheduler stops the trial at a ``tune.report``. So
the tracking lives on the driver, in this ``tune.Callback`` on top of ``mlflow.MlflowClient``: the driver sees
every result and every end, and knows why a trial ended (``search.status``).

Child run of a trial:
- tags ``mlflow.parentRunId`` (nesting), ``csl.trial_id`` (the Ray trial id), ``csl.status`` (running, finished,
  stopped, failed, diverged; interrupted while a stopped search waits for ``csl-search resume``), ``csl.error``
  (reason for failed / diverged), ``csl.retries``, ``csl.epochs_run``, ``csl.node_id`` / ``csl.node_ip`` /
  ``csl.hostname`` (where it ran last), ``csl.precision`` (bf16 or float32: how), ``csl.label`` (the space's
  short name of the config), ``csl.config_hash`` (the config as the searcher proposed it:
  ``search.tracking.config_fingerprint``);
- every aspect and option of the config as it trains (preset and trainer defaults filled in) as a param under its
  flat name, plus ``variant`` for a neighbourhood space;
- per-epoch metrics with ``step=epoch``: loss, knn_acc, probe_acc, images_per_s, epoch_time (and ``diverged``=1 at
  the epoch whose loss was NaN/inf); a config value that PBT changes is logged as a metric ``config.<name>``
  (params are immutable);
- artifacts ``trial_config.json`` (and ``error.txt`` for a failed trial); the data set as an MLflow input;
- MLflow status FINISHED (finished), KILLED (stopped early by the scheduler), FAILED (failed, diverged).

Resume never duplicates: a run is looked up by its ``csl.trial_id`` tag under the parent before one is made, an
epoch already logged is not logged again, a run that ended under an earlier driver keeps its end, and
``on_experiment_end`` reconciles every trial Ray knows of with its run.

Runs of trials Tune lost. Tune snapshots the experiment (trials and searcher state) every few seconds and after
checkpoints, and copies the snapshot to storage in the background; a resume restores the last copy. A trial the
searcher proposed after that copy is lost: the restored searcher proposes it again under a new Ray trial id.
The run the dead driver made for it (an *orphan*: a child run whose trial id the restored experiment does not
hold) is adopted by the trial that replays it, recognised by ``csl.config_hash`` (searchers are seeded and their
state is in the same snapshot, so the replay proposes the same config). Where the driver died:

- after the proposal, before the trial started: no run yet; the replay gets a new one. Nothing to reconcile.
- after ``on_trial_start``, before a result: the orphan is RUNNING with no metrics; the replay adopts it.
- after some epochs were logged: the replay adopts it but trains from scratch (the lost trial's checkpoint is
  not in the snapshot), and epochs the run holds are not logged again: the rule a restored trial follows too.
- after the trial ended (stopped, finished, diverged): the replay adopts the run and, through the ended-trials
  file (``search.trainable``), repeats that end instead of training again; the run keeps its end untouched.
- the replay proposes another config (a searcher that is not deterministic), or none: once the search has
  ended with no trial unfinished, the orphan is marked KILLED, tagged ``csl.orphaned`` with the reason, and
  deleted, i.e. moved to MLflow's trash (``mlflow runs restore`` brings it back; ``mlflow gc`` purges it). So the
  parent's children are exactly the trials of results.parquet, and none is left RUNNING. An interrupted search
  only marks its orphans KILLED: a later resume may still adopt them.

Why adopt rather than create each run lazily at its trial's first result: a run from the start shows a trial
the moment it trains (an epoch of a big encoder can take an hour), a trial that fails before its first result
still needs its run, and lazy creation would not close the window anyway (a trial can log epochs, even end,
before the snapshot that holds it reaches storage). Reconciling at resume covers every kill point above.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

from search.status import (
    ENDED,
    EPOCH_METRICS,
    MAX_TAG,
    NODE_KEYS,
    RUN_STATUS,
    error_summary,
    planned_epochs,
    trial_status,
)
from search.tracking import (
    CONFIG_TAG,
    ERROR_TAG,
    PARENT_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    config_fingerprint,
    dataset_input,
    ended_results,
    finite_number,
    param_value,
    resolved_config,
    trial_runs,
)
from search.trainable import ENDED_FILE, add_ended

log = logging.getLogger(__name__)

ORPHAN_TAG = "csl.orphaned"  # why a run of a trial Tune lost was deleted at the end of a resumed search
REPLAYS_TAG = "csl.replays_trial"  # on an adopted run: the Ray trial id it was made for, which Tune lost


class MlflowTrialCallback(Callback):
    """Logs every Ray trial as a child run of the search's parent run (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        *,
        metric: str,
        max_epochs: int,
        searched: list[str] | None = None,
        space: Any = None,
    ) -> None:
        self.space = space  # a search.space.Space: names a config's variant, fills it as it will train
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric = metric
        self.max_epochs = max_epochs
        self.searched = list(searched or [])
        self._reset()

    def _reset(self) -> None:
        self._client_obj = None
        self._runs: dict[str, str] = {}  # Ray trial id -> MLflow run id
        self._logged_step: dict[str, int] = {}  # Ray trial id -> last epoch logged
        self._logged_config: dict[str, dict[str, Any]] = {}  # Ray trial id -> config as first logged
        self._node: dict[str, tuple] = {}
        self._ended: set[str] = set()
        self._final: dict[str, str] = {}  # Ray trial id -> status its run ended with under an earlier driver
        self._orphans: list[Any] | None = None  # runs of trials the restored experiment lacks; None: not looked yet

    # The callback is pickled into the experiment folder (tuner.pkl); the client and caches are not state.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("tracking_uri", "experiment_id", "parent_run_id", "metric", "max_epochs", "searched", "space")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self) -> Any:
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client_obj

    # ------------------------------------------------------------------ runs

    def find_run(self, trial_id: str) -> Any | None:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=10,
        )
        if len(found) > 1:
            log.warning("trial %s has %d MLflow runs; continuing the oldest", trial_id, len(found))
        return min(found, key=lambda r: r.info.start_time) if found else None

    def _run_id(self, trial: Any, *, reopen: bool) -> str:
        trial_id = trial.trial_id
        if trial_id in self._runs:
            if reopen and trial_id not in self._final:
                self._set_running(trial_id)
            return self._runs[trial_id]
        existing = self.find_run(trial_id) or self._adopt(trial)
        if existing is not None:
            run_id = existing.info.run_id
            self._runs[trial_id] = run_id
            status = existing.data.tags.get(STATUS_TAG, "")
            if existing.info.status != "RUNNING" and status in ENDED:
                # Ended before a driver died; Tune may run it once more only to repeat its last result
                # (search.trainable): keep the run as it is.
                self._final[trial_id] = status
                self._ended.add(trial_id)
            history = self.client.get_metric_history(run_id, "ssl_loss")
            self._logged_step[trial_id] = max((m.step for m in history), default=0)
            self._logged_config[trial_id] = dict(trial.config)
            if reopen and existing.info.status != "RUNNING" and trial_id not in self._final:
                self._set_running(trial_id)
            return run_id
        return self._create_run(trial)

    def _params(self, config: dict[str, Any]) -> dict[str, Any]:
        """The run's params: the config as it will train (preset and defaults filled in), and its variant."""
        params = resolved_config(config)
        if self.space is not None:
            params = {**params, **self.space.effective(config)}
            variant = self.space.variant_of(config)
            if variant is not None:
                params["variant"] = variant
        return params

    def _create_run(self, trial: Any) -> str:
        from mlflow.entities import Param

        config = dict(trial.config)
        tags = {
            PARENT_TAG: self.parent_run_id,
            TRIAL_TAG: trial.trial_id,
            STATUS_TAG: "running",
            CONFIG_TAG: config_fingerprint(config),
            "csl.trial_name": str(trial),
            "csl.searched": ",".join(self.searched),
            "csl.planned_epochs": str(planned_epochs(config, self.max_epochs)),
        }
        params = self._params(config)
        if self.space is not None:
            tags["csl.label"] = self.space.label(config)
        run = self.client.create_run(self.experiment_id, run_name=str(trial), tags=tags)
        run_id = run.info.run_id
        self._runs[trial.trial_id] = run_id
        self._logged_step[trial.trial_id] = 0
        self._logged_config[trial.trial_id] = config
        self.client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in sorted(params.items())])
        self.client.log_dict(run_id, {"trial_config": config, "resolved": params}, "trial_config.json")
        dataset = dataset_input(params)
        if dataset is not None:
            self.client.log_inputs(run_id, datasets=[dataset])
        return run_id

    # ------------------------------------------------------------------ runs of trials Tune lost

    def _find_orphans(self, trials: list) -> None:
        """Note the parent's child runs whose trial the (restored) experiment does not hold, oldest first.

        Called with the trials Tune restored, before the searcher proposes anything new; a fresh search finds none.
        """
        if self._orphans is not None:
            return
        known = {trial.trial_id for trial in trials}
        runs = trial_runs(self.client, self.experiment_id, self.parent_run_id)
        orphans = [run for run in runs if TRIAL_TAG in run.data.tags and run.data.tags[TRIAL_TAG] not in known]
        self._orphans = sorted(orphans, key=lambda run: run.info.start_time)
        if orphans:
            lost = ", ".join(run.data.tags[TRIAL_TAG] for run in orphans)
            log.info("%d MLflow runs of trials the restored experiment lacks (%s)", len(orphans), lost)

    def _adopt(self, trial: Any) -> Any | None:
        """The run of a trial Tune lost, when ``trial`` replays its config: re-keyed to ``trial``, else None.

        A run made before ``csl.config_hash`` existed is matched by its params instead.
        """
        if not self._orphans:
            return None
        from mlflow.entities import Param

        config = dict(trial.config)
        fingerprint, params = config_fingerprint(config), self._params(config)
        wanted = {key: param_value(value) for key, value in params.items()}
        for run in self._orphans:
            tags = run.data.tags
            if tags.get(CONFIG_TAG) == fingerprint or (CONFIG_TAG not in tags and run.data.params == wanted):
                break
        else:
            return None
        self._orphans.remove(run)
        run_id, lost = run.info.run_id, run.data.tags[TRIAL_TAG]
        log.info("trial %s replays trial %s, which Tune lost: continuing its MLflow run %s", trial, lost, run_id)
        self.client.set_tag(run_id, TRIAL_TAG, trial.trial_id)
        self.client.set_tag(run_id, REPLAYS_TAG, lost)
        self.client.set_tag(run_id, "csl.trial_name", str(trial))
        self.client.update_run(run_id, name=str(trial))
        missing = {key: value for key, value in wanted.items() if key not in run.data.params}
        if missing:  # the driver died between making the run and logging its params
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(missing.items())])
            self.client.log_dict(run_id, {"trial_config": config, "resolved": params}, "trial_config.json")
        ended = ended_results([run]).get(lost)
        if ended is not None:
            # The trainable reads this file when it starts, which Tune does after on_trial_start returns.
            storage = trial.storage
            add_ended(storage.storage_filesystem, f"{storage.experiment_fs_path}/{ENDED_FILE}", trial.trial_id, ended)
        return run

    def _settle_orphans(self, trials: list) -> None:
        """End the runs no trial adopted: KILLED; deleted too when the search is over (module docstring)."""
        self._find_orphans(trials)
        over = all(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        for run in self._orphans or []:
            run_id = run.info.run_id
            if run.info.status == "RUNNING":
                self.client.set_tag(run_id, STATUS_TAG, "interrupted")
                self.client.set_terminated(run_id, status="KILLED")
            if over:
                reason = (
                    f"Ray trial {run.data.tags[TRIAL_TAG]} was lost when its driver died (the experiment "
                    "snapshot did not hold it yet) and the resumed search did not propose its config again; "
                    "deleted so that the parent's children are the search's trials (mlflow runs restore brings it "
                    "back)"
                )
                self.client.set_tag(run_id, ORPHAN_TAG, reason)
                self.client.delete_run(run_id)
        self._orphans = []

    def _set_running(self, trial_id: str) -> None:
        run_id = self._runs[trial_id]
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, STATUS_TAG, "running")
        self._ended.discard(trial_id)

    def _end(self, trial: Any, status: str, reason: str | None = None, full_error: str | None = None) -> None:
        run_id = self._run_id(trial, reopen=False)
        if trial.trial_id in self._final:
            # Ended before an earlier driver died and never trained again (search.trainable only repeats its last
            # result, which Tune may classify differently, e.g. a diverged trial's replay as finished): the
            # earlier record, end time included, stands.
            return
        last = trial.last_result or {}
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_tag(run_id, "csl.epochs_run", str(int(last.get("epoch") or 0)))
        if reason:
            self.client.set_tag(run_id, ERROR_TAG, reason[:MAX_TAG])
        if full_error:
            self.client.log_text(run_id, full_error, "error.txt")
        self.client.set_terminated(run_id, status=RUN_STATUS.get(status, "FINISHED"))
        self._ended.add(trial.trial_id)

    # ------------------------------------------------------------------ Tune hooks

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._find_orphans(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial, reopen=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self._run_id(trial, reopen=False)
        epoch = result.get("epoch")
        if not isinstance(epoch, int) or epoch <= self._logged_step.get(trial.trial_id, 0):
            return
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), stamp, epoch) for k in EPOCH_METRICS if finite_number(result.get(k))]
        if result.get("diverged"):
            metrics.append(Metric("diverged", 1.0, stamp, epoch))
        first = self._logged_config.get(trial.trial_id, {})
        for key, value in dict(trial.config).items():  # PBT changes hyperparameters of a running trial
            if key in first and value != first[key] and finite_number(value):
                metrics.append(Metric(f"config.{key}", float(value), stamp, epoch))
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self._logged_step[trial.trial_id] = epoch
        node = tuple(result.get(k, "") for k in NODE_KEYS)
        if any(node) and self._node.get(trial.trial_id) != node:
            self._node[trial.trial_id] = node
            for key, value in zip(NODE_KEYS, node):
                self.client.set_tag(run_id, f"csl.{key}", str(value))
        if result.get("diverged"):
            self.client.set_tag(run_id, ERROR_TAG, str(result.get("error") or "loss became NaN/inf")[:MAX_TAG])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        # Ray sets TERMINATED only after the callbacks ran: a completed trial here is about to be TERMINATED.
        status = trial_status("TERMINATED", last, planned_epochs(trial.config, self.max_epochs))
        reason = str(last.get("error") or "loss became NaN/inf") if status == "diverged" else None
        self._end(trial, status, reason)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial, reopen=False)
        reason, _ = error_summary(trial)
        self.client.set_tag(run_id, "csl.retries", str(trial.num_failures))
        self.client.set_tag(run_id, "csl.last_error", reason[:MAX_TAG])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason, full = error_summary(trial)
        self._end(trial, "failed", reason, full)
        run_id = self._runs[trial.trial_id]
        self.client.set_tag(run_id, "csl.retries", str(max(trial.num_failures - 1, 0)))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Give every trial that ended its final status, including those that ended while a driver was dying."""
        self._settle_orphans(trials)
        for trial in trials:
            if trial.status not in ("TERMINATED", "ERROR"):
                # The search was interrupted (Ctrl-C) with this trial unfinished; `csl-search resume` reopens it.
                if trial.trial_id in self._runs:
                    run_id = self._runs[trial.trial_id]
                    self.client.set_tag(run_id, STATUS_TAG, "interrupted")
                    self.client.set_terminated(run_id, status="KILLED")
                continue
            if trial.trial_id in self._ended:
                continue
            status = trial_status(trial.status, trial.last_result or {}, planned_epochs(trial.config, self.max_epochs))
            existing = self._runs.get(trial.trial_id)
            if existing is None:
                found = self.find_run(trial.trial_id)
                if found is not None and found.info.status != "RUNNING" and found.data.tags.get(STATUS_TAG) == status:
                    continue  # recorded by the earlier driver
            if status == "failed":
                reason, full = error_summary(trial)
                self._end(trial, status, reason, full)
            else:
                reason = str((trial.last_result or {}).get("error") or "loss became NaN/inf")
                self._end(trial, status, reason if status == "diverged" else None)
