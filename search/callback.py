"""``MlflowTrialCallback``: every Ray trial as a child run of the search's MLflow parent run.

Ray's ``MLflowLoggerCallback`` logs flat runs (no parent/child: ray issues #19978, #46569, #47903) and
``setup_mlflow`` inside a trial leaves runs RUNNING when a scheduler stops the trial at a ``tune.report``. So
the tracking lives on the driver, in this ``tune.Callback`` on top of ``mlflow.MlflowClient``: the driver sees
every result and every end, and knows why a trial ended (``search.status``).

Child run of a trial:
- tags ``mlflow.parentRunId`` (nesting), ``csl.trial_id`` (the Ray trial id), ``csl.status`` (running, finished,
  stopped, failed, diverged; interrupted while a stopped search waits for ``csl-search resume``), ``csl.error``
  (reason for failed / diverged), ``csl.retries``, ``csl.epochs_run``, ``csl.node_id`` / ``csl.node_ip`` /
  ``csl.hostname`` (where it ran last), ``csl.label`` (the space's short name of the config), ``csl.config_hash``
  (the config as the searcher proposed it: ``search.tracking.config_fingerprint``);
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
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

from search.status import ENDED, EPOCH_METRICS, MAX_TAG, RUN_STATUS, error_summary, planned_epochs, trial_status
from search.tracking import (
    CONFIG_TAG,
    ERROR_TAG,
    PARENT_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    config_fingerprint,
    dataset_input,
    finite_number,
    param_value,
    resolved_config,
)

log = logging.getLogger(__name__)


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
        existing = self.find_run(trial_id)
        if existing is not None:
            run_id = existing.info.run_id
            self._runs[trial_id] = run_id
            status = existing.data.tags.get(STATUS_TAG, "")
            if existing.info.status != "RUNNING" and status in ENDED:
                # Ended before a driver died; Tune may run it once more only to repeat its last result
                # (search.trainable): keep the run as it is.
                self._final[trial_id] = status
                self._ended.add(trial_id)
            history = self.client.get_metric_history(run_id, "loss")
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
        node = tuple(result.get(k, "") for k in ("node_id", "node_ip", "hostname"))
        if any(node) and self._node.get(trial.trial_id) != node:
            self._node[trial.trial_id] = node
            for key, value in zip(("node_id", "node_ip", "hostname"), node):
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
