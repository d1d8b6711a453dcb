"""The moco_v2 preset against MoCo as its authors wrote it, transcribed here independently of csl.

References (read from facebookresearch/moco): ``moco/builder.py`` ``MoCo.__init__`` (the queue ``normalize(randn(dim,
K))``, the pointer), ``MoCo.forward`` (l_pos = q·k, l_neg = q·queue, logits / T, labels 0), ``_dequeue_and_enqueue``
(the N keys written at the pointer in batch order, pointer + N mod K), ``_momentum_update_key_encoder``, and the
CIFAR demo ``colab/moco_cifar10_demo.ipynb`` (``SplitBatchNorm``, ``_batch_shuffle_single_gpu``). The transcriptions
below take the same weights, views and shuffle permutations as the preset's path and must give its logits, loss and
queue step after step.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl.config import resolve
from csl.encoders.resnet import SplitBatchNorm, build_resnet
from csl.extract.heads import Head
from csl.model import CombinationError, NegativeQueue, build_model
from csl.train import Run
from csl.types import Features, Pairs
from tests.helpers import cifar_mini, random_images, tiny  # noqa: F401  (cifar_mini is a fixture)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class DemoSplitBatchNorm(nn.BatchNorm2d):
    """The CIFAR demo's SplitBatchNorm, written out from the notebook."""

    def __init__(self, num_features: int, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, input: Tensor) -> Tensor:
        n, c, h, w = input.shape
        if self.training:
            running_mean_split = self.running_mean.repeat(self.num_splits)
            running_var_split = self.running_var.repeat(self.num_splits)
            # the demo's .view, as reshape so that a channels-last input (which it never had) is copied
            outcome = F.batch_norm(input.reshape(-1, c * self.num_splits, h, w), running_mean_split,
                                   running_var_split, self.weight.repeat(self.num_splits),
                                   self.bias.repeat(self.num_splits), True, self.momentum, self.eps).view(n, c, h, w)
            self.running_mean.data.copy_(running_mean_split.view(self.num_splits, c).mean(dim=0))
            self.running_var.data.copy_(running_var_split.view(self.num_splits, c).mean(dim=0))
            return outcome
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                            self.momentum, self.eps)


class Pooled(nn.Module):
    """encoder_q of builder.py: the trunk's pooled vector through the fc (here the MLP head)."""

    def __init__(self, trunk: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.trunk, self.fc = trunk, fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.trunk(x).vector)


