"""Aspect 5, loss: scores M×K and the positives (a mask, or one column per anchor) → a scalar.

A loss is an ``nn.Module`` called as ``loss(scores, pairs)``. It may declare what it needs from the rest of the
model, checked when the model is built (``csl.model.build_model``), never during training:
- ``needs_target``: a momentum (EMA) target network must produce the candidates;
- ``queue_size``: how many past candidates to keep as extra negatives (MoCo);
- ``needs_raw_scores``: the loss is also called with ``raw_scores=``, the scores before the similarity's tanh
  clip (``csl.similarity``: the clip stays in the similarity, which hands both);
- ``incompatibility(similarity)``: a reason this loss cannot work with that similarity, or None.

To add a loss: write one builder below with ``@LOSS.register("name")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl.registry import LOSS
from csl.similarity import Cosine
from csl.types import Pairs


class Loss(nn.Module):
    needs_target: bool = False
    queue_size: int = 0
    needs_raw_scores: bool = False

    def incompatibility(self, similarity: nn.Module) -> str | None:
        return None


def _negative_mask(pairs: Pairs) -> Tensor:
    negatives = ~pairs.positive_mask()
    if pairs.exclude is not None:
        negatives = negatives & ~pairs.exclude
    return negatives


def mean_over(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, without boolean indexing (which syncs with the host on CUDA)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def nce_per_positive(scores: Tensor, pairs: Pairs) -> Tensor:
    """−log(e^{s⁺} / (e^{s⁺} + Σ_neg e^{s⁻})) for every positive pair, each against all of its anchor's negatives.

    With one positive per anchor this is NT-Xent / InfoNCE exactly; with several (a global vector against every
    location of the same image) it is AMDIM's NCE. Excluded candidates are masked out of the sum, not subtracted
    from it (the pl_bolts NT-Xent bug). Pairs with ``positive_index`` take ``single_positive_nce``, the same value.
    """
    if pairs.positive_index is not None:
        return single_positive_nce(scores, pairs.positive_index, pairs.exclude)
    neg_scores = scores.masked_fill(~_negative_mask(pairs), float("-inf"))
    neg_lse = torch.logsumexp(neg_scores, dim=1, keepdim=True)  # M×1, −inf when an anchor has no negatives
    per_pair = torch.logaddexp(scores, neg_lse) - scores
    return mean_over(per_pair, pairs.positive_mask())


def single_positive_nce(scores: Tensor, positive_index: Tensor, exclude: Tensor | None) -> Tensor:
    """``nce_per_positive`` when each anchor has one positive: cross-entropy with the positive's column as target.

    The positive plus the negatives are every candidate not excluded, so −log softmax over the scores with the
    excluded ones at −inf is the same loss, and its fused kernel keeps one M×K buffer instead of the several
    (masks, masked copies, logaddexp) of the mask path. The mean over anchors is the mean over positive pairs.
    """
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(scores, positive_index)


class InfoNCE(Loss):
    """SimCLR's NT-Xent, CPC's InfoNCE: cross-entropy of each positive against the anchor's negatives."""

    def forward(self, scores: Tensor, pairs: Pairs) -> Tensor:
        return nce_per_positive(scores, pairs)


class AmdimNCE(Loss):
    """AMDIM's NCE plus its score regulariser ``reg_weight · mean(s²)`` on the scores *before* the tanh clip.

    amdim-public ``costs.py`` (``NCE_MI_MULTI._model_scores``): ``lgt_reg = 5e-2 * (raw_scores**2.).mean()`` is
    taken over every score of the comparison, then the scores are clipped and enter the NCE. The regulariser is
    what keeps the raw scores from growing until the clip saturates; on clipped scores it would be bounded by tclip²
    and its gradient would vanish exactly there. So this loss declares ``needs_raw_scores`` and the model hands it
    the similarity's scores before and after the clip; called without them (no clip), the scores are the raw ones.
    """

    needs_raw_scores = True

    def __init__(self, reg_weight: float) -> None:
        super().__init__()
        self.reg_weight = reg_weight

    def forward(self, scores: Tensor, pairs: Pairs, raw_scores: Tensor | None = None) -> Tensor:
        raw = scores if raw_scores is None else raw_scores
        return nce_per_positive(scores, pairs) + self.reg_weight * raw.pow(2).mean()


