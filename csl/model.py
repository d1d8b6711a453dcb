"""The five aspects composed into one trainable model.

``build_model`` is the only place where aspects meet: it sizes each stage from the one before, adds a momentum
target or a negative queue when the loss declares it needs one, and rejects a combination that cannot work, with
the reason, before any training starts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from csl.distributed import gather_embeddings
from csl.loss import Loss
from csl.registry import AUGMENT, ENCODER, EXTRACT, LOSS, SIMILARITY, ChoiceError
from csl.similarity import Similarity
from csl.types import Features, Pairs


class CombinationError(ValueError):
    """A choice of aspects that cannot train; the message says why."""


def encode(encoder: nn.Module, view: Tensor) -> Features:
    """Run the encoder on images N×3×H×W, or on patch grids N×P×3×p×p (CPC).

    Patches are encoded as one batch of N·P small images; their pooled vectors are laid out on the √P×√P grid,
    which becomes the only feature map, and its mean the image's vector.
    """
    if view.dim() == 4:
        return encoder(view)
    n, p = view.shape[:2]
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"a patch view must hold a square grid of patches, got {p}")
    vectors = encoder(view.flatten(0, 1)).vector  # N·P×D
    grid = vectors.reshape(n, side, side, -1).permute(0, 3, 1, 2)
    return Features(vector=grid.mean(dim=(2, 3)), maps=[grid])


def encode_views(encoder: nn.Module, view_a: Tensor, view_b: Tensor, *, separate: bool) -> Features:
    """Both views' features, view a's first: one encoder pass over the 2N views, or one pass per view.

    The choice is batch normalisation's: one pass normalises over both views of every image, separate passes over
    each view's batch alone (as lightly's and MoCo's reference code do), so no statistic mixes an image's two
    views. On a CPU one pass over 2N views costs more than two over N (measured on an AMD EPYC without AMX, width
    1/4, batch 256, forward + backward + Adam only: 253 images/s joint, 286 separate with channels_last; 168 and
    214 without), likely the larger working set of every layer; on a GPU one pass launches half the kernels.
    """
    if not separate:
        return encode(encoder, torch.cat([view_a, view_b]))
    return concatenated(encode(encoder, view_a), encode(encoder, view_b))


def concatenated(a: Features, b: Features) -> Features:
    """The features of two batches as one batch, a's first."""
    return Features(vector=torch.cat([a.vector, b.vector]), maps=[torch.cat(pair) for pair in zip(a.maps, b.maps)])


def comparison_loss(similarity: Similarity, loss: Loss, pairs: Pairs) -> Tensor:
    """One comparison's loss; a loss declaring ``needs_raw_scores`` also gets the scores before the tanh clip."""
    if loss.needs_raw_scores:
        raw, clipped = similarity.raw_and_clipped(pairs.anchors, pairs.candidates)
        return loss(clipped, pairs, raw_scores=raw)
    return loss(similarity(pairs.anchors, pairs.candidates), pairs)