class MoCoReference:
    """builder.py's MoCo on one device, as the demo runs it: key encoder a copy of the query encoder updated by
    momentum at the start of each forward, the key batch shuffled for batch norm and unshuffled after."""

    def __init__(self, encoder_q: nn.Module, queue: Tensor, m: float, T: float, shuffle: torch.Generator) -> None:
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.queue = queue.clone()  # dim × K
        self.queue_ptr = 0
        self.K, self.m, self.T = queue.shape[1], m, T
        self.shuffle = shuffle

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = self.queue_ptr
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr = (ptr + batch_size) % self.K

    def forward(self, im_q: Tensor, im_k: Tensor) -> tuple[Tensor, Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_shuffle = torch.randperm(im_k.shape[0], generator=self.shuffle)
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


class RecordViews:
    """The run's own augmentation, its views kept so the reference sees the same ones."""

    def __init__(self, pipeline) -> None:  # type: ignore[no-untyped-def]
        self.pipeline, self.views = pipeline, []

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        views = self.pipeline(images, generator)
        self.views.append(tuple(v.clone() for v in views))
        return views


def capture_loss_inputs(run: Run) -> list[tuple[Tensor, Pairs]]:
    captured: list[tuple[Tensor, Pairs]] = []
    run.model.loss.register_forward_hook(lambda module, args, out: captured.append((args[0].detach(), args[1])))
    return captured


def moco_config(**overrides) -> dict:  # type: ignore[no-untyped-def]
    return tiny(method="moco_v2", encoder="resnet18", amp=False, **overrides)


def test_preset_path_matches_the_moco_builder_step_after_step(cifar_mini) -> None:
    """Three training steps of the moco_v2 preset (K 64, N 16, 8 batch-norm splits) against MoCo's forward, its
    queue update and its momentum update: logits, loss, queue and pointer agree at every step."""
    run = Run(moco_config(queue_size=64, batch_size=16), data=cifar_mini)
    cfg = run.config
    assert cfg["bn_splits"] == 8 and not cfg["symmetric"] and not cfg["batch_negatives"]
    n, k = cfg["batch_size"], cfg["queue_size"]

    trunk = build_resnet("resnet18", 18, width=cfg["width"], stem="cifar", zero_init_residual=True,
                         norm_layer=functools.partial(DemoSplitBatchNorm, num_splits=cfg["bn_splits"]))
    trunk.load_state_dict(run.model.encoder.state_dict())
    ours_head = run.model.extract.head.net
    fc = nn.Sequential(nn.Linear(ours_head[0].in_features, ours_head[0].out_features), nn.ReLU(),
                       nn.Linear(ours_head[2].in_features, ours_head[2].out_features))
    fc.load_state_dict({"0.weight": ours_head[0].weight, "0.bias": ours_head[0].bias,
                        "2.weight": ours_head[2].weight, "2.bias": ours_head[2].bias})
    queue = run.model.queue.ring("a:b", cfg["proj_dim"], run.device)  # the preset's initial queue
    shuffle = torch.Generator()
    assert run.model.key_shuffle is not None
    shuffle.set_state(run.model.key_shuffle.generator.get_state())
    reference = MoCoReference(Pooled(trunk, fc), queue.T, m=cfg["target_momentum"], T=cfg["temperature"],
                              shuffle=shuffle)
    optimizer = torch.optim.SGD(reference.encoder_q.parameters(), lr=cfg["lr"], momentum=cfg["sgd_momentum"],
                                weight_decay=cfg["weight_decay"])

    run.pipeline = RecordViews(run.pipeline)
    captured = capture_loss_inputs(run)
    batches = run.train_data.batches(n, run.generator)
    for step in range(3):
        ours_loss = float(run.train_step(*next(batches)))
        scores, pairs = captured[step]
        view_q, view_k = run.pipeline.views[step]
        for group in optimizer.param_groups:
            group["lr"] = run.optimizer.param_groups[0]["lr"]
        logits, labels = reference.forward(view_q, view_k)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        assert scores.shape == (n, n + k)  # the batch's keys, then all K queued ones
        assert torch.equal(pairs.positive_index, torch.arange(n))
        torch.testing.assert_close(scores.diagonal()[:, None], logits[:, :1].detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(scores[:, n:], logits[:, 1:].detach(), rtol=1e-4, atol=1e-4)
        assert ours_loss == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-5)
        # MoCo's queue holds normalised keys; ours the keys as the extraction gives them, which the cosine
        # similarity normalises: the same keys, up to their lengths
        ring = F.normalize(run.model.queue.rings["a:b"], dim=1)
        torch.testing.assert_close(ring, reference.queue.T, rtol=1e-4, atol=1e-5)
        assert run.model.queue.pointer["a:b"] == reference.queue_ptr == (step + 1) * n % k


def test_queue_starts_full_of_random_unit_keys_seeded_by_the_run(cifar_mini) -> None:
    """All K entries are negatives from the first step: random, L2-normalised, the same for the same seed."""
    def first_step_pairs(seed: int) -> tuple[Tensor, Pairs]:
        run = Run(moco_config(seed=seed), data=cifar_mini)
        captured = capture_loss_inputs(run)
        run.train_step(*next(iter(run.train_data.batches(run.config["batch_size"], run.generator))))
        return captured[0]

    (scores, pairs), (_, again), (_, other) = first_step_pairs(0), first_step_pairs(0), first_step_pairs(1)
    n, k = 16, 64
    assert scores.shape == (n, n + k) and torch.isfinite(scores).all()
    queued = pairs.candidates[n:]
    torch.testing.assert_close(queued.norm(dim=1), torch.ones(k))
    assert float(queued.std(dim=0).min()) > 0.05  # not one repeated key
    assert float((queued @ queued.T - torch.eye(k)).abs().max()) < 0.99  # not duplicates either
    assert torch.equal(queued, again.candidates[n:])
    assert not torch.allclose(queued, other.candidates[n:])


def test_keys_share_no_batch_statistics_with_the_queries() -> None:
    """The key pass is the target's own, over the key view alone: other query images give the same keys. Under
    split batch norm the key batch is shuffled before the target encoder and restored after, so key i is
    normalised with other images than query i (Shuffle-BN); the shuffle changes the keys."""
    torch.manual_seed(0)
    pipeline, model = build_model(resolve(moco_config(queue_size=64)), image_size=32, mean=MEAN, std=STD)
    model.train()
    view_q, view_k = pipeline(random_images(16), torch.Generator().manual_seed(0))
    other_q, _ = pipeline(random_images(16, seed=5), torch.Generator().manual_seed(1))
    first, second = copy.deepcopy(model), copy.deepcopy(model)

    seen: list[Tensor] = []
    first.target["encoder"].conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    first(view_q, view_k)
    second(other_q, view_k)
    keys = first.queue.rings["a:b"][:16]
    torch.testing.assert_close(keys, second.queue.rings["a:b"][:16])  # the queries played no part

    (shuffled,) = seen  # one target pass, over the key view only
    order = torch.tensor([int((shuffled[i] - view_k).flatten(1).abs().sum(1).argmin()) for i in range(16)])
    assert sorted(order.tolist()) == list(range(16)) and not torch.equal(order, torch.arange(16))
    with torch.no_grad():
        target = first.target
        unshuffled = F.normalize(target["extract"].embed(target["encoder"](view_k))["z"], dim=1)
        restored = Features(target["encoder"](view_k[order]).vector[torch.argsort(order)], [])
        restored = F.normalize(target["extract"].embed(restored)["z"], dim=1)
    torch.testing.assert_close(F.normalize(keys, dim=1), restored, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(F.normalize(keys, dim=1), unshuffled, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batch_norm_is_the_demos(channels_last: bool) -> None:
    """Output, gradients and running statistics as the demo's layer; each sample normalised with its own
    sub-batch only (the samples k, k + s, ...); plain batch norm on the running statistics in evaluation."""
    torch.manual_seed(0)
    ours, demo = SplitBatchNorm(6, num_splits=4), DemoSplitBatchNorm(6, num_splits=4)
    with torch.no_grad():
        for layer in (ours, demo):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 6))
            layer.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(16, 6, 5, 5) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), demo(xb)
    torch.testing.assert_close(ya, yb)
    assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last
    (ya * torch.arange(ya.numel()).reshape(ya.shape).sin()).sum().backward()
    (yb * torch.arange(yb.numel()).reshape(yb.shape).sin()).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, demo.weight.grad)
    torch.testing.assert_close(ours.running_mean, demo.running_mean)
    torch.testing.assert_close(ours.running_var, demo.running_var)

    moved = x.clone()
    moved[1] += 10.0  # sample 1 is in sub-batch 1 with samples 5, 9, 13
    changed = (ours(moved) - ours(x)).flatten(1).abs().amax(dim=1) > 1e-4
    assert changed.tolist() == [i % 4 == 1 for i in range(16)]
    ours.eval()
    plain = F.batch_norm(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, False, 0.0, ours.eps)
    torch.testing.assert_close(ours(x), plain)


