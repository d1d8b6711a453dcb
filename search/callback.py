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
- once the trial ended, its best model (``search.models``: ``model``, ``encoder/``, tag ``csl.model_epoch``, or
  ``csl.model_warning`` saying why there is none);
- MLflow status FINISHED (finished, and stopped early by the scheduler: ``csl.status`` tells them apart), FAILED
  (failed, diverged), SCHEDULED (interrupted: it will run again);
- run name: its aspects and a short id (``simclr·resnet18·last_vector·cosine·infonce·a47a``,
  ``search.tracking.trial_run_name``); Tune's name of the trial stays in ``csl.trial_name``.

Resume never duplicates: a run is looked up by its ``csl.trial_id`` tag under the parent before one is made, an
epoch already logged is not logged again, a run that ended under an earlier driver keeps its end, and
``on_experiment_end`` reconciles every trial Ray knows of with its run.

Runs of trials Tune lost. Tune snapshots the experiment (trials and searcher state) every few seconds and after
checkpoints, and copies the snapshot to storage in the background; a resume restores the last copy. A trial the
searcher proposed after that copy is lost, but the search's ledger (``trials.jsonl``, ``search.ledger``) holds it:
the resumed searcher proposes it again, with its recorded config, under a new Ray trial id, and the ledger links
the two. The run the dead driver made for it is adopted by the replay (looked up by the lost id, or by an earlier
id of a replay chain); without a ledger (PBT, whose population is Tune's own state) by ``csl.config_hash``. Where
the driver died:

- after the proposal, before the trial started: no run yet; the replay gets a new one. Nothing to reconcile.
- after ``on_trial_start``, before a result: the run is RUNNING with no metrics; the replay adopts it.
- after some epochs were logged: the replay adopts it and continues from the lost trial's last checkpoint (the
  ended-trials file hands it over, ``search.trainable``); epochs the run holds are not logged again.
- after the trial ended (stopped, finished, diverged): the replay adopts the run and, through the ended-trials
  file, repeats that end instead of training again; the run keeps its end untouched.
- a run no replay adopts (its trial in neither the experiment nor the ledger): once the search is complete (not
  interrupted, every planned trial ended), it is tagged ``csl.orphaned`` with the reason and, unless it ended,
  moved to MLflow's trash (``mlflow runs restore`` brings it back; ``mlflow gc`` purges it); one that ended stays,
  so that no result is ever hidden. Until then it is only marked interrupted: a later resume may still adopt it.

