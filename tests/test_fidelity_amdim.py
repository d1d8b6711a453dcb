"""AMDIM, YADIM and SimCLR as their authors built them: each preset path against a transcription of its reference.

References (read with the project's search tool; transcribed here, not imported):
- amdim-public ``costs.py`` (``NCE_MI_MULTI``, ``LossMultiNCE``), ``train.py`` / ``task_self_supervised.py`` (how
  the terms are combined, Adam's settings), ``datasets.py`` (transforms per dataset, ``get_encoder_size``),
  ``model.py`` (encoder layouts per size);
- pl_bolts ``amdim_transforms.py``, ``cpc_transforms.py``, ``simclr_module.py`` (CIFAR vs STL-10 / ImageNet values).

The NCE reference is written out in float64 from amdim-public's algorithm (masks over the positive locations,
regulariser on the raw scores, tanh clip, max-shifted log-sum-exp over the negatives); the preset's path computes
in float32, hence tolerances of 1e-5 relative on values and 1e-4 on gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

import csl  # noqa: F401
from csl.augment import Pipeline, ops
from csl.config import resolve
from csl.model import CSLModel, build_model, comparison_loss
from csl.registry import AUGMENT, ENCODER, EXTRACT
from csl.train import Run
from csl.types import Features
from tests.helpers import cifar_mini, random_images, tiny  # noqa: F401  (cifar_mini is a fixture)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TCLIP = 20.0


# ---- amdim-public's NCE_MI_MULTI, transcribed ---------------------------------------------------------------------


def nce_term(src: torch.Tensor, target_map: torch.Tensor, tclip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of one comparison: (−mean log-softmax of every positive, 0.05·mean(raw²)).

    src: n×d, one source vector per image. target_map: n×d×h×w. Every location of image i's target map is a
    positive of source i; every location of every other image is a negative, shared by all of i's positives.
    """
    n, d = src.shape
    targets = target_map.permute(1, 0, 2, 3).reshape(d, -1)  # d × (n·L), columns image-major
    locations = targets.shape[1] // n
    raw = (src @ targets).reshape(n, n, locations) / d**0.5
    regulariser = 5e-2 * (raw**2).mean()  # on the raw scores, before the clip
    clipped = tclip * torch.tanh(raw / tclip)
    positive = torch.eye(n, dtype=raw.dtype)[:, :, None].expand(n, n, locations)
    negative = 1.0 - positive
    pos_scores = (positive * clipped).sum(dim=1)  # n × L
    neg_scores = (negative * clipped - tclip * positive).reshape(n, -1)  # positives set to the lowest score
    neg_max = neg_scores.max(dim=1, keepdim=True).values
    neg_sumexp = (negative.reshape(n, -1) * torch.exp(neg_scores - neg_max)).sum(dim=1, keepdim=True)
    log_softmax = (pos_scores - neg_max) - torch.log(torch.exp(pos_scores - neg_max) + neg_sumexp)
    return -log_softmax.mean(), regulariser


def amdim_public_loss(view_1: Features, view_2: Features, loc_1: torch.Tensor, loc_2: torch.Tensor,
                      tclip: float = TCLIP) -> torch.Tensor:
    """LossMultiNCE + train.py: loss_1t5 + loss_1t7 + loss_5t5 + lgt_reg, each term the mean of its two directions.

    Features hold (r1 as vector, maps [r7, r5]). loc_k: the r5 location sampled as each image's 5:5 source.
    """
    n = view_1.vector.shape[0]
    (r1_1, (r7_1, r5_1)), (r1_2, (r7_2, r5_2)) = (view_1.vector, view_1.maps), (view_2.vector, view_2.maps)
    r5_src_1 = r5_1.flatten(2)[torch.arange(n), :, loc_1]
    r5_src_2 = r5_2.flatten(2)[torch.arange(n), :, loc_2]
    total, regulariser = 0.0, 0.0
    for (s1, t2), (s2, t1) in (((r1_1, r5_2), (r1_2, r5_1)), ((r1_1, r7_2), (r1_2, r7_1)),
                               ((r5_src_1, r5_2), (r5_src_2, r5_1))):
        loss_1, reg_1 = nce_term(s1, t2, tclip)
        loss_2, reg_2 = nce_term(s2, t1, tclip)
        total = total + 0.5 * (loss_1 + loss_2)
        regulariser = regulariser + 0.5 * (reg_1 + reg_2)
    return total + regulariser