def test_split_batch_norm_needs_batches_it_can_split() -> None:
    with pytest.raises(ValueError, match="bn_splits 4 needs a batch divisible by 4, got 6"):
        SplitBatchNorm(3, num_splits=4)(torch.randn(6, 3, 2, 2))
    with pytest.raises(CombinationError, match="bn_splits 8 must divide batch_size 20"):
        build_model(resolve(moco_config(batch_size=20)), image_size=32, mean=MEAN, std=STD)


def test_queue_wraps_where_the_batch_does_not_divide_it() -> None:
    """MoCo asserts K % N == 0; the ring instead keeps the K most recent keys, written on from the pointer."""
    queue = NegativeQueue(size=24)
    first, second = torch.randn(16, 4), torch.randn(16, 4)
    for keys in (first, second):
        queue.push(Pairs(keys, keys, None, None, "x", positive_index=torch.arange(16)))
    ring = queue.rings["x"]
    assert torch.equal(ring[16:], second[:8]) and torch.equal(ring[:8], second[8:])
    assert torch.equal(ring[8:16], first[8:])
    assert queue.pointer["x"] == 32 % 24


def test_mlp_nobn_head_is_mocos_fc() -> None:
    """MoCo v2's --mlp head: fc = Linear(dim_mlp, dim_mlp) → ReLU → Linear(dim_mlp, dim), biases on both."""
    torch.manual_seed(0)
    head = Head("mlp_nobn", 12, None, 6)
    x = torch.randn(5, 12)
    l1, l2 = head.net[0], head.net[2]
    assert l1.out_features == 12 and l1.bias is not None and l2.bias is not None
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    torch.testing.assert_close(head(x), torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)


def test_symmetric_and_batch_negatives_stay_options(cifar_mini) -> None:
    """MoCo v3's symmetrised loss (both views as queries, 2N keys enqueued) and SimCLR-style in-batch negatives."""
    run = Run(moco_config(symmetric=True, batch_negatives=True), data=cifar_mini)
    assert not run.model.one_way
    captured = capture_loss_inputs(run)
    loss = run.train_step(*next(iter(run.train_data.batches(16, run.generator))))
    scores, pairs = captured[0]
    assert scores.shape == (32, 32 + 64) and torch.isfinite(loss)
    assert run.model.queue.pointer["a:b"] == 32
