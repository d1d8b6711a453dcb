"""A trial that spans several workers: Ray Train inside the Tune trial (Ray 2.4x+ pattern, Ray 2.60's Train v2).

The Tune trial function builds a ``ray.train.torch.TorchTrainer`` with ``ScalingConfig(num_workers=N)`` and fits
it; every worker runs ``csl.train.train`` on its shard of each global batch (``csl.distributed``: embeddings
gathered with gradients, global batch norm, DDP), and the first worker's epoch results reach Tune through Train's
``TuneReportCallback``, so ASHA and HyperBand stop such a trial as any other. Train keeps the checkpoints under the
trial's own folder (``<trial>/train``) and restores from there: a lost worker restarts the Train run from its last
checkpoint (``ray.train.FailureConfig``, the inner level), and a Tune retry or a resumed search builds the same
Train run again, which continues from the same place (``tune.FailureConfig``, the outer level).

When ASHA stops such a trial, Tune ends the trial's actor while its TorchTrainer still holds the workers'
placement group. Train's own cleaner for that case asks Ray's State API, which needs the dashboard that a
``ray[tune]`` install (and csl-search's local instance) does not run; and placement groups live as long as the
job, not their creator. So every result names the group (``csl_train_placement_group``) and ``TrainCleanup``, a
driver callback, removes it when the trial ends: otherwise the next trial would wait for ever for those CPUs.

Train v2 hands Tune metrics only, not checkpoints (``TuneReportCallback`` reports a ``checkpoint_path``): PBT, which
clones a trial from its Tune checkpoint, cannot run such trials and the search refuses that combination.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    best with its score, so Train keeps the best and the latest and ``search.models`` finds the best epoch's."""
    import ray.train

    from csl.train import Diverged, train
    from search.trainable import RESULT_FILE, running_best, scored

    context = ray.train.get_context()
    rank = context.get_world_rank()
    node = _worker_nodes(config.pop("_csl_node", {}), context.get_world_size())
    metric, mode = config.pop("_csl_metric", None), config.pop("_csl_mode", None)
    checkpoint = ray.train.get_checkpoint()
    best = None
    group = ray.util.get_current_placement_group()
    placement = group.id.hex() if group is not None else ""

    def report(epoch: int, metrics: Mapping[str, float], save_checkpoint: Any) -> None:
        nonlocal best
        result = {**metrics, "epoch": int(epoch), "diverged": 0, **node, "workers": context.get_world_size(),
                  PLACEMENT_KEY: placement}
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
        finite = {k: v for k, v in exc.metrics.items() if isinstance(v, float) and math.isfinite(v)}
        ray.train.report({**finite, "epoch": int(exc.epoch), "diverged": 1, "error": str(exc), **node})


def multi_worker_trial(config: Mapping[str, Any], node: Mapping[str, str], per_worker: Mapping[str, float], *,
                       metric: str | None, mode: str | None) -> None:
    """Fit a TorchTrainer of ``workers_per_trial`` workers for this Tune trial (called by ``csl_trial``)."""
    import ray.train
    import ray.train._internal.session
    from ray.train.torch import TorchTrainer  # gloo on CPUs, nccl with GPUs: its default
    from ray.tune.integration.ray_train import TuneReportCallback

    from csl.config import resolve
    from search.trainable import SCORE
    from csl.train import pick_device

    resolved = resolve(config)
    workers = workers_of(resolved)
    use_gpu = float(per_worker.get("GPU", 0.0)) > 0 and pick_device(resolved["device"]).type == "cuda"
    resources = {"CPU": float(per_worker.get("CPU", 1.0)), **({"GPU": float(per_worker["GPU"])} if use_gpu else {})}
    # The Train run lives in the trial's folder of the experiment's storage (not Tune's local staging folder, which
    # a new Ray session does not have): a resumed search finds its checkpoints there.
    storage = ray.train._internal.session.get_storage()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={**dict(config), "_csl_node": dict(node), "_csl_metric": metric, "_csl_mode": mode},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN,
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=WORKER_FAILURES),
            # the best (search.trainable's score) and, always kept by Train beside it, the latest
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                         checkpoint_score_order="max"),
        ),
    )
    trainer.fit()


class TrainCleanup(Callback):
    """Removes the Train workers' placement group of a trial that ended (see the module docstring)."""

    def _release(self, trial: Any) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        group_id = (trial.last_result or {}).get(PLACEMENT_KEY)
        if not group_id:
            return
        if placement_group_table().get(group_id, {}).get("state") in (None, "REMOVED"):
            return  # Train removed it itself
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group_id))))
        except Exception:  # noqa: BLE001 - removed meanwhile: nothing to release
            pass

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)
