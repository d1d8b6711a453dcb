"""Several workers train as one device on their batches together (csl.distributed), checked on the CPU with gloo.

Two worker processes (torch.multiprocessing, gloo on 127.0.0.1) each take one half of a global batch, with
views drawn by each worker's own generator; one process then trains the same model on the two halves' views
concatenated. The workers' loss and every parameter's averaged gradient must equal that one process's: the
negatives are gathered with gradients and batch norm normalises over the global batch. Momentum targets (BYOL,
MoCo v2) must stay equal on both workers over several steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.helpers import random_images, tiny

GLOBAL_BATCH = 16
WORKERS = 2
EQUAL = ("simclr", "byol", "amdim")  # the methods whose loss and gradients are checked against one device
TARGETS = ("byol", "moco_v2")  # the methods whose momentum targets are checked to stay equal


def _model(method: str) -> tuple[Any, Any]:
    from csl.config import resolve
    from csl.model import build_model

    cfg = resolve(tiny(method=method, batch_size=GLOBAL_BATCH, bn_splits=1 if method == "moco_v2" else None))
    torch.manual_seed(0)
    return build_model({k: v for k, v in cfg.items()}, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def _views(pipeline: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's two views as the workers draw them: worker r augments its shard with its own generator."""
    from csl.distributed import shard

    images = random_images(GLOBAL_BATCH, seed=step)
    parts_a, parts_b = [], []
    for rank in range(WORKERS):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        a, b = pipeline(images[shard(GLOBAL_BATCH, rank, WORKERS)], generator)
        parts_a.append(a)
        parts_b.append(b)
    return torch.cat(parts_a), torch.cat(parts_b)


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from csl.distributed import data_parallel, global_batchnorm, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    try:
        rows = shard(GLOBAL_BATCH, rank, WORKERS)
        found: dict[str, Any] = {}
        for method in EQUAL:
            pipeline, model = _model(method)
            global_batchnorm(model, torch.device("cpu"))
            ddp = data_parallel(model, torch.device("cpu"))
            view_a, view_b = _views(pipeline, 0)
            loss, _ = ddp(view_a[rows], view_b[rows])
            loss.backward()
            found[method] = {"loss": loss.detach(), "grads": _grads(model)}
        for method in TARGETS:
            pipeline, model = _model(method)
            if method != "moco_v2":
                global_batchnorm(model, torch.device("cpu"))
            ddp = data_parallel(model, torch.device("cpu"))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(3):
                view_a, view_b = _views(pipeline, step)
                loss, _ = ddp(view_a[rows], view_b[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                model.update_target(0.9)
            found[f"{method} target"] = {k: v.detach().clone() for k, v in model.target.named_parameters()}
            found[f"{method} target buffers"] = {k: v.detach().clone() for k, v in model.target.named_buffers()}
            if model.queue is not None:
                found[f"{method} queue"] = {k: v.clone() for k, v in model.queue.rings.items()}
        found["train"] = _train_two_epochs_then_resume(rank, Path(out))
        torch.save(found, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _train_two_epochs_then_resume(rank: int, out: Path) -> dict[str, Any]:
    """csl.train on two workers: 2 epochs with a checkpoint (the first worker writes it), then one more from it."""
    import torch.distributed as dist

    from csl.train import Run, train

    config = tiny(method="simclr", train_limit=64, test_limit=32, batch_size=GLOBAL_BATCH, epochs=2)
    saved: list[int] = []

    def keep(epoch: int, metrics: dict[str, float], save: Any) -> None:
        save(out / "ckpt")
        saved.append(epoch)

    first = train(config, callback=keep)
    resumed = train({**config, "epochs": 3}, resume_from=out / "ckpt")
    run = Run(config)
    run.load(out / "ckpt")
    digest = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    digests = [torch.empty_like(digest) for _ in range(WORKERS)]
    dist.all_gather(digests, digest)
    return {"first": first, "resumed": resumed, "saved": saved, "same_params": torch.equal(digests[0], digests[1]),
            "files": sorted(p.name for p in (out / "ckpt").iterdir())}


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("gloo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORKERS, start_method="spawn", join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORKERS)]


@pytest.mark.parametrize("method", EQUAL)
def test_two_workers_train_as_one_device_on_their_global_batch(workers: list[dict[str, Any]], method: str) -> None:
    pipeline, model = _model(method)
    view_a, view_b = _views(pipeline, 0)
    loss, _ = model(view_a, view_b)  # one device, the whole global batch, plain batch norm
    loss.backward()
    expected = _grads(model)
    for rank, found in enumerate(workers):
        assert torch.allclose(found[method]["loss"], loss.detach(), rtol=1e-5, atol=1e-6), (rank, method)
        grads = found[method]["grads"]
        assert set(grads) == set(expected)
        # float32 sums in another order: within 1e-4 of the model's largest gradient (a conv bias before batch norm
        # has a gradient of zero in exact arithmetic, and round-off of that size in both)
        scale = max(float(g.abs().max()) for g in expected.values())
        for name, grad in expected.items():
            assert torch.allclose(grads[name], grad, rtol=1e-3, atol=1e-4 * scale), (
                rank, method, name, float((grads[name] - grad).abs().max()), scale)


def test_the_loss_differs_without_gathering(workers: list[dict[str, Any]]) -> None:
    """The check above can fail: one worker's shard alone (its own negatives only) gives another loss."""
    from csl.distributed import shard

    pipeline, model = _model("simclr")
    view_a, view_b = _views(pipeline, 0)
    rows = shard(GLOBAL_BATCH, 0, WORKERS)
    local, _ = model(view_a[rows], view_b[rows])
    assert not torch.allclose(local.detach(), workers[0]["simclr"]["loss"], rtol=1e-3)


@pytest.mark.parametrize("method", TARGETS)
def test_momentum_targets_and_queues_stay_equal_on_every_worker(workers: list[dict[str, Any]], method: str) -> None:
    first, second = (w[f"{method} target"] for w in workers)
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), (method, name)
    _, untrained = _model(method)
    moved = [n for n, v in untrained.target.named_parameters() if not torch.equal(v, first[n])]
    assert moved, "the target never moved: the check would pass on an idle model"
    if method != "moco_v2":
        # Batch norm over the global batch: its running statistics are the same on every worker too. MoCo's
        # per-worker batch norm (its shuffle-BN) keeps per-worker statistics, as the reference's per-GPU layers do;
        # DDP hands every worker rank 0's before each forward.
        buffers = [w[f"{method} target buffers"] for w in workers]
        for name in buffers[0]:
            assert torch.equal(buffers[0][name], buffers[1][name]), (method, name)
    if f"{method} queue" in workers[0]:
        for name, ring in workers[0][f"{method} queue"].items():
            assert torch.equal(ring, workers[1][f"{method} queue"][name])


def test_csl_train_on_two_workers_checkpoints_once_and_resumes(workers: list[dict[str, Any]]) -> None:
    first, second = (w["train"] for w in workers)
    assert first["saved"] == second["saved"] == [1, 2]
    assert first["files"] == ["state.pt"]  # written by the first worker alone, whole
    assert first["same_params"] and second["same_params"]
    assert first["first"]["ssl_loss"] == second["first"]["ssl_loss"]  # the global batch's loss on both
    assert "knn_acc" in first["first"] and "knn_acc" not in second["first"]  # the first worker evaluates
    assert first["resumed"]["epoch"] == 3 and second["resumed"]["epoch"] == 3


def test_split_batch_norm_keeps_one_devices_sub_batch_on_every_worker() -> None:
    from csl.distributed import worker_bn_splits

    assert worker_bn_splits(1, 2) == 1  # plain batch norm stays plain on any number of workers
    assert worker_bn_splits(0, 4) == 1
    assert worker_bn_splits(8, 2) == 4  # MoCo's 8 per-GPU parts: 4 on each of 2 workers
    assert worker_bn_splits(8, 8) == 1
    with pytest.raises(ValueError, match="bn_splits 6 must be divisible by the 4 workers"):
        worker_bn_splits(6, 4)
