"""Training on several workers as one device would train on their batches together.

A contrastive loss is not a sum over images: every anchor is scored against the whole batch's candidates, so
workers that each score their own shard see smaller batches and fewer negatives than one device would (the bug
solo-learn fixed in its PR #259 by gathering with gradients). Here every worker runs the encoder and the
extraction's heads on its own shard, then the embeddings of all workers are gathered *with gradients* (torch's
functional collectives, ``all_gather_single_autograd``: ``torch.distributed.nn.functional.all_gather`` does the same
and is deprecated in torch 2.14) and every worker builds the same pairs and the same loss over the
global batch. Why that gives one device's gradient: each worker's loss is the global loss L; the gather's backward
sums the gradients of every worker's copy of L, so a worker's own embeddings receive W·dL/dz; DDP then averages the
parameters' gradients over the W workers, which gives dL/dθ exactly. Parameters used after the gather (a bilinear
similarity's matrix) get dL/dθ on every worker, and the average leaves it so.

Batch norm normalises over the global batch too (SimCLR's global BN) where asked: on CUDA with torch's
``SyncBatchNorm``; on other devices torch's layer refuses to run ("SyncBatchNorm expected input tensor to be on
GPU"), so ``GlobalBatchNorm`` does the same with differentiable all-reduces of the sums (what the tests on gloo use).
MoCo's split batch norm (``bn_splits``) is left alone: its point is statistics over sub-batches.

The momentum target needs nothing: the parameters are equal on every worker after each step, so the same update
keeps the targets equal. The negative queue is filled with the gathered keys, so it is the same on every worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

LR_SCALING = ("none", "linear", "sqrt")
SYNC_BN = ("auto", "on", "off")


def world() -> tuple[int, int]:
    """(rank, number of workers); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(tensor: Tensor) -> Tensor:
    """Every worker's ``tensor`` concatenated along the batch dimension, in rank order; differentiable when the
    tensor needs a gradient (the backward hands each worker the summed gradient of its own slice)."""
    _, size = world()
    if size == 1:
        return tensor
    if tensor.requires_grad:
        from torch.distributed._functional_collectives import all_gather_single_autograd

        return _waited(all_gather_single_autograd(tensor.contiguous(), 0, dist.group.WORLD))
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _waited(tensor: Tensor) -> Tensor:
    """A functional collective's result, waited for (outside ``torch.compile`` it is an AsyncCollectiveTensor)."""
    wait = getattr(tensor, "wait", None)
    return wait() if callable(wait) else tensor


def _summed(tensor: Tensor) -> Tensor:
    """``tensor`` summed over every worker, differentiably (the backward sums the gradients the same way)."""
    from torch.distributed._functional_collectives import all_reduce

    return _waited(all_reduce(tensor, "sum", dist.group.WORLD))


def gather_embeddings(embedded: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """An extraction's embeddings of every worker's shard, as one global batch (each value is batch-first)."""
    if embedded is None:
        return None
    return {name: gather(value) for name, value in embedded.items()}


def shard(global_batch: int, rank: int, size: int) -> slice:
    """The rows of a global batch that worker ``rank`` of ``size`` trains on (equal shards, in rank order)."""
    if global_batch % size:
        raise ValueError(f"batch_size {global_batch} must be divisible by the {size} workers of a trial: each "
                         "worker trains on an equal shard of every batch")
    per = global_batch // size
    return slice(rank * per, (rank + 1) * per)


def worker_bn_splits(splits: int, size: int) -> int:
    """Split batch norm's parts per worker: each of ``size`` workers keeps the sub-batch size of one device's
    ``splits`` parts (MoCo's per-GPU batch norm) by splitting its shard into splits / size parts. One part
    (plain batch norm) stays one part on every worker."""
    if splits <= 1:
        return 1
    if splits % size:
        raise ValueError(f"bn_splits {splits} must be divisible by the {size} workers of a run: each worker "
                         "normalises over its share of the sub-batches")
    return splits // size


def scaled_lr(lr: float, global_batch: int, rule: str, reference_batch: int = 256) -> float:
    """The learning rate for a global batch: as given (none), ×B/ref (linear, Goyal et al. 2017; SimCLR's
    0.3×B/256), or ×√(B/ref) (sqrt, SimCLR appendix B.1 for LARS at small batches)."""
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * global_batch / reference_batch
    if rule == "sqrt":
        return lr * math.sqrt(global_batch / reference_batch)
    raise ValueError(f"lr_scaling '{rule}' is not one of: {', '.join(LR_SCALING)}")


class GlobalBatchNorm(nn.BatchNorm2d):
    """Batch norm over the batch of every worker, for devices where torch's ``SyncBatchNorm`` does not run.

    The per-channel sums, then the sums of squared deviations, are all-reduced with a differentiable all-reduce
    (its backward all-reduces the gradient), so the gradient is batch norm's over the global batch. The running
    statistics use the global mean and the unbiased global variance, as ``SyncBatchNorm`` does. Accepts 2-D
    (N×C) and 4-D (N×C×H×W) inputs, so one class replaces BatchNorm1d and BatchNorm2d.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        _, size = world()
        if not self.training or size == 1:
            return super().forward(input)

        dims = [d for d in range(input.dim()) if d != 1]
        x = input.float()
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        c = x.shape[1]
        shape = [1, c] + [1] * (input.dim() - 2)
        # Two passes (the mean, then the squared deviations from it), not E[x²] − E[x]², whose cancellation in
        # float32 costs digits that the gradient then lacks.
        sums = _summed(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        var = _summed((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        return y.to(input.dtype)


def _is_plain_batchnorm(module: nn.Module) -> bool:
    from csl.encoders.resnet import SplitBatchNorm

    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (SplitBatchNorm, nn.SyncBatchNorm, GlobalBatchNorm)
    )


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every plain batch-norm layer normalising over all workers (split batch norm kept)."""
    if device.type == "cuda":
        return _convert(module, lambda bn: _copied(nn.SyncBatchNorm, bn))
    return _convert(module, lambda bn: _copied(GlobalBatchNorm, bn))


def _copied(cls: type[nn.Module], bn: nn.Module) -> nn.Module:
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    layer.load_state_dict(bn.state_dict())
    layer.train(bn.training)
    for mine, theirs in zip(layer.parameters(), bn.parameters(), strict=True):
        mine.requires_grad_(theirs.requires_grad)  # a momentum target's layers stay without gradients
    state = list(bn.state_dict().values())
    return layer.to(state[0].device) if state else layer


def _convert(module: nn.Module, make: Any) -> nn.Module:
    if _is_plain_batchnorm(module):
        return make(module)
    for name, child in module.named_children():
        converted = _convert(child, make)
        if converted is not child:
            setattr(module, name, converted)
    return module


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (a ``csl.model.CSLModel``) ready to train as one worker of several: embeddings gathered before the
    loss, gradients averaged by DDP. Returns the DDP wrapper to call for the loss; the model itself stays reachable
    as ``.module`` (its target, queue, encoder). Convert batch norm (``global_batchnorm``) before the optimiser is
    built: conversion makes new parameters."""
    from torch.nn.parallel import DistributedDataParallel

    model.gather_workers = True
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def wants_global_bn(setting: str, model: nn.Module) -> bool:
    """sync_bn's meaning: on, off, or auto = on unless the encoder splits its batch norm (MoCo's shuffle-BN wants
    per-worker statistics, as the reference's per-GPU layers)."""
    if setting == "auto":
        return getattr(getattr(model, "encoder", None), "bn_splits", 1) <= 1
    return setting == "on"
