"""A trial that spans several workers: Ray Train inside the Tune trial (Ray 2.4x+ pattern, Ray 2.60's Train v2).

The Tune trial function builds a ``ray.train.torch.TorchTrainer`` with ``ScalingConfig(num_workers=N)`` and fits
it; every worker runs ``csl.train.train`` on its shard of each global batch (``csl.distributed``: embeddings
gathered with gradients, global batch norm, DDP), and the first worker's epoch results reach Tune with their
checkpoints (``ToTune``, below), so ASHA, HyperBand and PBT stop, pause and clone such a trial as any other. A lost
worker restarts the Train run from its last checkpoint (``ray.train.FailureConfig``, the inner level); a lost
driver is the Tune trial's retry, which continues from the trial's last Tune checkpoint (``tune.FailureConfig``,
the outer level).

When ASHA stops such a trial, Tune ends the trial's actor while its TorchTrainer still holds the workers'
placement group. Train's own cleaner for that case asks Ray's State API, which needs the dashboard that a
``ray[tune]`` install (and csl-search's local instance) does not run; and placement groups live as long as the
job, not their creator. So every result names the group (``csl_train_placement_group``) and ``TrainCleanup``, a
driver callback, removes it when the trial ends or is paused (PBT): otherwise the next trial would wait for ever for
those CPUs.

Train v2's own ``TuneReportCallback`` hands Tune metrics only (the checkpoint as a path among them), so PBT, which
pauses a trial and clones another's Tune checkpoint into it, could not run such trials. ``ToTune`` instead passes
each of Train's reports, with the checkpoint Train persisted, to the Tune trial's own thread, which reports both
with ``tune.report`` (Tune copies the checkpoint into the trial's folder, as for a trial of one worker). So Tune
keeps every trial's best and latest checkpoint in one place, whatever its workers; a trial restarted from a Tune
checkpoint (PBT's exploit or unpause, a Tune retry, a resumed search) starts a Train run of its own, named by that
checkpoint, whose workers load it; a Train run of that name that exists already (its own retry) continues from
its latest checkpoint instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

WORKERS_KEY = "workers_per_trial"
TRAIN_RUN = "train"  # the Train run's folder inside its trial's folder: its checkpoints
PLACEMENT_KEY = "csl_train_placement_group"  # in every result: the Train workers' placement group (hex id)
WORKER_FAILURES = 2  # restarts of the Train run from its last checkpoint when a worker is lost


def workers_of(config: Mapping[str, Any]) -> int:
    """How many Train workers a trial's config asks for (1: the trial trains in its own process)."""
    value = config.get(WORKERS_KEY) or 1
    return int(value)


def check_workers(config: Mapping[str, Any]) -> None:
    """What would fail on every worker and every retry, said before any worker starts (a ``ValueError``)."""
    from csl.config import resolve
    from csl.distributed import shard, worker_bn_splits

    resolved = resolve(config)
    workers = workers_of(resolved)
    shard(int(resolved["batch_size"]), 0, workers)
    worker_bn_splits(int(resolved.get("bn_splits") or 1), workers)


def _worker_nodes(node: Mapping[str, str], size: int) -> dict[str, str]:
    """Where the trial ran: ``node_id`` and ``node_ip`` list every worker's (sorted, comma-separated)."""
    import ray
    import torch.distributed as dist

    mine = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    every: list[Any] = [None] * size
    dist.all_gather_object(every, mine)
    return {**node, "node_id": ",".join(sorted({n for n, _ in every})), "node_ip": ",".join(sorted({i for _, i in every}))}


def _train_loop(config: dict[str, Any]) -> None:
    """One Train worker: csl.train with the process group Train set up; the first worker checkpoints.

    Its checkpoints are a trial's (``search.trainable``): the trainer's state, ``csl_result.json`` and the running
    best with its score. It starts from Train's own latest checkpoint when Train restarts the run after a lost
    worker, else from the Tune checkpoint the trial was restarted from (``_csl_start``), else from scratch."""
    import ray.train

    from csl.train import Diverged, train
    from search.status import EPOCH_METRICS
    from search.trainable import BEST_EPOCH, BEST_VALUE, RESULT_FILE, SCORE, running_best, scored

    context = ray.train.get_context()
    rank = context.get_world_rank()
    node = _worker_nodes(config.pop("_csl_node", {}), context.get_world_size())
    metric, mode = config.pop("_csl_metric", None), config.pop("_csl_mode", None)
    start = config.pop("_csl_start", None)
    checkpoint = ray.train.get_checkpoint() or start
    best = None
    group = ray.util.get_current_placement_group()
    placement = group.id.hex() if group is not None else ""

    def report(epoch: int, metrics: Mapping[str, float], save_checkpoint: Any) -> None:
        nonlocal best
        # An epoch without evaluation (eval_every > 1) still carries every metric Tune checks for; NaN = none.
        result = {**{name: math.nan for name in EPOCH_METRICS}, **metrics, "epoch": int(epoch), "diverged": 0,
                  **node, "workers": context.get_world_size(), PLACEMENT_KEY: placement}  # fmt: skip
        best = scored(result, best, metric, mode)
        with tempfile.TemporaryDirectory(prefix="csl-train-ckpt-") as folder:
            save_checkpoint(Path(folder))  # a collective: every worker takes part, the first one writes
            checkpoint = None
            if rank == 0:
                (Path(folder) / RESULT_FILE).write_text(json.dumps(result))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(result, checkpoint=checkpoint)

    try:
        if checkpoint is None:
            best = running_best(None)
            train(config, callback=report)
            return
        with checkpoint.as_directory() as folder:
            saved = Path(folder) / RESULT_FILE
            best = running_best(json.loads(saved.read_text()) if saved.exists() else None)
            train(config, callback=report, resume_from=folder)
    except Diverged as exc:
        # Every worker sees the same global loss, so all of them end here together: report the end once each
        # (Train's report is a barrier) instead of raising, which Train would retry on a config that diverges.
        # The exploded loss is kept where it is finite: it is the record of the explosion.
        finite = {k: v for k, v in exc.metrics.items() if isinstance(v, float) and math.isfinite(v)}
        assert best is not None
        ray.train.report({**{name: math.nan for name in EPOCH_METRICS}, **finite, "epoch": int(exc.epoch),
                          "diverged": 1, "error": str(exc), **node, PLACEMENT_KEY: placement, SCORE: 0.0,
                          BEST_EPOCH: int(best.epoch or 0), BEST_VALUE: best.value if best.found else math.nan})


