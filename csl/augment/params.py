"""Per-sample random parameters for the ops in ``csl.augment.ops``, drawn in batches from one generator.

Every function draws for n samples at once on the generator's device (``torch.rand(..., generator=g)``, as
airbench does), so a batch of parameters costs a handful of kernel launches and never a host round trip. Ranges
follow torchvision's transforms, so a pipeline here samples from the same distribution as its torchvision
counterpart (not the same values: the draws are batched, not per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def draw_uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """n floats uniform in [low, high)."""
    return torch.rand(n, generator=generator, device=generator.device).mul_(high - low).add_(low)


def draw_mask(n: int, prob: float | Tensor, generator: torch.Generator) -> Tensor:
    """n bools, each True with probability prob (RandomApply's p); prob may be one per sample."""
    return torch.rand(n, generator=generator, device=generator.device) < prob


def draw_shifts(n: int, max_shift: int, prob: float | Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Integer (dy, dx) in [-max_shift, max_shift], zero for the samples not translated.

    As pl_bolts' RandomTranslateWithReflect inside RandomApply(p): each axis uniform over the integers.
    """
    device = generator.device
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator, device=device)
    shifts = shifts * draw_mask(n, prob, generator)
    return shifts[0], shifts[1]


def _randint_below(high: Tensor, generator: torch.Generator) -> Tensor:
    """One integer in [0, high) per entry of high (high >= 1)."""
    u = torch.rand(high.shape, generator=generator, device=generator.device)
    return torch.minimum((u * high).floor_().long(), high - 1)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's RandomResizedCrop fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def draw_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> Tensor:
    """RandomResizedCrop boxes, N×4 long (top, left, height, width).

    torchvision's rule, vectorised: ``attempts`` candidates per sample (area uniform in scale × image area,
    log aspect ratio uniform in log ratio), the first that fits is kept; a sample with none gets the central
    fallback crop, as torchvision after its 10 tries.
    """
    device = generator.device
    area = torch.rand(n, attempts, generator=generator, device=device).mul_((scale[1] - scale[0]) * height * width)
    area.add_(scale[0] * height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.rand(n, attempts, generator=generator, device=device).mul_(log_hi - log_lo).add_(log_lo).exp_()
    box_w = (area * aspect).sqrt_().round_().long()
    box_h = (area / aspect).sqrt_().round_().long()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    found = fits.any(dim=1)
    fallback_h, fallback_w = _fallback_box(height, width, ratio)
    box_h = torch.where(found, box_h.gather(1, first).squeeze(1), fallback_h)
    box_w = torch.where(found, box_w.gather(1, first).squeeze(1), fallback_w)
    top = torch.where(found, _randint_below(height - box_h + 1, generator), (height - fallback_h) // 2)
    left = torch.where(found, _randint_below(width - box_w + 1, generator), (width - fallback_w) // 2)
    return torch.stack((top, left, box_h, box_w), dim=1)


def draw_order(n: int, generator: torch.Generator) -> Tensor:
    """N×4 long, an independent uniform random permutation of range(4) per sample (ColorJitter's randperm)."""
    return torch.rand(n, 4, generator=generator, device=generator.device).argsort(dim=1)


@dataclass(frozen=True)
class JitterParams:
    """One ColorJitter draw per sample: factors N, order N×4, mask N (whether the sample is jittered at all)."""

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    mask: Tensor


def draw_jitter(
    n: int, strengths: tuple[float, float, float, float], prob: float | Tensor, generator: torch.Generator
) -> JitterParams:
    """RandomApply([ColorJitter(b, c, s, h)], p=prob) for n samples.

    As torchvision: brightness, contrast and saturation factors uniform in [max(0, 1 - x), 1 + x], hue uniform in
    [-h, h], the four applied in a random order.
    """
    brightness, contrast, saturation, hue = strengths
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue jitter must lie in [0, 0.5], got {hue}")
    return JitterParams(
        brightness=draw_uniform(n, max(0.0, 1.0 - brightness), 1.0 + brightness, generator),
        contrast=draw_uniform(n, max(0.0, 1.0 - contrast), 1.0 + contrast, generator),
        saturation=draw_uniform(n, max(0.0, 1.0 - saturation), 1.0 + saturation, generator),
        hue=draw_uniform(n, -hue, hue, generator),
        order=draw_order(n, generator),
        mask=draw_mask(n, prob, generator),
    )
