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
    views. Speed hardly differs on a CPU (bench_peer.py at width 1/4: 0.94x lightly joint, 0.97x separate); on a
    GPU one pass launches half the kernels.
    """
    if not separate:
        return encode(encoder, torch.cat([view_a, view_b]))
    a, b = encode(encoder, view_a), encode(encoder, view_b)
    return Features(vector=torch.cat([a.vector, b.vector]), maps=[torch.cat(pair) for pair in zip(a.maps, b.maps)])


def comparison_loss(similarity: Similarity, loss: Loss, pairs: Pairs) -> Tensor:
    """One comparison's loss; a loss declaring ``needs_raw_scores`` also gets the scores before the tanh clip."""
    if loss.needs_raw_scores:
        raw, clipped = similarity.raw_and_clipped(pairs.anchors, pairs.candidates)
        return loss(clipped, pairs, raw_scores=raw)
    return loss(similarity(pairs.anchors, pairs.candidates), pairs)


class NegativeQueue(nn.Module):
    """MoCo's queue: the most recent ``size`` candidates, one ring buffer per comparison, appended as negatives.

    Buffers are created on first use (their width and count come from the extraction) and travel in the state
    dict through ``get_extra_state`` so a checkpoint restores them.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.rings: dict[str, Tensor] = {}
        self.filled: dict[str, int] = {}
        self.pointer: dict[str, int] = {}

    def extend(self, pairs: Pairs) -> Pairs:
        queued = self.rings.get(pairs.name)
        if queued is None or self.filled[pairs.name] == 0:
            return pairs
        queued = queued[: self.filled[pairs.name]].to(pairs.candidates.device, pairs.candidates.dtype)
        pad = torch.zeros(pairs.anchors.shape[0], queued.shape[0], dtype=torch.bool, device=queued.device)
        exclude = None if pairs.exclude is None else torch.cat([pairs.exclude, pad], dim=1)
        positives = None if pairs.positives is None else torch.cat([pairs.positives, pad], dim=1)
        # Queued keys are appended after the batch's candidates, so a positive's column does not move.
        return Pairs(pairs.anchors, torch.cat([pairs.candidates, queued]), positives, exclude, pairs.name,
                     positive_index=pairs.positive_index, weight=pairs.weight)

    @torch.no_grad()
    def push(self, pairs: Pairs) -> None:
        keys = pairs.candidates.detach().float()[-self.size :]
        if pairs.name not in self.rings:
            self.rings[pairs.name] = torch.zeros(self.size, keys.shape[1], device=keys.device)
            self.filled[pairs.name] = 0
            self.pointer[pairs.name] = 0
        buffer, start = self.rings[pairs.name], self.pointer[pairs.name]
        index = (start + torch.arange(keys.shape[0], device=keys.device)) % self.size
        buffer[index] = keys
        self.pointer[pairs.name] = (start + keys.shape[0]) % self.size
        self.filled[pairs.name] = min(self.size, self.filled[pairs.name] + keys.shape[0])

    def get_extra_state(self) -> dict[str, Any]:
        return {"buffers": dict(self.rings), "filled": dict(self.filled), "pointer": dict(self.pointer)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.rings = dict(state["buffers"])
        self.filled = dict(state["filled"])
        self.pointer = dict(state["pointer"])


class CSLModel(nn.Module):
    def __init__(self, encoder: nn.Module, extract: nn.Module, similarity: Similarity, loss: Loss,
                 use_target: bool, separate_views: bool = False) -> None:
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
        self.queue = NegativeQueue(loss.queue_size) if loss.queue_size else None

    def forward(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor]:
        """SSL loss of one batch of two views (its comparisons weighted by ``Pairs.weight``), and the online pooled
        vectors of view a (for the online probe)."""
        n = view_a.shape[0]
        both = encode_views(self.encoder, view_a, view_b, separate=self.separate_views)
        embedded = self.extract.embed(both)
        online_a = {k: v[:n] for k, v in embedded.items()}
        online_b = {k: v[n:] for k, v in embedded.items()}
        target_a = target_b = None
        if self.target is not None:
            with torch.no_grad():
                t = self.target["extract"].embed(
                    encode_views(self.target["encoder"], view_a, view_b, separate=self.separate_views))
            target_a = {k: v[:n] for k, v in t.items()}
            target_b = {k: v[n:] for k, v in t.items()}
        total = both.vector.new_zeros(())
        all_pairs = self.extract.pairs(online_a, online_b, target_a, target_b)
        for pairs in all_pairs:
            extended = self.queue.extend(pairs) if self.queue is not None else pairs
            total = total + pairs.weight * comparison_loss(self.similarity, self.loss, extended)
        if self.queue is not None:
            for pairs in all_pairs:
                self.queue.push(pairs)
        return total, both.vector[:n]

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
    separate = config.get("encode_views", "joint") == "separate"
    return pipeline, CSLModel(encoder, extract, similarity, loss, use_target, separate_views=separate)


def target_momentum(config: Mapping[str, Any], progress: float) -> float:
    """BYOL's schedule: τ rises from its base to ``target_momentum_final`` on a cosine over training."""
    base = config.get("target_momentum") or 0.99
    final = config.get("target_momentum_final", 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