def test_amdim_loss_reference_by_formula() -> None:
    """The transcription itself, on a case small enough to write out: one source, two images, one location each."""
    src = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64).reshape(2, 2, 1, 1)
    loss, reg = nce_term(src, target, tclip=10.0)
    raw = [[3.0 / math.sqrt(2), 6.0 / math.sqrt(2)], [2.0 / math.sqrt(2), -2.0 / math.sqrt(2)]]
    s = [[10 * math.tanh(x / 10) for x in row] for row in raw]
    expected = -0.5 * (s[0][0] - math.log(math.exp(s[0][0]) + math.exp(s[0][1]))
                       + s[1][1] - math.log(math.exp(s[1][1]) + math.exp(s[1][0])))
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(reg) == pytest.approx(0.05 * sum(x * x for row in raw for x in row) / 4, rel=1e-12)


# ---- the amdim preset's path ----------------------------------------------------------------------------------------


def amdim_preset(**overrides: object) -> tuple[Pipeline, CSLModel]:
    """The amdim preset at a tiny width: n_rkhs 256/16 = 16 channels at every scale."""
    config = resolve(tiny(method="amdim", n_rkhs=256, **overrides))
    return build_model(config, image_size=32, mean=MEAN, std=STD)


def random_features(n: int, d: int, scale: float, generator: torch.Generator) -> Features:
    """r1 n×d, r7 n×d×7×7, r5 n×d×5×5 with entries of spread ``scale`` (scale 5: raw scores of spread ~25 > tclip)."""
    return Features(vector=scale * torch.randn(n, d, generator=generator, dtype=torch.float64),
                    maps=[scale * torch.randn(n, d, 7, 7, generator=generator, dtype=torch.float64),
                          scale * torch.randn(n, d, 5, 5, generator=generator, dtype=torch.float64)])


def leaves(features: Features, dtype: torch.dtype) -> Features:
    return Features(features.vector.detach().to(dtype).requires_grad_(),
                    [m.detach().to(dtype).requires_grad_() for m in features.maps])


def tensors(features: Features) -> list[torch.Tensor]:
    return [features.vector, *features.maps]


def sampled_locations(anchors: torch.Tensor, r5: torch.Tensor) -> torch.Tensor:
    """The r5 location each 5:5 anchor was drawn from, found by matching it to its image's map."""
    flat = r5.detach().flatten(2).to(anchors.dtype)  # n × d × L
    distance = (flat - anchors.detach()[:, :, None]).abs().sum(dim=1)
    assert torch.all(distance.min(dim=1).values == 0), "a 5:5 anchor is not a location of its image's r5 map"
    return distance.argmin(dim=1)