class ByolLoss(Loss):
    """BYOL: 2 − 2·cos(prediction, target) on positive pairs only; negatives play no part.

    With cosine at temperature τ the loss is 2 − 2·cos/τ, the same objective scaled; the byol preset uses τ = 1.
    """

    needs_target = True

    def incompatibility(self, similarity: nn.Module) -> str | None:
        if not isinstance(similarity, Cosine):
            return ("loss 'byol' is 2 − 2·s with no negatives: an unbounded score (dot, bilinear) sends it to −∞, "
                    "so it needs similarity 'cosine'")
        return None

    def forward(self, scores: Tensor, pairs: Pairs) -> Tensor:
        return mean_over(2.0 - 2.0 * scores, pairs.positive_mask())


class MocoLoss(InfoNCE):
    """MoCo: InfoNCE of each query against its key and a queue of past keys (the queue: ``csl.model.NegativeQueue``).

    facebookresearch/moco ``moco/builder.py`` ``MoCo.forward``: logits ``[q·k⁺, q·queue] / T``, label 0,
    cross-entropy; the negatives are the queue's K keys only. That is ``batch_negatives=False`` here: of the
    batch's candidates only each anchor's positive is scored, so the logits are exactly MoCo's ``[l_pos, l_neg]``.
    ``batch_negatives=True`` lets the batch's other candidates (the other images' keys, both views in a
    symmetric comparison) be negatives too, as SimCLR's in-batch negatives. Anchors with several positives (a
    vector against every location) keep their positives and the queue. The queued keys are the last
    ``queue_size`` candidates (``csl.types.Pairs``: the queue's are appended after the batch's).
    """

    needs_target = True

    def __init__(self, queue_size: int, batch_negatives: bool) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be ≥ 1, got {queue_size}")
        self.queue_size = queue_size
        self.batch_negatives = batch_negatives

    def forward(self, scores: Tensor, pairs: Pairs) -> Tensor:
        if self.batch_negatives:
            return nce_per_positive(scores, pairs)
        batch = scores.shape[1] - self.queue_size
        if batch < 1:
            raise ValueError(f"loss 'moco' expects its {self.queue_size} queued keys after the batch's candidates, "
                             f"got {scores.shape[1]} candidates in all")
        queued = scores[:, batch:]
        if pairs.positive_index is not None:
            positive = scores.gather(1, pairs.positive_index[:, None])
            logits = torch.cat([positive, queued], dim=1)
            return F.cross_entropy(logits, torch.zeros_like(pairs.positive_index))
        positives = pairs.positive_mask()
        in_batch = torch.arange(scores.shape[1], device=scores.device) < batch
        exclude = in_batch[None, :] & ~positives
        return nce_per_positive(scores, Pairs(pairs.anchors, pairs.candidates, positives, exclude, pairs.name))


class TripletLoss(Loss):
    """Margin ranking: relu(margin − s⁺ + s⁻) with the hardest negative of each anchor (batch-hard mining)."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, scores: Tensor, pairs: Pairs) -> Tensor:
        hardest = scores.masked_fill(~_negative_mask(pairs), float("-inf")).amax(dim=1, keepdim=True)
        per_pair = torch.relu(self.margin - scores + hardest)
        return mean_over(per_pair, pairs.positive_mask() & torch.isfinite(hardest))


@LOSS.register("infonce")
def infonce() -> Loss:
    return InfoNCE()


@LOSS.register("amdim_nce")
def amdim_nce(*, reg_weight: float = 0.05) -> Loss:
    return AmdimNCE(reg_weight)


@LOSS.register("byol")
def byol() -> Loss:
    return ByolLoss()


@LOSS.register("moco")
def moco(*, queue_size: int = 4096, batch_negatives: bool = False) -> Loss:
    """queue_size: MoCo's K (65,536 on ImageNet; 4,096 in its CIFAR demo, where the demo finds it saturates)."""
    return MocoLoss(queue_size, batch_negatives)


@LOSS.register("triplet")
def triplet(*, margin: float = 0.5) -> Loss:
    return TripletLoss(margin)
