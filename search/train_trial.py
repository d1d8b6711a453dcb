"""A trial that spans several workers: Ray Train inside the Tune trial (Ray 2.4x+ pattern, Ray 2.60's Train v2).

The Tune trial function builds a ``ray.train.torch.TorchTrainer`` with ``ScalingConfig(num_workers=N)`` and fits
it; every worker runs ``csl.train.train`` on its shard of each global batch (``csl.distributed``: embeddings
gathered with gradients, global batch norm, DDP), and the first worker's epoch results reach Tune through Train's
``TuneReportCallback``, so ASHA and HyperBand stop such a trial as any other. Train keeps the checkpoints under the
trial's own folder (``<trial>/train``) and restores from there: a lost worker restarts the Train run from its last
checkpoint (``ray.train.FailureConfig``, the inner level), and a Tune retry or a resumed search builds the same
Train run again, which continues from the same place (``tune.FailureConfig``, the outer level).

Train v2 hands Tune metrics only, not checkpoints (``TuneReportCallback`` reports a ``checkpoint_path``): PBT, which
clones a trial from its Tune checkpoint, cannot run such trials and the search refuses that combination.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WORKERS_KEY = "workers_per_trial"
WORKER_FAILURES = 2  # restarts of the Train run from its last checkpoint when a worker is lost


def workers_of(config: Mapping[str, Any]) -> int:
    """How many Train workers a trial's config asks for (1: the trial trains in its own process)."""
    value = config.get(WORKERS_KEY) or 1
    return int(value)


def _train_loop(config: dict[str, Any]) -> None:
    """One Train worker: csl.train with the process group Train set up; the first worker checkpoints."""
    import ray.train

    from csl.train import Diverged, train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    node = config.pop("_csl_node", {})

    def report(epoch: int, metrics: Mapping[str, float], save_checkpoint: Any) -> None:
        result = {**metrics, "epoch": int(epoch), "diverged": 0, **node, "workers": context.get_world_size()}
        with tempfile.TemporaryDirectory(prefix="csl-train-ckpt-") as folder:
            save_checkpoint(Path(folder))  # a collective: every worker takes part, the first one writes
            checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report(result, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    try:
        if checkpoint is None:
            train(config, callback=report)
            return
        with checkpoint.as_directory() as folder:
            train(config, callback=report, resume_from=folder)
    except Diverged as exc:
        # Every worker sees the same global loss, so all of them end here together: report the end once each
        # (Train's report is a barrier) instead of raising, which Train would retry on a config that diverges.
        finite = {k: v for k, v in exc.metrics.items() if isinstance(v, float) and math.isfinite(v)}
        ray.train.report({**finite, "epoch": int(exc.epoch), "diverged": 1, "error": str(exc), **node})


def multi_worker_trial(config: Mapping[str, Any], node: Mapping[str, str], per_worker: Mapping[str, float]) -> None:
    """Fit a TorchTrainer of ``workers_per_trial`` workers for this Tune trial (called by ``csl_trial``)."""
    import ray.train
    import ray.train._internal.session
    from ray.train.torch import TorchTrainer  # gloo on CPUs, nccl with GPUs: its default
    from ray.tune.integration.ray_train import TuneReportCallback

    from csl.config import resolve
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
        train_loop_config={**dict(config), "_csl_node": dict(node)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=WORKER_FAILURES),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