def preset_loss(model: CSLModel, view_a: Features, view_b: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What CSLModel.forward does after the encoder: embed, pairs, Σ weight · comparison loss; and the 5:5 picks."""
    pairs = model.extract.pairs(model.extract.embed(view_a), model.extract.embed(view_b), None, None)
    assert [p.name for p in pairs] == ["1:5 a→b", "1:5 b→a", "1:7 a→b", "1:7 b→a", "5:5 a→b", "5:5 b→a"]
    assert [p.weight for p in pairs] == [0.5] * 6  # directions averaged, comparisons summed (amdim-public train.py)
    total = sum(p.weight * comparison_loss(model.similarity, model.loss, p) for p in pairs)
    return total, sampled_locations(pairs[4].anchors, view_a.maps[-1]), sampled_locations(pairs[5].anchors,
                                                                                          view_b.maps[-1])


@pytest.mark.parametrize("scale", [0.3, 5.0])
def test_amdim_preset_is_amdim_public_nce(scale: float) -> None:
    """Value and gradient of the amdim preset's extract → similarity → loss against NCE_MI_MULTI, at small scores
    and at scores past the clip (where a regulariser on clipped scores would vanish)."""
    _, model = amdim_preset()
    assert all(isinstance(h.net, torch.nn.Identity) for h in model.extract.heads.values())  # AMDIM's own embeddings
    generator = torch.Generator().manual_seed(0)
    features = [random_features(6, 16, scale, generator) for _ in range(2)]
    ours_in = [leaves(f, torch.float32) for f in features]
    ref_in = [leaves(f, torch.float64) for f in features]

    ours, loc_a, loc_b = preset_loss(model, *ours_in)
    reference = amdim_public_loss(*ref_in, loc_a, loc_b)
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)

    ours.backward()
    reference.backward()
    for mine, theirs in zip(tensors(ours_in[0]) + tensors(ours_in[1]), tensors(ref_in[0]) + tensors(ref_in[1])):
        scale = float(theirs.grad.abs().max())
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4 * scale)


def test_regulariser_acts_on_raw_scores() -> None:
    """At scores past the clip the reference's regulariser is far larger than one on clipped scores would be, so
    the comparison above tells the two apart."""
    generator = torch.Generator().manual_seed(1)
    src = 5.0 * torch.randn(6, 16, generator=generator, dtype=torch.float64)
    target = 5.0 * torch.randn(6, 16, 5, 5, generator=generator, dtype=torch.float64)
    _, raw_regulariser = nce_term(src, target, TCLIP)
    raw = (src @ target.permute(1, 0, 2, 3).reshape(16, -1)) / 4.0
    clipped_regulariser = 5e-2 * (TCLIP * torch.tanh(raw / TCLIP)).pow(2).mean()
    assert float(raw_regulariser) > 1.5 * float(clipped_regulariser)


def test_model_forward_takes_the_same_path() -> None:
    """CSLModel.forward on real encoder features (running batch-norm statistics) equals the reference on them."""
    pipeline, model = amdim_preset()
    model.eval()
    view_a, view_b = pipeline(random_images(6), torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    loss, _ = model(view_a, view_b)
    with torch.no_grad():
        features = [model.encoder(view_a), model.encoder(view_b)]
        torch.manual_seed(3)  # the same 5:5 draws as forward's
        _, loc_a, loc_b = preset_loss(model, *features)
        doubled = [Features(f.vector.double(), [m.double() for m in f.maps]) for f in features]
        reference = amdim_public_loss(*doubled, loc_a, loc_b)
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-5)


# ---- heads and weights --------------------------------------------------------------------------------------------


def test_heads_follow_the_widths() -> None:
    """No head where the scales share a width (AMDIM's encoder); linear where they differ (a ResNet's stages)."""
    amdim = EXTRACT.build("multiscale", vector_dim=16, map_channels=(16, 16))
    assert all(isinstance(h.net, torch.nn.Identity) for h in amdim.heads.values()) and amdim.out_dim == 16
    resnet = EXTRACT.build("multiscale", vector_dim=32, map_channels=(4, 8, 16, 32), proj_dim=8)
    assert all(isinstance(h.net, torch.nn.Linear) for h in resnet.heads.values()) and resnet.out_dim == 8
    with pytest.raises(ValueError, match=r"head 'none' leaves the compared scales at different widths \(1: 32, 5: 32, "
                                         r"7: 16\)"):
        EXTRACT.build("multiscale", vector_dim=32, map_channels=(4, 8, 16, 32), head="none")
    yadim = EXTRACT.build("last_map", map_channels=(4, 8, 16, 32))
    assert isinstance(yadim.head.net, torch.nn.Identity) and yadim.out_dim == 32


def test_last_map_averages_its_two_directions() -> None:
    """pl_bolts' FeatureMapContrastiveTask (bidirectional): 0.5 · (loss a→b + loss b→a)."""
    extract = EXTRACT.build("last_map", map_channels=(6,))
    maps = [extract.embed(Features(torch.randn(3, 6), [torch.randn(3, 6, 2, 2)])) for _ in range(2)]
    assert [p.weight for p in extract.pairs(*maps, None, None)] == [0.5, 0.5]


# ---- augmentation defaults by image size --------------------------------------------------------------------------


def pipeline_of(method: str, image_size: int, **overrides: object) -> Pipeline:
    config = resolve(tiny(method=method, **overrides))
    return AUGMENT.build_from_config(config["augment"], config, {"image_size": image_size, "mean": MEAN, "std": STD})


def test_simclr_follows_the_image_size() -> None:
    """pl_bolts simclr_module.py: cifar10 jitter_strength 0.5, gaussian_blur False; stl10/imagenet 1.0 and blur
    (SimCLR's appendix B.9 for CIFAR-10). Jitter (0.8s, 0.8s, 0.8s, 0.2s), crop 0.08-1 at every size."""
    cifar, stl = pipeline_of("simclr", 32), pipeline_of("simclr", 96)
    for view in cifar.views:
        assert view.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1)) and view.blur_prob == 0.0
        assert view.crop_scale == (0.08, 1.0)
    for view in stl.views:
        assert view.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and view.blur_prob == 0.5
        assert view.blur_kernel_size == 9 and view.crop_scale == (0.08, 1.0)  # int(0.1·96) made odd
    assert cifar.image_size == 32 and stl.image_size == 96
    explicit = pipeline_of("simclr", 32, jitter_strength=1.0, blur_prob=0.5)  # a user's value wins
    assert explicit.views[0].jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and explicit.views[0].blur_prob == 0.5


