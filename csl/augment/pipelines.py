"""The augmentation choices: each method's pipeline, as its paper and pl_bolts define it.

Every builder is keyword-only; ``image_size`` (the data's side), ``mean`` and ``std`` are context the framework
supplies. Where a paper's recipe depends on the dataset, an option's default is ``None``, meaning "what the reference
does at this image size", resolved by one small function per recipe (``_simclr_defaults``, ``_dim_defaults``): an
explicit value always wins, and ``csl list`` shows which options follow the size. Options that mean the same thing
carry the same name in every pipeline that has them:

    jitter_strength   multiplies the pipeline's own colour-jitter strengths (1.0 = the paper's)
    jitter_prob       probability that a view is colour-jittered at all
    grayscale_prob    probability that a view is turned to grayscale
    blur_prob         probability that a view is blurred; a pair gives one per view
    crop_scale_min    smallest crop area, as a fraction of the image (RandomResizedCrop's scale[0]); 1.0 keeps the
                      whole image
    solarize_prob     probability that a view is solarized; a pair gives one per view
    translate_max     largest shift in pixels of the translate-with-reflection (default image_size / 8, where the
                      recipe translates)
    translate_prob    probability that a view is translated
    patch_size        side of CPC's square patches (default image_size / 4)
    patch_overlap     pixels shared by neighbouring patches (default half a patch)
    per_patch         CPC: every patch draws its own parameters (size-relative defaults count in patches)
    view_size         side of the views, when the reference makes them smaller than the image (AMDIM on STL-10)
    shared_flip       one horizontal flip per image, seen by both views (AMDIM's code), instead of one per view

Each view draws its own parameters for every sample; the two views of an image are independent, except for a
shared flip.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from csl.augment import ops
from csl.augment.params import draw_mask
from csl.augment.views import ApplyViews, ViewSpec, apply_views, augment_views
from csl.registry import AUGMENT

Prob = float | tuple[float, float]

# CIFAR's side. Papers that give CIFAR-specific values (SimCLR's appendix B.9, AMDIM's and CPC's CIFAR transforms)
# use them at or below it, their ImageNet / STL-10 values above.
CIFAR_SIZE = 32

# The sides amdim-public's encoders and transforms are written for (datasets.py ``get_encoder_size``): CIFAR, STL-10
# (its 96-px images cropped to 64) and ImageNet (cropped to 128). CPC v2 in pl_bolts uses the same three.
DIM_SIZES = (32, 64, 128)
# Their RandomResizedCrop's aspect ratios, wider than torchvision's 3/4-4/3.
DIM_CROP_RATIO = (0.7, 1.4)


class Pipeline:
    """Two random views per image, drawn independently for every sample and for each view.

    ``patches`` tells whether views are patch grids N×P×3×p×p (CPC) rather than images N×3×S×S; ``image_size`` is
    the side of the views S; ``encoder_size`` the side of what the encoder sees (the patch side for patch views).
    With ``per_patch`` the image is cut into patches first and every patch of every view is a sample that draws
    its own parameters (CPC v2); otherwise a view is augmented whole and then cut.
    ``shared_flip``: flip each image once, with p=0.5, before both views are made from it (amdim-public's
    ``TransformsC10``: ``inp = self.flip_lr(inp)`` then ``train_transform`` twice), so the two views of an image
    share their orientation; the views' specs then flip nothing themselves.
    """

    def __init__(
        self,
        views: tuple[ViewSpec, ViewSpec],
        *,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        patch_size: int | None = None,
        patch_stride: int | None = None,
        per_patch: bool = False,
        shared_flip: bool = False,
    ) -> None:
        if per_patch and patch_size is None:
            raise ValueError("per_patch augmentation needs a patch_size")
        if shared_flip and any(view.flip_prob > 0 for view in views):
            raise ValueError("a shared flip replaces the views' own flips: give views with flip_prob 0")
        self.views = views
        self.shared_flip = shared_flip
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.patch_size = patch_size
        self.patch_stride = patch_stride or patch_size
        self.patches = patch_size is not None
        self.per_patch = per_patch
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._apply: ApplyViews = apply_views

    @property
    def encoder_size(self) -> int:
        return self.patch_size if self.patch_size is not None else self.image_size

    def compile(self, device: torch.device) -> None:
        """Apply the drawn views through ``torch.compile`` on ``device``: the many small per-pixel ops fuse into a
        few kernels.

        The random draws stay eager (they use the run's generator, which compiled code does not take), so the
        views are the same as uncompiled ones up to floating-point reassociation. The CPU keeps the eager path:
        there masked ops work on just the selected samples, a data-dependent shape that compiled code would
        recompile for at every batch (and compiling the all-samples form instead measured 3x slower than eager
        there: 2,483 against 7,871 images/s for SimCLR's two views, one thread).
        """
        if not ops.select_on_host(torch.empty(0, device=device)):
            self._apply = torch.compile(apply_views, dynamic=False)

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two views of uint8 (0-255) or float (0-1) images N×3×H×W; the generator must be on their device."""
        mean, std = self._mean_std(images.device)
        if self.shared_flip:
            flip = draw_mask(images.shape[0], 0.5, generator)
            images = ops.on_samples(images, flip, lambda selected, _: selected.flip(-1))
        if self.per_patch:
            return self._per_patch_views(images, generator, mean, std)
        views = augment_views(images, self.views, self.image_size, generator, mean, std, self._apply)
        first, second = self._patchify(views).chunk(2)
        return first, second

    def _per_patch_views(self, images: Tensor, generator: torch.Generator, mean: Tensor, std: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """Patches as samples: N×3×S×S → (N·P)×3×p×p augmented in one batch, then laid out as N×P grids."""
        assert self.patch_size is not None and self.patch_stride is not None
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = ops.resize(ops.to_float(images), self.image_size)
        patches = ops.patchify(images, self.patch_size, self.patch_stride)  # uint8 stays uint8 until augmented
        n, p = patches.shape[:2]
        size = self.patch_size
        views = augment_views(patches.flatten(0, 1), self.views, size, generator, mean, std, self._apply)
        first, second = views.view(len(self.views), n, p, *views.shape[1:]).unbind(0)
        return first, second

    def eval_view(self, images: Tensor) -> Tensor:
        """The deterministic view evaluation uses: the image itself, resized to image_size if needed, normalised."""
        resized = ops.resize(ops.to_float(images), self.image_size)
        return self._patchify(ops.normalize(resized, *self._mean_std(images.device)))

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """mean and std as tensors on device, copied there once (every copy would make the host wait)."""
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))
        return self._constants[device]

    def _patchify(self, images: Tensor) -> Tensor:
        if self.patch_size is not None and self.patch_stride is not None:
            return ops.patchify(images, self.patch_size, self.patch_stride)
        return images

    def __repr__(self) -> str:
        patches = (f", patch_size={self.patch_size}, patch_stride={self.patch_stride}, per_patch={self.per_patch}"
                   if self.patches else "")
        flip = ", shared_flip=True" if self.shared_flip else ""
        return f"Pipeline(image_size={self.image_size}{patches}{flip}, views={self.views})"


def blur_kernel_size(image_size: int) -> int:
    """SimCLR: "the kernel size is set to be 10% of the image height/width", made odd (pl_bolts' rounding)."""
    size = int(0.1 * image_size)
    return size + 1 if size % 2 == 0 else size


def _pair(prob: Prob) -> tuple[float, float]:
    return (float(prob), float(prob)) if isinstance(prob, (int, float)) else (float(prob[0]), float(prob[1]))


def _scaled(strengths: tuple[float, float, float, float], factor: float) -> tuple[float, float, float, float]:
    b, c, s, h = (x * factor for x in strengths)
    if h > 0.5:
        raise ValueError(f"jitter_strength {factor} makes the hue jitter {h}, above torchvision's limit of 0.5")
    return (b, c, s, h)


def _translate_max(translate_max: int | None, image_size: int) -> int:
    shift = image_size // 8 if translate_max is None else translate_max
    if not 0 <= shift < image_size:
        raise ValueError(f"translate_max must lie in [0, image_size), got {shift}")
    return shift


def _amdim_spec(
    image_size: int, jitter_strength: float, jitter_prob: float, grayscale_prob: float, translate_max: int | None,
    translate_prob: float, crop_scale: tuple[float, float] | None = None, *, hue: float = 0.2,
    flip_prob: float = 0.5,
) -> ViewSpec:
    """One view of AMDIM's recipe (amdim-public ``datasets.py``): [random resized crop (ratio 0.7-1.4, bicubic)],
    flip, translate with reflection, colour jitter (0.4, 0.4, 0.4, hue) at jitter_prob, grayscale."""
    return ViewSpec(
        crop_scale=crop_scale,
        crop_ratio=DIM_CROP_RATIO,
        crop_interpolation="bicubic",
        flip_prob=flip_prob,
        translate_max=_translate_max(translate_max, image_size),
        translate_prob=translate_prob,
        jitter=_scaled((0.4, 0.4, 0.4, hue), jitter_strength),
        jitter_prob=jitter_prob,
        grayscale_prob=grayscale_prob,
    )


class DimGeometry(NamedTuple):
    """Where AMDIM's views come from at one size: their side, the crop's scale (None: no crop), the shift, the hue."""

    view_size: int
    crop_scale: tuple[float, float] | None
    translate_max: int
    hue: float


def _dim_defaults(
    image_size: int, view_size: int | None, crop_scale_min: float | None, translate_max: int | None
) -> DimGeometry:
    """AMDIM's and CPC's geometry at this image size, where the options leave it to the reference.

    amdim-public ``datasets.py`` and pl_bolts' ``amdim_transforms.py`` / ``cpc_transforms.py``: at CIFAR size no
    crop and a translation by up to 4 px (image_size / 8); above it (STL-10, ImageNet) a random resized crop with
    scale 0.3-1 to the encoder's side and no translation. That side is the largest of 32, 64, 128 not above the
    image (STL-10's 96 px are cropped to 64), or the image's own below 32. Hue jitter is 0.2, 0.1 at 128 px.
    """
    side = view_size if view_size is not None else max([s for s in DIM_SIZES if s <= image_size], default=image_size)
    if side < 1:
        raise ValueError(f"view_size must be ≥ 1, got {side}")
    cifar = image_size <= CIFAR_SIZE
    scale_min = crop_scale_min if crop_scale_min is not None else (None if cifar else 0.3)
    if scale_min is not None and not 0 < scale_min <= 1:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {scale_min}")
    shift = translate_max if translate_max is not None else (side // 8 if cifar else 0)
    return DimGeometry(side, None if scale_min is None else (scale_min, 1.0), shift, 0.1 if side >= 128 else 0.2)


def _dim_pipeline(
    *, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], jitter_strength: float,
    jitter_prob: float, grayscale_prob: float, translate_max: int | None, translate_prob: float,
    crop_scale_min: float | None, view_size: int | None, shared_flip: bool,
) -> Pipeline:
    """AMDIM's recipe at any size (``_dim_defaults``), both views from one spec; YADIM's is the same."""
    size = _dim_defaults(image_size, view_size, crop_scale_min, translate_max)
    spec = _amdim_spec(size.view_size, jitter_strength, jitter_prob, grayscale_prob, size.translate_max,
                       translate_prob, size.crop_scale, hue=size.hue, flip_prob=0.0 if shared_flip else 0.5)
    return Pipeline((spec, spec), image_size=size.view_size, mean=mean, std=std, shared_flip=shared_flip)


def _simclr_defaults(image_size: int, jitter_strength: float | None, blur_prob: Prob | None) -> tuple[float, Prob]:
    """SimCLR's colour-jitter strength and blur probability at this image size.

    The paper's appendix B.9 (CIFAR-10) and pl_bolts' ``simclr_module.py`` for cifar10: strength 0.5 and no
    Gaussian blur at CIFAR size; above it (STL-10, ImageNet) strength 1.0 and blur with p=0.5.
    """
    cifar = image_size <= CIFAR_SIZE
    strength = jitter_strength if jitter_strength is not None else (0.5 if cifar else 1.0)
    blur = blur_prob if blur_prob is not None else (0.0 if cifar else 0.5)
    return strength, blur


def _crop_pipeline(
    jitter: tuple[float, float, float, float],
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float,
    jitter_prob: float,
    grayscale_prob: float,
    crop_scale_min: float,
    blur_prob: Prob,
    solarize_prob: Prob = 0.0,
) -> Pipeline:
    """The SimCLR family (SimCLR, MoCo v2, BYOL): random resized crop, flip, colour jitter, grayscale, blur.

    The papers differ in the jitter strengths (``jitter``, scaled by jitter_strength), their defaults, and whether
    blur and solarize differ between the two views (a pair of probabilities gives one per view); the rest is one
    recipe, so it is written once here and each builder passes what its paper sets.
    """
    blur_first, blur_second = _pair(blur_prob)
    solarize_first, solarize_second = _pair(solarize_prob)
    base = ViewSpec(
        crop_scale=(crop_scale_min, 1.0),
        jitter=_scaled(jitter, jitter_strength),
        jitter_prob=jitter_prob,
        grayscale_prob=grayscale_prob,
        blur_kernel_size=blur_kernel_size(image_size),
    )
    views = (
        replace(base, blur_prob=blur_first, solarize_prob=solarize_first),
        replace(base, blur_prob=blur_second, solarize_prob=solarize_second),
    )
    return Pipeline(views, image_size=image_size, mean=mean, std=std)


@AUGMENT.register("amdim")
def amdim(
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float = 1.0,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.25,
    translate_max: int | None = None,
    translate_prob: float = 0.8,
    crop_scale_min: float | None = None,
    view_size: int | None = None,
    shared_flip: bool = True,
) -> Pipeline:
    """AMDIM (Bachman et al. 2019) as amdim-public ``datasets.py`` (pl_bolts ``amdim_transforms.py`` copies it).

    AMDIM maximises mutual information between features of two views of one image, so the views must share
    content while differing in what the features should ignore: position, mirror images and colour. Per view: colour
    jitter (0.4, 0.4, 0.4, 0.2) at p=0.8, grayscale at p=0.25; at CIFAR size a translation by up to 4 px filled by
    reflection (p=0.8) and no crop; above it (STL-10, ImageNet) a random resized crop (scale 0.3-1, ratio 0.7-1.4,
    bicubic) to 64 or 128 px instead, and hue jitter 0.1 at 128 (``_dim_defaults``). One flip (p=0.5) per image
    is shared by both views, as the reference flips the image before making its two views; ``shared_flip=False``
    gives each view its own.
    """
    return _dim_pipeline(
        image_size=image_size, mean=mean, std=std, jitter_strength=jitter_strength, jitter_prob=jitter_prob,
        grayscale_prob=grayscale_prob, translate_max=translate_max, translate_prob=translate_prob,
        crop_scale_min=crop_scale_min, view_size=view_size, shared_flip=shared_flip,
    )


@AUGMENT.register("cpc")
def cpc(
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float = 1.0,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.25,
    translate_max: int | None = None,
    translate_prob: float = 0.8,
    patch_size: int | None = None,
    patch_overlap: int | None = None,
    per_patch: bool = True,
) -> Pipeline:
    """CPC v2 (Hénaff et al. 2019) on CIFAR: AMDIM's ops on every patch of a grid, as the paper augments patches.

    CPC predicts the features of patches below from the patches above, so each view is cut into a grid of
    overlapping patches (8×8 with overlap 4 at 32 px: stride 4, a 7×7 grid). By default the patch is
    image_size / 4 and the overlap half a patch, which keeps the 7×7 grid at any size (16/8 at 64 px, as pl_bolts
    on STL-10).

    per_patch (default): the image is cut first and every patch of every view draws its own flip, translation,
    colour jitter and grayscale, as CPC v2's patch-based augmentation (colour dropping and flips drawn per patch);
    with one draw per view, a patch's neighbours share its colour shift, a low-level cue to predict them by.
    Size-relative defaults then count in patches: translate_max defaults to patch_size / 8 (1 px on an 8 px
    patch, not 4 px) and must be below patch_size. Deviation: the paper's per-patch ops are its own ImageNet set
    (colour dropping, flips and more); here they are AMDIM's CIFAR ops, pl_bolts' choice for CPC on CIFAR.
    per_patch=false is pl_bolts' CPCTrainTransformsCIFAR10: the ops on the whole view, then patches.
    """
    size = image_size // 4 if patch_size is None else patch_size
    overlap = size // 2 if patch_overlap is None else patch_overlap
    if not 0 <= overlap < size <= image_size:
        raise ValueError(f"need 0 <= patch_overlap < patch_size <= image_size, got {overlap}, {size}, {image_size}")
    if per_patch and translate_max is not None and not 0 <= translate_max < size:
        raise ValueError(f"translate_max must lie in [0, patch_size) with per_patch, got {translate_max} for "
                         f"{size} px patches")
    spec = _amdim_spec(size if per_patch else image_size, jitter_strength, jitter_prob, grayscale_prob,
                       translate_max, translate_prob)
    return Pipeline((spec, spec), image_size=image_size, mean=mean, std=std, patch_size=size,
                    patch_stride=size - overlap, per_patch=per_patch)


@AUGMENT.register("yadim")
def yadim(
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float = 1.0,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.25,
    translate_max: int | None = None,
    translate_prob: float = 0.8,
    crop_scale_min: float | None = None,
    view_size: int | None = None,
    shared_flip: bool = True,
) -> Pipeline:
    """YADIM (Falcon & Cho 2020): the union of AMDIM's and CPC's pipelines, on whole images (no patches).

    The two parents agree at every size (amdim-public ``datasets.py``; pl_bolts ``amdim_transforms.py`` and
    ``cpc_transforms.py``, whose CPC adds only the patches): at CIFAR size flip, translate by up to 4 px, colour
    jitter and grayscale, and no crop; at STL-10 and ImageNet sizes a random resized crop with scale 0.3-1 and
    ratio 0.7-1.4 (bicubic) to 64 / 128 px instead of the translation. So YADIM's union is AMDIM's recipe, with the
    same options and size rules (``amdim``); YADIM compares the last layer's maps of two full images.
    """
    return _dim_pipeline(
        image_size=image_size, mean=mean, std=std, jitter_strength=jitter_strength, jitter_prob=jitter_prob,
        grayscale_prob=grayscale_prob, translate_max=translate_max, translate_prob=translate_prob,
        crop_scale_min=crop_scale_min, view_size=view_size, shared_flip=shared_flip,
    )


@AUGMENT.register("simclr")
def simclr(
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float | None = None,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: Prob | None = None,
    crop_scale_min: float = 0.08,
) -> Pipeline:
    """SimCLR (Chen et al. 2020): random resized crop, flip, strong colour distortion, blur.

    "One composition of augmentations stands out: random cropping and random color distortion": crops alone let
    the network match views by their colour histograms, so colour is distorted hard (jitter 0.8s/0.8s/0.8s/0.2s
    at p=0.8 with s = jitter_strength, grayscale at p=0.2), and blurred (sigma in [0.1, 2.0], kernel 10% of the
    side). At CIFAR size s = 0.5 and no blur, as the paper's CIFAR-10 appendix and pl_bolts do; above it s = 1 and
    blur at p=0.5 (``_simclr_defaults``).
    """
    strength, blur = _simclr_defaults(image_size, jitter_strength, blur_prob)
    return _crop_pipeline(
        (0.8, 0.8, 0.8, 0.2), image_size=image_size, mean=mean, std=std, jitter_strength=strength,
        jitter_prob=jitter_prob, grayscale_prob=grayscale_prob, crop_scale_min=crop_scale_min, blur_prob=blur,
    )


@AUGMENT.register("moco_v2")
def moco_v2(
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float = 1.0,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: Prob = 0.5,
    crop_scale_min: float = 0.2,
) -> Pipeline:
    """MoCo v2 (Chen et al. 2020, "Improved Baselines"): MoCo's augmentation plus SimCLR's blur.

    The report adds SimCLR's blur but not SimCLR's stronger colour distortion, which it found to give diminishing
    gains on its baselines: jitter (0.4, 0.4, 0.4, 0.1) at p=0.8, as in the MoCo code's ``aug_plus``. Crops keep
    at least 20% of the image (scale 0.2-1), as MoCo's. Grayscale p=0.2, blur sigma in [0.1, 2.0] at p=0.5, flip.
    """
    return _crop_pipeline(
        (0.4, 0.4, 0.4, 0.1), image_size=image_size, mean=mean, std=std, jitter_strength=jitter_strength,
        jitter_prob=jitter_prob, grayscale_prob=grayscale_prob, crop_scale_min=crop_scale_min, blur_prob=blur_prob,
    )


@AUGMENT.register("byol")
def byol(
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    jitter_strength: float = 1.0,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: Prob = (1.0, 0.1),
    solarize_prob: Prob = (0.0, 0.2),
    crop_scale_min: float = 0.08,
) -> Pipeline:
    """BYOL (Grill et al. 2020): SimCLR's augmentations, with blur and solarization applied asymmetrically.

    BYOL's table of image augmentations gives the two views different distributions: the first is always
    blurred and never solarized, the second blurred with p=0.1 and solarized with p=0.2. Both: random resized
    crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) at p=0.8, grayscale p=0.2.
    """
    return _crop_pipeline(
        (0.4, 0.4, 0.2, 0.1), image_size=image_size, mean=mean, std=std, jitter_strength=jitter_strength,
        jitter_prob=jitter_prob, grayscale_prob=grayscale_prob, crop_scale_min=crop_scale_min, blur_prob=blur_prob,
        solarize_prob=solarize_prob,
    )