class ToTune(UserCallback):
    """Each of Train's reports (the first worker's metrics, the checkpoint Train persisted) to the Tune trial's
    thread, through a Ray queue: the callback runs in Train's controller actor."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put((dict(metrics[0]), checkpoint))


def run_name(start: Any) -> str:
    """The Train run of a trial that (re)starts from Tune checkpoint ``start`` (None: from scratch)."""
    if start is None:
        return TRAIN_RUN
    return f"{TRAIN_RUN}-{hashlib.sha1(str(start.path).encode()).hexdigest()[:12]}"


def _last_result(start: Any) -> dict[str, Any] | None:
    """The result a Tune checkpoint was reported with (its ``csl_result.json``), else None."""
    from search.trainable import RESULT_FILE

    if start is None:
        return None
    try:
        with start.filesystem.open_input_stream(f"{start.path}/{RESULT_FILE}") as f:
            return json.loads(f.readall().decode())
    except (OSError, ValueError):
        return None


def multi_worker_trial(config: Mapping[str, Any], node: Mapping[str, str], per_worker: Mapping[str, float], *,
                       metric: str | None, mode: str | None, start: Any = None) -> None:
    """Fit a TorchTrainer of ``workers_per_trial`` workers for this Tune trial (called by ``csl_trial``).

    ``start``: the Tune checkpoint the trial restarts from (its own, or under PBT another trial's), else None.
    Train's reports come back through ``ToTune`` while the run is fitted in a second thread, and go to Tune from
    this one, which is the thread Tune stops (``tune.report`` exits it) when the trial is stopped or paused."""
    import ray.train
    import ray.train._internal.session
    from ray import tune
    from ray.train.torch import TorchTrainer  # gloo on CPUs, nccl with GPUs: its default
    from ray.util.queue import Empty, Queue

    from csl.config import resolve
    from csl.train import pick_device
    from search.trainable import checkpoint_folder

    last = _last_result(start)
    if last is not None and (last.get("diverged") or last.get("failed")):
        tune.report({**last, **node})  # over already: say again how it ended, train nothing
        return
    resolved = resolve(config)
    workers = workers_of(resolved)
    use_gpu = float(per_worker.get("GPU", 0.0)) > 0 and pick_device(resolved["device"]).type == "cuda"
    resources = {"CPU": float(per_worker.get("CPU", 1.0)), **({"GPU": float(per_worker["GPU"])} if use_gpu else {})}
    # The Train run lives in the trial's folder of the experiment's storage (not Tune's local staging folder, which
    # a new Ray session does not have): its own retry finds its checkpoints there.
    storage = ray.train._internal.session.get_storage()
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={**dict(config), "_csl_node": dict(node), "_csl_metric": metric, "_csl_mode": mode,
                           "_csl_start": start},  # fmt: skip
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name(start),
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            callbacks=[ToTune(reports)],
            failure_config=ray.train.FailureConfig(max_failures=WORKER_FAILURES),
            # the latest only, for a restart after a lost worker: Tune keeps the trial's best and latest
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    outcome: dict[str, BaseException | None] = {}

    def fit() -> None:
        try:
            trainer.fit()
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread, below
            outcome["error"] = exc

    fitting = threading.Thread(target=fit, name="csl-train-run", daemon=True)
    fitting.start()
    forwarded = 0
    while True:
        try:
            metrics, checkpoint = reports.get(timeout=1.0)
        except Empty:
            if "error" not in outcome:
                continue
            if reports.empty():  # Train's last report was taken before fit returned
                break
            continue
        if checkpoint is not None:
            tune.report(metrics, checkpoint=tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem))
        elif metrics.get("diverged"):
            # a checkpoint holding only the result: the durable record that the trial is over (search.trainable)
            with tempfile.TemporaryDirectory(prefix="csl-ckpt-") as folder:
                tune.report(metrics, checkpoint=checkpoint_folder(metrics, None, folder))
        else:
            tune.report(metrics)
        forwarded += 1
    fitting.join()
    if outcome["error"] is not None:
        raise outcome["error"]
    if forwarded == 0 and last is not None:
        # Restarted from the checkpoint of the last epoch: nothing left to train, so say again how it ended.
        tune.report({**last, **node})


class TrainCleanup(Callback):
    """Removes the Train workers' placement group of a trial that ended or is paused (module docstring)."""

    def __init__(self) -> None:
        self._released: set[str] = set()

    def _release(self, trial: Any) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        group_id = (trial.last_result or {}).get(PLACEMENT_KEY)
        if not group_id or group_id in self._released:
            return
        self._released.add(group_id)
        if placement_group_table().get(group_id, {}).get("state") in (None, "REMOVED"):
            return  # Train removed it itself
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))
        except Exception:  # noqa: BLE001 - removed meanwhile: nothing to release
            pass

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # A trial that is not running holds no workers: PBT's pause (and a retry's wait) has no hook of its own.
        for trial in trials:
            if trial.status in ("PAUSED", "PENDING"):
                self._release(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)