@pytest.mark.parametrize("method", ["amdim", "yadim"])
def test_dim_pipelines_follow_the_image_size(method: str) -> None:
    """amdim-public datasets.py (TransformsC10 / TransformsSTL10 / TransformsImageNet128) and pl_bolts' AMDIM and
    CPC transforms, of which YADIM is the union: at 32 px no crop, translate ≤ 4 px p=0.8; at STL-10's 96 px a
    random resized crop to 64 (scale 0.3-1, ratio 0.7-1.4, bicubic), no translation; ImageNet: 128, hue 0.1."""
    cifar, stl, imagenet = (pipeline_of(method, size) for size in (32, 96, 224))
    assert (cifar.image_size, stl.image_size, imagenet.image_size) == (32, 64, 128)
    assert stl.encoder_size == 64
    for view in cifar.views:
        assert view.crop_scale is None and (view.translate_max, view.translate_prob) == (4, 0.8)
        assert view.jitter == (0.4, 0.4, 0.4, 0.2) and view.jitter_prob == 0.8 and view.grayscale_prob == 0.25
    for pipeline, hue in ((stl, 0.2), (imagenet, 0.1)):
        for view in pipeline.views:
            assert view.crop_scale == (0.3, 1.0) and view.crop_ratio == (0.7, 1.4)
            assert view.crop_interpolation == "bicubic" and view.translate_max == 0
            assert view.jitter == (0.4, 0.4, 0.4, hue) and view.grayscale_prob == 0.25
    for pipeline in (cifar, stl, imagenet):  # one flip per image, before both views
        assert pipeline.shared_flip and all(view.flip_prob == 0 for view in pipeline.views)
    explicit = pipeline_of(method, 96, view_size=96, crop_scale_min=0.5, shared_flip=False)
    assert explicit.image_size == 96 and explicit.views[0].crop_scale == (0.5, 1.0)
    assert not explicit.shared_flip and explicit.views[0].flip_prob == 0.5


