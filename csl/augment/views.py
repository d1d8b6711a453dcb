"""Random views of a batch: what a pipeline draws and in what order it applies it.

A ``ViewSpec`` is the recipe of one view (which ops, with which probabilities and ranges); ``augment_views``
draws the parameters of every view of every sample from one generator and applies the ops in one fixed order:

    random resized crop → flip → translate with reflection → colour jitter → grayscale → blur → solarize

That order is SimCLR's and BYOL's, and AMDIM's (flip, translate, jitter, grayscale). MoCo v2 flips last; a flip
commutes with every later op here (they are per pixel, per image, or symmetric blurs with symmetric padding), so
the order above samples the same distribution. Ops a spec leaves out cost nothing and draw nothing.

Parameters are drawn for the whole batch first (``draw_view_params``), then applied (``apply_view``): on the
CPU block by block, so that intermediates stay in cache; the result does not depend on the block size. Views
whose specs differ only in probabilities (BYOL's blur and solarize) are made in one pass over a batch of
views × samples, each sample with its own view's probability: half the kernel launches of one pass per view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from csl.augment import ops
from csl.augment.params import JitterParams, draw_crop_boxes, draw_jitter, draw_mask, draw_shifts, draw_uniform

# torchvision's RandomResizedCrop default aspect ratios.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

Prob = float | Tensor

# Bytes of float32 images processed together on the CPU (256 images at 32×32). Blocks keep each op's operands
# in cache instead of streaming a whole batch of two views from memory; much smaller blocks lose more to the
# per-op overhead than they gain (measured with benchmarks/bench_augment.py: 256 beat 64, 128 and 512 images).
# Never fewer than CPU_MIN_BLOCK images, so large images still go in batches.
CPU_BLOCK_BYTES = 3 * 1024 * 1024
CPU_MIN_BLOCK = 16


@dataclass(frozen=True)
class ViewSpec:
    """The random ops of one view. ``None`` crop scale means no random resized crop (AMDIM, CPC at 32 px)."""

    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = CROP_RATIO
    crop_interpolation: str = "bilinear"  # or "bicubic" (AMDIM's and CPC's crops)
    flip_prob: float = 0.5
    translate_max: int = 0
    translate_prob: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 3
    solarize_prob: float = 0.0


PROBABILITIES = tuple(f.name for f in fields(ViewSpec) if f.name.endswith("_prob"))


@dataclass(frozen=True)
class _Joint:
    """Views that differ only in probabilities: the shared spec, and each probability of each view.

    A probability the views share is used as a number, one they do not as a per-sample tensor (view-major);
    whether an op is drawn at all is decided from the numbers, so never by reading a tensor back from the device.
    """

    spec: ViewSpec
    values: dict[str, tuple[float, ...]]
    samples: int
    device: torch.device

    def prob(self, name: str) -> Prob:
        values = self.values[name]
        if len(set(values)) == 1:
            return values[0]
        # filled on the device: a tensor copied from the host would make the host wait for the device
        return torch.cat([torch.full((self.samples,), value, device=self.device) for value in values])

    def uses(self, name: str) -> bool:
        return max(self.values[name]) > 0

    def always(self, name: str) -> bool:
        return min(self.values[name]) >= 1


def _structure(spec: ViewSpec) -> ViewSpec:
    return replace(spec, **{name: 0.0 for name in PROBABILITIES})


def _joint(specs: Sequence[ViewSpec], n: int, device: torch.device) -> _Joint:
    values = {name: tuple(float(getattr(spec, name)) for spec in specs) for name in PROBABILITIES}
    return _Joint(specs[0], values, n, device)


@dataclass(frozen=True)
class ViewParams:
    """Every random choice for a batch of views, one entry per sample; ``None`` for an op not drawn."""

    flip: Tensor | None = None
    boxes: Tensor | None = None
    shift_y: Tensor | None = None
    shift_x: Tensor | None = None
    jitter: JitterParams | None = None
    grayscale: Tensor | None = None
    blur_sigma: Tensor | None = None
    blur_mask: Tensor | None = None  # None with a sigma: every sample blurred
    solarize: Tensor | None = None

    def select(self, part: slice) -> ViewParams:
        """The parameters of samples ``part``."""
        return ViewParams(**{f.name: _select(getattr(self, f.name), part) for f in fields(self)})


def _select(value: Tensor | JitterParams | None, part: slice) -> Tensor | JitterParams | None:
    if value is None or isinstance(value, Tensor):
        return None if value is None else value[part]
    return JitterParams(**{f.name: getattr(value, f.name)[part] for f in fields(value)})


def draw_view_params(n: int, height: int, width: int, joint: _Joint, generator: torch.Generator) -> ViewParams:
    """Draw everything for n samples of height×width, in one fixed order (so one seed gives one batch of views)."""
    spec, drawn = joint.spec, {}
    if joint.uses("flip_prob"):
        drawn["flip"] = draw_mask(n, joint.prob("flip_prob"), generator)
    if spec.crop_scale is not None:
        drawn["boxes"] = draw_crop_boxes(n, height, width, spec.crop_scale, spec.crop_ratio, generator)
    if spec.translate_max > 0 and joint.uses("translate_prob"):
        drawn["shift_y"], drawn["shift_x"] = draw_shifts(n, spec.translate_max, joint.prob("translate_prob"), generator)
    if any(spec.jitter) and joint.uses("jitter_prob"):
        drawn["jitter"] = draw_jitter(n, spec.jitter, joint.prob("jitter_prob"), generator)
    if joint.uses("grayscale_prob"):
        drawn["grayscale"] = draw_mask(n, joint.prob("grayscale_prob"), generator)
    if spec.blur_kernel_size > 1 and joint.uses("blur_prob"):
        drawn["blur_sigma"] = draw_uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], generator)
        if not joint.always("blur_prob"):
            drawn["blur_mask"] = draw_mask(n, joint.prob("blur_prob"), generator)
    if joint.uses("solarize_prob"):
        drawn["solarize"] = draw_mask(n, joint.prob("solarize_prob"), generator)
    return ViewParams(**drawn)


def _geometry(images: Tensor, params: ViewParams, spec: ViewSpec, size: int) -> Tensor:
    """Crop, flip and translate; returns float images size×size (translation alone runs on uint8, before the cast)."""
    flip = params.flip
    if params.boxes is not None:
        images = ops.resized_crop(ops.to_float(images), params.boxes, size, flip, mode=spec.crop_interpolation)
        flip = None
    elif images.shape[-2:] != (size, size):
        images = ops.resize(ops.to_float(images), size)
    if params.shift_y is not None and params.shift_x is not None:
        images = ops.translate_reflect(images, params.shift_y, params.shift_x, flip)
    elif flip is not None:
        images = ops.hflip(images, flip)
    return ops.to_float(images)


def _colour(images: Tensor, params: ViewParams, spec: ViewSpec) -> Tensor:
    if (p := params.jitter) is not None:
        images = ops.color_jitter(images, p.brightness, p.contrast, p.saturation, p.hue, p.order, p.mask, inplace=True)
    if params.grayscale is not None:
        images = ops.grayscale(images, params.grayscale)
    if params.blur_sigma is not None:
        images = ops.gaussian_blur(images, params.blur_sigma, spec.blur_kernel_size, params.blur_mask, inplace=True)
    if params.solarize is not None:
        images = ops.solarize(images, params.solarize)
    return images


def apply_view(images: Tensor, params: ViewParams, spec: ViewSpec, size: int) -> Tensor:
    """The views that params describe, float32 in [0, 1], N×3×size×size."""
    return _colour(_geometry(images, params, spec, size), params, spec)


def _parts(n: int, size: int, device: torch.device) -> list[slice]:
    """Blocks of samples to apply ops to: about CPU_BLOCK_BYTES at a time on the CPU, all at once elsewhere."""
    block = max(CPU_BLOCK_BYTES // (3 * size * size * 4), CPU_MIN_BLOCK) if device.type == "cpu" else n
    return [slice(start, start + block) for start in range(0, n, block)]


# apply_views' signature: images, copies, params, spec, size, mean, std -> views
ApplyViews = Callable[[Tensor, int, ViewParams, ViewSpec, int, Tensor | None, Tensor | None], Tensor]


def augment_views(
    images: Tensor,
    specs: Sequence[ViewSpec],
    size: int,
    generator: torch.Generator,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    apply: ApplyViews | None = None,
) -> Tensor:
    """Every view of every sample: (views × N)×3×size×size float32, view-major, parameters drawn per sample.

    images: uint8 (0-255) or float (0-1) N×3×H×W; the generator must be on their device. In [0, 1], or
    normalised with mean and std when they are given. ``apply`` replaces ``apply_views`` (a compiled copy of it).
    """
    apply = apply or apply_views
    if len({_structure(spec) for spec in specs}) > 1:
        return torch.cat([augment_views(images, [spec], size, generator, mean, std, apply) for spec in specs])
    n, _, height, width = images.shape
    joint = _joint(specs, n, images.device)
    params = draw_view_params(n * len(specs), height, width, joint, generator)
    return apply(images, len(specs), params, joint.spec, size, mean, std)


def apply_views(
    images: Tensor, copies: int, params: ViewParams, spec: ViewSpec, size: int, mean: Tensor | None,
    std: Tensor | None,
) -> Tensor:
    """``copies`` views of every image as params describe them, view-major.

    Draws nothing: the random part is done, so this is a pure function of tensors that ``torch.compile`` can fuse
    into a few kernels (on a GPU the op-by-op version is bound by the host launching hundreds of small kernels).
    """
    batch = images.repeat(copies, 1, 1, 1)  # a copy even for one view: ops may then work in place
    height, width = images.shape[-2:]
    out = torch.empty(len(batch), 3, size, size, device=images.device)
    for part in _parts(len(batch), max(size, height, width), images.device):
        views = apply_view(batch[part], params.select(part), spec, size)
        if mean is not None and std is not None:
            ops.normalize(views, mean, std, out=out[part])
        else:
            out[part] = views
    return out