class NegativeQueue(nn.Module):
    """MoCo's queue of negatives: the most recent ``size`` candidates, one ring per comparison, appended after the
    batch's candidates.

    As facebookresearch/moco ``moco/builder.py``: the queue starts full of random L2-normalised keys
    (``normalize(randn(dim, K))``), so every one of its K entries is a negative from the first step; after each
    step's loss the step's candidates are written at the pointer in batch order and the pointer moves on by their
    number, modulo K. MoCo asserts K % N == 0; a ring needs no such rule, so where N does not divide K the keys
    wrap around the end and the queue still holds the K most recent ones (more than K at once: the last K).
    A ring is made on first use (its width and name come from the extraction), from a generator seeded by the
    run's seed, so it is the same on any device; rings and pointers travel in the state dict
    (``get_extra_state``), so a checkpoint restores them.
    """

    def __init__(self, size: int, *, seed: int = 0) -> None:
        super().__init__()
        self.size = size
        self.seed = seed
        self.rings: dict[str, Tensor] = {}
        self.pointer: dict[str, int] = {}

    def ring(self, name: str, dim: int, device: torch.device) -> Tensor:
        """The ring of comparison ``name`` (size × dim), made full of random unit keys on first use."""
        if name not in self.rings:
            generator = torch.Generator().manual_seed(self.seed + len(self.rings))
            keys = torch.randn(self.size, dim, generator=generator)
            self.rings[name] = torch.nn.functional.normalize(keys, dim=1).to(device)
            self.pointer[name] = 0
        return self.rings[name]

    def extend(self, pairs: Pairs) -> Pairs:
        queued = self.ring(pairs.name, pairs.candidates.shape[1], pairs.candidates.device)
        queued = queued.to(pairs.candidates.device, pairs.candidates.dtype)
        pad = torch.zeros(pairs.anchors.shape[0], queued.shape[0], dtype=torch.bool, device=queued.device)
        exclude = None if pairs.exclude is None else torch.cat([pairs.exclude, pad], dim=1)
        positives = None if pairs.positives is None else torch.cat([pairs.positives, pad], dim=1)
        # Queued keys are appended after the batch's candidates, so a positive's column does not move.
        return Pairs(pairs.anchors, torch.cat([pairs.candidates, queued]), positives, exclude, pairs.name,
                     positive_index=pairs.positive_index, weight=pairs.weight)

    @torch.no_grad()
    def push(self, pairs: Pairs) -> None:
        keys = pairs.candidates.detach().float()[-self.size :]
        buffer = self.ring(pairs.name, keys.shape[1], keys.device)
        start = self.pointer[pairs.name]
        index = (start + torch.arange(keys.shape[0], device=keys.device)) % self.size
        buffer[index] = keys
        self.pointer[pairs.name] = (start + keys.shape[0]) % self.size

    def get_extra_state(self) -> dict[str, Any]:
        return {"buffers": dict(self.rings), "pointer": dict(self.pointer)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.rings = dict(state["buffers"])
        self.pointer = dict(state["pointer"])


class KeyShuffle(nn.Module):
    """Shuffle-BN for the momentum target's pass: its batch is permuted before the encoder and restored after.

    MoCo (facebookresearch/moco ``moco/builder.py`` ``_batch_shuffle_ddp``; on one device its CIFAR demo's
    ``_batch_shuffle_single_gpu``) shuffles the keys so that, under batch norm over sub-batches (per GPU, or the
    encoder's ``bn_splits``), a key is normalised with other images than its query is; otherwise the pair can be
    told apart from the statistics they share. The model uses it only with split batch norm, where it changes
    the keys; over the whole batch it would change nothing. The permutation comes from this module's own CPU
    generator, seeded by the run's seed, so that it is the same on every device and a copy of the model draws the
    same ones; its state travels in the state dict. On CUDA it is copied from pinned memory without waiting.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    @torch.compiler.disable
    def permutation(self, n: int, device: torch.device) -> Tensor:
        order = torch.randperm(n, generator=self.generator)
        return order.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else order.to(device)

    def forward(self, encoder: nn.Module, view: Tensor) -> Features:
        order = self.permutation(view.shape[0], view.device)
        features = encode(encoder, view[order])
        restore = torch.argsort(order)
        return Features(vector=features.vector[restore], maps=[m[restore] for m in features.maps])

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state.cpu())


class CSLModel(nn.Module):
    """The composed model. With a momentum target, the target encodes what the extraction compares against (the
    keys) in passes of its own, shuffled when the encoder's batch norm is split (``KeyShuffle``). An extraction
    declaring ``one_way`` compares view a's anchors with view b's candidates only: the online network then encodes
    view a alone and the target view b alone (MoCo: ``encoder_q(im_q)``, ``encoder_k(im_k)``), so neither pass
    sees the other view and no batch statistic is shared between queries and keys."""

    def __init__(self, encoder: nn.Module, extract: nn.Module, similarity: Similarity, loss: Loss,
                 use_target: bool, separate_views: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.separate_views = separate_views
        self.encoder = encoder
        self.extract = extract
        self.similarity = similarity
        self.loss = loss
        self.target: nn.ModuleDict | None = None
        if use_target:
            self.target = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "extract": copy.deepcopy(extract)})
            self.target.requires_grad_(False)
        self.one_way = use_target and bool(getattr(extract, "one_way", False))
        split = getattr(encoder, "bn_splits", 1) > 1  # declared by encoders whose batch norm can be split
        self.key_shuffle = KeyShuffle(seed) if use_target and split else None
        self.queue = NegativeQueue(loss.queue_size, seed=seed) if loss.queue_size else None
        # Several workers: the embeddings of every worker's shard are gathered (with gradients) before the pairs
        # are built, so the loss is the global batch's on every worker (csl.distributed).
        self.gather_workers = False

    def _target_features(self, view: Tensor) -> Features:
        assert self.target is not None
        if self.key_shuffle is not None:
            return self.key_shuffle(self.target["encoder"], view)
        return encode(self.target["encoder"], view)

    def forward(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor]:
        """SSL loss of one batch of two views (its comparisons weighted by ``Pairs.weight``), and the online pooled
        vectors of view a (for the online probe)."""
        n = view_a.shape[0]
        online_b: dict[str, Tensor] | None = None
        if self.one_way:
            features = encode(self.encoder, view_a)
            online_a, vectors_a = self.extract.embed(features), features.vector
        else:
            both = encode_views(self.encoder, view_a, view_b, separate=self.separate_views)
            embedded = self.extract.embed(both)
            online_a = {k: v[:n] for k, v in embedded.items()}
            online_b = {k: v[n:] for k, v in embedded.items()}
            vectors_a = both.vector[:n]
        target_a = target_b = None
        if self.target is not None:
            with torch.no_grad():
                if self.one_way:
                    target_b = self.target["extract"].embed(self._target_features(view_b))
                else:
                    if self.separate_views:
                        keys = concatenated(self._target_features(view_a), self._target_features(view_b))
                    else:
                        keys = self._target_features(torch.cat([view_a, view_b]))
                    t = self.target["extract"].embed(keys)
                    target_a = {k: v[:n] for k, v in t.items()}
                    target_b = {k: v[n:] for k, v in t.items()}
        if self.gather_workers:
            online_a, online_b = gather_embeddings(online_a), gather_embeddings(online_b)
            target_a, target_b = gather_embeddings(target_a), gather_embeddings(target_b)
        total = vectors_a.new_zeros(())
        all_pairs = self.extract.pairs(online_a, online_b, target_a, target_b)
        for pairs in all_pairs:
            extended = self.queue.extend(pairs) if self.queue is not None else pairs
            total = total + pairs.weight * comparison_loss(self.similarity, self.loss, extended)
        if self.queue is not None:
            for pairs in all_pairs:
                self.queue.push(pairs)
        return total, vectors_a

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of every parameter AND every buffer (pl_bolts' BYOL skipped biases); integer buffers are copied."""
        if self.target is None:
            return
        online = [self.encoder, self.extract]
        target = [self.target["encoder"], self.target["extract"]]
        t_params = [p for m in target for p in m.parameters()]
        o_params = [p for m in online for p in m.parameters()]
        torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
        for t_module, o_module in zip(target, online, strict=True):
            for t_buf, o_buf in zip(t_module.buffers(), o_module.buffers(), strict=True):
                if t_buf.is_floating_point():
                    t_buf.lerp_(o_buf, 1.0 - momentum)
                else:
                    t_buf.copy_(o_buf)

    @torch.no_grad()
    def representation(self, view: Tensor) -> Tensor:
        """What evaluation reads: the encoder's pooled vector (the mean patch vector for patch views)."""
        return encode(self.encoder, view).vector


def build_model(config: Mapping[str, Any], *, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
                ) -> tuple[Any, CSLModel]:
    """Build the augmentation pipeline and the model from a resolved flat config (``csl.config.resolve``)."""
    context = {"image_size": image_size, "mean": mean, "std": std}
    try:
        pipeline = AUGMENT.build_from_config(config["augment"], config, context)
    except ChoiceError:
        raise
    except ValueError as error:  # an option's value a pipeline rejects: one line naming it, as for unknown options
        raise ChoiceError(f"augment '{config['augment']}': {error}") from error
    # the encoder is sized for what it sees: the pipeline's views, or its patches (an encoder's stem may follow it)
    encoder = ENCODER.build_from_config(config["encoder"], config, {"image_size": pipeline.encoder_size})
    map_channels = (encoder.vector_dim,) if pipeline.patches else tuple(encoder.map_channels)
    dims = {"vector_dim": encoder.vector_dim, "map_channels": map_channels}
    try:
        extract = EXTRACT.build_from_config(config["extract"], config, dims)
    except ValueError as error:
        raise CombinationError(f"extract '{config['extract']}' with encoder '{config['encoder']}' and augment "
                               f"'{config['augment']}': {error}") from error
    similarity = SIMILARITY.build_from_config(config["similarity"], config, {"dim": extract.out_dim})
    loss = LOSS.build_from_config(config["loss"], config, {})
    reason = loss.incompatibility(similarity)
    if reason:
        raise CombinationError(reason)
    momentum = config.get("target_momentum")
    if loss.needs_target and momentum == 0:
        raise CombinationError(f"loss '{config['loss']}' needs a momentum target, but target_momentum is 0")
    use_target = bool(momentum) or loss.needs_target
    splits = getattr(encoder, "bn_splits", 1)
    if splits > 1 and config.get("batch_size", splits) % splits:
        raise CombinationError(f"bn_splits {splits} must divide batch_size {config['batch_size']}: batch norm "
                               f"normalises over {splits} equal sub-batches")
    separate = config.get("encode_views", "joint") == "separate"
    return pipeline, CSLModel(encoder, extract, similarity, loss, use_target, separate_views=separate,
                              seed=int(config.get("seed", 0)))


def target_momentum(config: Mapping[str, Any], progress: float) -> float:
    """BYOL's schedule: τ rises from its base to ``target_momentum_final`` on a cosine over training."""
    base = config.get("target_momentum") or 0.99
    final = config.get("target_momentum_final", 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