A search stopped by Ctrl-C or SIGTERM (``search.interrupt``) marks the trials that were running ``interrupted``
(MLflow status SCHEDULED): Tune's cleanup reports them TERMINATED, but they neither finished nor were stopped by
the scheduler, and ``csl-search resume`` continues them from their last checkpoints.

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
    FINAL,
    INTERRUPTED,
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
    trial_run_name,
    trial_runs,
)
from search.progress import CallWatch, watched
from search.trainable import ENDED_FILE, RESULT_FILE, add_handover

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
        mode: str | None = None,
        searched: list[str] | None = None,
        space: Any = None,
        ledger: Any = None,
        interrupt: Any = None,
    ) -> None:
        self.space = space  # a search.space.Space: names a config's variant, fills it as it will train
        self.ledger = ledger  # search.ledger.Ledger: which trial a replay stands for, what the search planned
        self.interrupt = interrupt  # search.interrupt.Interrupt: whether the search is stopping on a signal
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric = metric
        self.mode = mode  # with the metric, what the best model of an ended trial is (None: no model logged)
        self.max_epochs = max_epochs
        self.searched = list(searched or [])
        self.watch = CallWatch()  # how MLflow answers (search.progress shows it when it stops answering)
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

    # Tune pickles the callback into tuner.pkl (which csl-search never reads back: a resume builds a new one); the
    # client, caches, ledger and signal state are not state.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("tracking_uri", "experiment_id", "parent_run_id", "metric", "mode", "max_epochs", "searched", "space")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, ledger=None, interrupt=None, watch=CallWatch())
        self._reset()

    def _interrupted(self) -> bool:
        return bool(self.interrupt is not None and self.interrupt.requested)

    @property
    def client(self) -> Any:
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = watched(MlflowClient(tracking_uri=self.tracking_uri), self.watch)
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
        run = self.client.create_run(self.experiment_id, run_name=trial_run_name(params, trial.trial_id), tags=tags)
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

    def _lost_run(self, trial: Any) -> Any | None:
        """The run of the trial Tune lost that ``trial`` replays: named by the ledger, else found by its config.

        A run made before ``csl.config_hash`` existed is matched by its params instead.
        """
        chain = self.ledger.replayed(trial.trial_id) if self.ledger is not None else []
        for lost in chain:  # a replay of a replay: the run carries the id of the last trial that started
            run = self.find_run(lost)
            if run is not None:
                if self._orphans:
                    self._orphans = [o for o in self._orphans if o.info.run_id != run.info.run_id]
                return run
        if chain:
            return None
        if not self._orphans or self.ledger is not None and self.ledger.exists():
            return None  # a ledger names every replay: a trial it does not name is new
        config = dict(trial.config)
        fingerprint = config_fingerprint(config)
        wanted = {key: param_value(value) for key, value in self._params(config).items()}
        for run in self._orphans:
            tags = run.data.tags
            if tags.get(CONFIG_TAG) == fingerprint or (CONFIG_TAG not in tags and run.data.params == wanted):
                self._orphans.remove(run)
                return run
        return None

    def _adopt(self, trial: Any) -> Any | None:
        """The run of a trial Tune lost, when ``trial`` replays it: re-keyed to ``trial``, else None.

        The replay repeats the lost trial's end when it had ended, else continues from its last checkpoint
        (through the ended-trials file, which the trainable reads when it starts, after on_trial_start returns).
        """
        run = self._lost_run(trial)
        if run is None:
            return None
        from mlflow.entities import Param

        config = dict(trial.config)
        params = self._params(config)
        wanted = {key: param_value(value) for key, value in params.items()}
        run_id, lost = run.info.run_id, run.data.tags[TRIAL_TAG]
        log.info("trial %s replays trial %s, which Tune lost: continuing its MLflow run %s", trial, lost, run_id)
        self.client.set_tag(run_id, TRIAL_TAG, trial.trial_id)
        self.client.set_tag(run_id, REPLAYS_TAG, lost)
        self.client.set_tag(run_id, "csl.trial_name", str(trial))
        self.client.update_run(run_id, name=trial_run_name(params, trial.trial_id))
        missing = {key: value for key, value in wanted.items() if key not in run.data.params}
        if missing:  # the driver died between making the run and logging its params
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(missing.items())])
            self.client.log_dict(run_id, {"trial_config": config, "resolved": params}, "trial_config.json")
        storage = trial.storage
        handover = f"{storage.experiment_fs_path}/{ENDED_FILE}"
        ended = ended_results([run]).get(lost)
        if ended is not None:
            add_handover(storage.storage_filesystem, handover, trial.trial_id, result=ended)
        else:
            chain = self.ledger.replayed(trial.trial_id) if self.ledger is not None else [lost]
            for earlier in chain:  # the newest checkpoint of the lost trial (or of the one it replayed)
                folder = f"{storage.experiment_fs_path}/{getattr(trial, 'trainable_name', 'csl_trial')}_{earlier}"
                checkpoint = _last_checkpoint(storage.storage_filesystem, folder)
                if checkpoint is not None:
                    add_handover(storage.storage_filesystem, handover, trial.trial_id, checkpoint=checkpoint)
                    break
        return run

    def _complete(self, trials: list) -> bool:
        """Whether the search is over: not interrupted, every trial ended, every planned trial among them."""
        if self._interrupted() or not all(trial.status in ("TERMINATED", "ERROR") for trial in trials):
            return False
        if self.ledger is None:
            return True
        held = {trial.trial_id for trial in trials}
        return all(planned.trial_id in held for planned in self.ledger.planned())

    def _settle_orphans(self, trials: list) -> None:
        """End the runs no trial adopted: interrupted while the search may still adopt them; once it is complete,
        deleted (MLflow's trash) unless they ended, which are kept, tagged, and never hidden."""
        self._find_orphans(trials)
        over = self._complete(trials)
        for run in self._orphans or []:
            run_id = run.info.run_id
            if run.info.status == "RUNNING":
                self.client.set_tag(run_id, STATUS_TAG, INTERRUPTED)
                self.client.set_terminated(run_id, status=RUN_STATUS[INTERRUPTED])
            if not over:
                continue
            lost = run.data.tags[TRIAL_TAG]
            if run.data.tags.get(STATUS_TAG) in FINAL and run.info.status != "RUNNING":
                reason = (f"Ray trial {lost} ended, but neither the experiment nor the search's ledger holds it; "
                          "kept so that no result is hidden")  # fmt: skip
                self.client.set_tag(run_id, ORPHAN_TAG, reason)
                log.warning("MLflow run %s: %s", run_id, reason)
                continue
            reason = (
                f"Ray trial {lost} was lost when its driver died and the resumed search did not propose its config "
                "again; deleted so that the parent's children are the search's trials (mlflow runs restore brings "
                "it back)"
            )
            self.client.set_tag(run_id, ORPHAN_TAG, reason)
            self.client.set_terminated(run_id, status="KILLED")  # in the trash it will not run again
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
        if status != INTERRUPTED:
            self._log_model(trial, run_id)
        self.client.set_terminated(run_id, status=RUN_STATUS.get(status, "FINISHED"))
        self._ended.add(trial.trial_id)

    def _log_model(self, trial: Any, run_id: str) -> None:
        """The ended trial's best model on its run (``search.models``), from its checkpoints or those of the trials
        it replays."""
        from search.models import log_trial_model
        from search.train_trial import TRAIN_RUN

        if self.mode is None:
            return
        storage = trial.storage
        chain = self.ledger.replayed(trial.trial_id) if self.ledger is not None else []
        name = getattr(trial, "trainable_name", "csl_trial")
        folders = [storage.trial_fs_path, *(f"{storage.experiment_fs_path}/{name}_{lost}" for lost in chain)]
        # Tune holds every trial's checkpoints; a trial of several workers begun before csl-search reported Train's
        # checkpoints to Tune (search.train_trial) has its best in Train's folder only.
        folders += [f"{folder}/{TRAIN_RUN}" for folder in folders]
        log_trial_model(self.client, self.tracking_uri, run_id, filesystem=storage.storage_filesystem,
                        trial_folders=folders, metric=self.metric, mode=self.mode)  # fmt: skip

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
        if result.get("failed"):
            self.client.set_tag(run_id, ERROR_TAG, str(result.get("error") or "failed")[:MAX_TAG])
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
        reason = str(last.get("error") or "loss became NaN/inf") if status in ("diverged", "failed") else None
        self._end(trial, status, reason, reason if status == "failed" else None)

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
            # Stopped by a signal before it ended (Tune's cleanup marks such trials TERMINATED, and its snapshot,
            # taken before, holds them as running): `csl-search resume` continues it from its last checkpoint.
            unended = trial.status not in ("TERMINATED", "ERROR") or trial.trial_id not in self._ended
            if unended and self._interrupted() or trial.status not in ("TERMINATED", "ERROR"):
                if trial.trial_id in self._runs and trial.trial_id not in self._final:
                    run_id = self._runs[trial.trial_id]
                    self.client.set_tag(run_id, STATUS_TAG, INTERRUPTED)
                    self.client.set_tag(run_id, "csl.epochs_run", str(self._logged_step.get(trial.trial_id, 0)))
                    self.client.set_terminated(run_id, status=RUN_STATUS[INTERRUPTED])
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


def _last_checkpoint(filesystem: Any, trial_folder: str) -> str | None:
    """The newest checkpoint a trial reported (``checkpoint_NNNNNN`` holding the epoch's result), else None."""
    import pyarrow.fs as pafs

    try:
        infos = filesystem.get_file_info(pafs.FileSelector(trial_folder, allow_not_found=True))
    except OSError:
        return None
    dirs = pafs.FileType.Directory
    folders = sorted(i.path for i in infos if i.type == dirs and i.base_name.startswith("checkpoint_"))
    for folder in reversed(folders):
        if filesystem.get_file_info(f"{folder}/{RESULT_FILE}").type == pafs.FileType.File:
            return folder if isinstance(filesystem, pafs.LocalFileSystem) else f"{filesystem.type_name}://{folder}"
    return None