def test_shared_flip_gives_both_views_one_orientation() -> None:
    """With every other op off, the two views of an image are equal, and about half the images are mirrored."""
    images = torch.arange(32, dtype=torch.uint8).repeat(400, 3, 32, 1)  # a left-to-right ramp: a flip shows
    off = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "translate_prob": 0.0}
    first, second = AUGMENT.build("amdim", image_size=32, mean=MEAN, std=STD, **off)(images, torch.Generator())
    assert torch.equal(first, second)
    mirrored = (first[:, 0, 0, 0] > first[:, 0, 0, -1]).float().mean()
    assert 0.42 < float(mirrored) < 0.58
    independent = AUGMENT.build("amdim", image_size=32, mean=MEAN, std=STD, shared_flip=False, **off)
    first, second = independent(images, torch.Generator().manual_seed(0))
    differ = (first != second).flatten(1).any(dim=1).float().mean()
    assert 0.42 < float(differ) < 0.58


def test_bicubic_crop_of_the_whole_image_is_torchvision_bicubic_resize() -> None:
    """Downscaling the full image, where no tap falls outside the box: torchvision's tensor bicubic (a = −0.75),
    clamped to [0, 1] as a uint8 image would be."""
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 32, 32]] * 4)
    for size in (24, 16):
        ours = ops.resized_crop(images, boxes, size, mode="bicubic")
        theirs = F.resize(images, [size, size], InterpolationMode.BICUBIC, antialias=False).clamp(0, 1)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="bilinear' or 'bicubic"):
        ops.resized_crop(images, boxes, 16, mode="nearest")


# ---- encoder layout by image size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("data_size", "stem", "side"), [(32, "cifar", 32), (96, "stl10", 64), (128, "imagenet", 128)])
def test_amdim_encoder_layout_follows_the_image_size(data_size: int, stem: str, side: int) -> None:
    """amdim-public get_encoder_size: CIFAR 32, STL-10 64 (its 96-px images cropped), ImageNet 128; the encoder is
    built for the views it sees, and gives r7 7×7, r5 5×5 and r1 1×1 there."""
    pipeline, model = build_model(resolve(tiny(method="amdim")), image_size=data_size, mean=MEAN, std=STD)
    assert pipeline.encoder_size == side
    explicit = ENCODER.build("amdim", width=1 / 16, ndf=64, n_rkhs=128, n_depth=1, stem=stem)
    assert [type(m) for m in model.encoder.trunk] == [type(m) for m in explicit.trunk]
    assert [tuple(p.shape) for p in model.encoder.parameters()] == [tuple(p.shape) for p in explicit.parameters()]
    view_a, _ = pipeline(random_images(2, data_size), torch.Generator().manual_seed(0))
    features = model.encoder(view_a)
    assert [tuple(m.shape[-2:]) for m in features.maps] == [(7, 7), (5, 5)]


def test_amdim_encoder_on_patches_and_explicit_stems() -> None:
    """CPC's 8-px patches get the CIFAR layout; a user's stem wins over the size."""
    _, model = build_model(resolve(tiny(method="cpc_v2", encoder="amdim")), image_size=32, mean=MEAN, std=STD)
    cifar = ENCODER.build("amdim", width=1 / 16, ndf=64, n_rkhs=128, n_depth=1, stem="cifar")
    assert [type(m) for m in model.encoder.trunk] == [type(m) for m in cifar.trunk]
    _, model = build_model(resolve(tiny(method="amdim", stem="cifar")), image_size=96, mean=MEAN, std=STD)
    assert [tuple(p.shape) for p in model.encoder.parameters()] == [tuple(p.shape) for p in cifar.parameters()]


# ---- optimiser ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["amdim", "yadim"])
def test_amdim_optimiser(method: str, cifar_mini) -> None:
    """amdim-public task_self_supervised.py: Adam(lr, betas=(0.8, 0.999), weight_decay=1e-5, eps=1e-8); lr 2e-4."""
    run = Run(tiny(method=method), data=cifar_mini)
    assert isinstance(run.optimizer, torch.optim.Adam)
    group = run.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"], run.config["lr"]) == ((0.8, 0.999), 1e-5, 1e-8, 2e-4)
    other = Run(tiny(method="simclr", adam_eps=1e-7), data=cifar_mini).optimizer.param_groups[0]
    assert (other["betas"], other["eps"]) == ((0.9, 0.999), 1e-7)  # torch's betas where a preset sets none
