"""The augmentation aspect: each batched op against torchvision.transforms.v2.functional, then the pipelines.

Tolerances: ops that compute what torchvision computes, in the same order, are held to 1e-6 (float32 rounding
only) or compared exactly. Resized crop, blur and hue are computed differently (a sampling grid instead of a resize
kernel, two 1-D passes instead of a 2-D convolution, closed-form HSV instead of a round trip): 1e-5 for them, about
ten times the largest difference seen (1.5e-6 for crops up to 224 px, 1e-6 for a 23-tap blur, 3e-7 for hue).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

from csl.augment import Pipeline, ops, views
from csl.augment.params import draw_crop_boxes, draw_jitter, draw_order, draw_shifts
from csl.registry import AUGMENT

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.parquet"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
EXACT = 1e-6


def _load_images(count: int) -> torch.Tensor:
    """``count`` CIFAR-10 test images as uint8 N×3×32×32, or random images if the data is not there."""
    try:
        import pyarrow.parquet as pq
        from torchvision.io import decode_jpeg

        table = pq.read_table(CIFAR_TEST, columns=["image"]).slice(0, count)
        blobs = table.column("image").to_pylist()
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.stack([decode_jpeg(torch.tensor(list(blob), dtype=torch.uint8)) for blob in blobs])
    except (ImportError, OSError):
        return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def uint8_images() -> torch.Tensor:
    return _load_images(8)


@pytest.fixture(scope="module")
def images(uint8_images: torch.Tensor) -> torch.Tensor:
    return uint8_images.float() / 255


def _each(images: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
    """torchvision applied image by image, fn(image, index)."""
    return torch.stack([fn(image, i) for i, image in enumerate(images)])


# ---- geometric ops ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 24, 48])
def test_resized_crop_matches_torchvision(images: torch.Tensor, size: int) -> None:
    # (top, left, height, width): down- and upsampling, the full image, a thin box, edges of the image
    boxes = torch.tensor([[0, 0, 32, 32], [5, 3, 20, 17], [10, 10, 8, 8], [0, 20, 12, 12],
                          [20, 0, 12, 30], [1, 1, 3, 25], [16, 16, 16, 16], [2, 7, 29, 22]])
    ours = ops.resized_crop(images, boxes, size)
    theirs = _each(images, lambda im, i: F.resized_crop(im, *boxes[i].tolist(), [size, size], antialias=False))
    # a sampling grid normalised to [-1, 1] and back moves sample points by ~1e-6 px
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_resized_crop_fuses_flip(images: torch.Tensor) -> None:
    boxes = torch.tensor([[3, 4, 20, 25]] * 8)
    flip = torch.tensor([True, False] * 4)
    ours = ops.resized_crop(images, boxes, 32, flip)
    plain = ops.resized_crop(images, boxes, 32)
    torch.testing.assert_close(ours, torch.where(flip.view(-1, 1, 1, 1), plain.flip(-1), plain), atol=EXACT, rtol=0)


def test_hflip_matches_torchvision(images: torch.Tensor) -> None:
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    theirs = _each(images, lambda im, i: F.horizontal_flip(im) if mask[i] else im)
    torch.testing.assert_close(ops.hflip(images, mask), theirs, atol=EXACT, rtol=0)


def test_translate_reflect_matches_pad_and_crop(uint8_images: torch.Tensor) -> None:
    dy = torch.tensor([0, 4, -4, 2, -1, 3, 0, -3])
    dx = torch.tensor([0, -4, 4, 1, 0, -2, 3, 4])
    flip = torch.tensor([False, True, False, True, True, False, False, True])

    def shifted(image: torch.Tensor, i: int) -> torch.Tensor:
        image = F.horizontal_flip(image) if flip[i] else image
        padded = F.pad(image, [4, 4, 4, 4], padding_mode="reflect")
        return F.crop(padded, 4 - int(dy[i]), 4 - int(dx[i]), 32, 32)

    # a gather: exact, on uint8 as well as float
    assert torch.equal(ops.translate_reflect(uint8_images, dy, dx, flip), _each(uint8_images, shifted))
    as_float = uint8_images.float()
    assert torch.equal(ops.translate_reflect(as_float, dy, dx, flip), _each(as_float, shifted))


def test_patchify_matches_pl_bolts_order(images: torch.Tensor) -> None:
    patches = ops.patchify(images, 8, 4)
    assert patches.shape == (8, 49, 3, 8, 8)
    # pl_bolts' Patchify: F.unfold, then (L, C*p*p) rows viewed as C×p×p
    unfolded = nnf.unfold(images, kernel_size=8, stride=4).transpose(1, 2).reshape(8, 49, 3, 8, 8)
    assert torch.equal(patches, unfolded)


# ---- colour ops --------------------------------------------------------------------------------------------------

FACTORS = torch.tensor([0.0, 0.2, 0.6, 1.0, 1.0, 1.4, 1.8, 3.0])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (ops.adjust_brightness, F.adjust_brightness),
        (ops.adjust_contrast, F.adjust_contrast),
        (ops.adjust_saturation, F.adjust_saturation),
    ],
)
def test_blend_adjustments_match_torchvision(images: torch.Tensor, ours, theirs) -> None:  # noqa: ANN001
    expected = _each(images, lambda im, i: theirs(im, float(FACTORS[i])))
    torch.testing.assert_close(ours(images, FACTORS), expected, atol=EXACT, rtol=0)


def test_hue_matches_torchvision(images: torch.Tensor) -> None:
    factors = torch.tensor([-0.5, -0.3, -0.1, 0.0, 0.05, 0.2, 0.37, 0.5])
    expected = _each(images, lambda im, i: F.adjust_hue(im, float(factors[i])))
    # closed-form HSV→RGB against torchvision's piecewise one: same map, different rounding
    torch.testing.assert_close(ops.adjust_hue(images, factors), expected, atol=1e-5, rtol=0)


def test_hue_on_gray_and_saturated_pixels() -> None:
    # ties between channels (torchvision picks r, then g, as the maximum) and gray pixels (chroma 0)
    pixels = torch.tensor(
        [[1, 1, 0], [0, 1, 1], [1, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0.2, 0.9, 0.9]]
    )
    image = pixels.t().reshape(1, 3, 2, 4).expand(6, 3, 2, 4).contiguous()
    factors = torch.tensor([-0.5, -0.25, 0.0, 1 / 6, 0.25, 0.5])
    expected = _each(image, lambda im, i: F.adjust_hue(im, float(factors[i])))
    torch.testing.assert_close(ops.adjust_hue(image, factors), expected, atol=1e-5, rtol=0)


def test_color_jitter_applies_each_samples_order(images: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(3)
    p = draw_jitter(8, (0.8, 0.8, 0.8, 0.2), 0.75, generator)
    adjust = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    factors = torch.stack([p.brightness, p.contrast, p.saturation, p.hue], dim=1)

    def jitter(image: torch.Tensor, i: int) -> torch.Tensor:
        if not p.mask[i]:
            return image
        for op in p.order[i].tolist():
            image = adjust[op](image, float(factors[i, op]))
        return image

    ours = ops.color_jitter(images, p.brightness, p.contrast, p.saturation, p.hue, p.order, p.mask)
    torch.testing.assert_close(ours, _each(images, jitter), atol=1e-5, rtol=0)
    # samples left out are untouched, bit for bit
    assert torch.equal(ours[~p.mask], images[~p.mask])


def test_grayscale_matches_torchvision(images: torch.Tensor) -> None:
    mask = torch.tensor([True, False] * 4)
    theirs = _each(images, lambda im, i: F.rgb_to_grayscale(im, num_output_channels=3) if mask[i] else im)
    torch.testing.assert_close(ops.grayscale(images, mask), theirs, atol=EXACT, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_gaussian_blur_matches_torchvision(images: torch.Tensor, kernel_size: int) -> None:
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.8, 1.0, 1.3, 1.7, 2.0])
    mask = torch.tensor([True, True, False, True, True, False, True, True])
    ours = ops.gaussian_blur(images, sigma, kernel_size, mask)
    theirs = _each(
        images,
        lambda im, i: F.gaussian_blur(im, [kernel_size, kernel_size], [float(sigma[i])] * 2) if mask[i] else im,
    )
    # two 1-D passes against one 2-D kernel: the sums are ordered differently
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours[~mask], images[~mask])


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_matches_torchvision(images: torch.Tensor, threshold: float) -> None:
    mask = torch.tensor([True, False, True, False, True, True, False, True])
    theirs = _each(images, lambda im, i: F.solarize(im, threshold) if mask[i] else im)
    assert torch.equal(ops.solarize(images, mask, threshold), theirs)


def test_normalize_matches_torchvision(images: torch.Tensor) -> None:
    theirs = F.normalize(images, list(MEAN), list(STD))
    torch.testing.assert_close(ops.normalize(images, torch.tensor(MEAN), torch.tensor(STD)), theirs, atol=EXACT, rtol=0)


# ---- parameter draws ---------------------------------------------------------------------------------------------


def test_crop_boxes_follow_torchvision_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes = draw_crop_boxes(4096, 32, 40, (0.08, 1.0), (3 / 4, 4 / 3), generator)
    top, left, height, width = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= 32).all() and (left + width <= 40).all()
    area = (height * width).float() / (32 * 40)
    assert area.min() > 0.05 and area.max() <= 1.0
    assert len(set(map(tuple, boxes.tolist()))) > 3000  # every sample its own box
    # no candidate can fit: all fall back to torchvision's central crop
    fallback = draw_crop_boxes(16, 32, 40, (2.0, 3.0), (3 / 4, 4 / 3), generator)
    assert (fallback == torch.tensor([0, 0, 32, 40])).all()
    narrow = draw_crop_boxes(4, 32, 80, (2.0, 3.0), (3 / 4, 4 / 3), generator)
    assert (narrow == torch.tensor([0, 18, 32, 43])).all()  # 43 = round(32 * 4/3), left = (80 - 43) // 2


def test_orders_and_shifts() -> None:
    generator = torch.Generator().manual_seed(0)
    order = draw_order(1000, generator)
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    assert len(set(map(tuple, order.tolist()))) == 24
    dy, dx = draw_shifts(1000, 4, 0.8, generator)
    assert dy.abs().max() == 4 and dx.abs().max() == 4 and dy.min() == -4
    assert 0.15 < ((dy == 0) & (dx == 0)).float().mean() < 0.3  # 0.2 not applied, + 0.8/81 both zero


# ---- pipelines ---------------------------------------------------------------------------------------------------


def _build(name: str, image_size: int = 32, **options: object) -> Pipeline:
    return AUGMENT.build(name, image_size=image_size, mean=MEAN, std=STD, **options)


def test_all_pipelines_registered() -> None:
    assert set(AUGMENT.names()) >= {"amdim", "cpc", "simclr", "moco_v2", "byol", "yadim"}


@pytest.mark.parametrize("name", ["amdim", "cpc", "simclr", "moco_v2", "byol", "yadim"])
def test_pipeline_shapes_and_dtypes(uint8_images: torch.Tensor, name: str) -> None:
    pipeline = _build(name)
    first, second = pipeline(uint8_images, torch.Generator().manual_seed(0))
    expected = (8, 49, 3, 8, 8) if name == "cpc" else (8, 3, 32, 32)
    assert pipeline.patches == (name == "cpc")
    for view in (first, second, pipeline.eval_view(uint8_images)):
        assert view.shape == expected and view.dtype == torch.float32 and torch.isfinite(view).all()
    assert not torch.equal(first, second)
    # normalised: roughly zero mean, unit spread
    assert abs(float(first.mean())) < 1.0 and 0.3 < float(first.std()) < 2.0


@pytest.mark.parametrize("name", ["amdim", "cpc", "simclr", "moco_v2", "byol", "yadim"])
def test_pipeline_resizes_other_input_sizes(name: str) -> None:
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    pipeline = _build(name, image_size=32)
    first, _ = pipeline(images, torch.Generator().manual_seed(0))
    assert first.shape[0] == 4 and first.shape[-1] == (8 if name == "cpc" else 32)
    assert pipeline.eval_view(images).shape == first.shape


def test_cpc_patches_scale_with_image_size() -> None:
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    first, _ = _build("cpc", image_size=64)(images, torch.Generator().manual_seed(0))
    assert first.shape == (2, 49, 3, 16, 16)
    first, _ = _build("cpc", image_size=32, patch_size=16, patch_overlap=0)(images, torch.Generator())
    assert first.shape == (2, 4, 3, 16, 16)


def test_eval_view_is_deterministic_normalisation(uint8_images: torch.Tensor, images: torch.Tensor) -> None:
    view = _build("simclr").eval_view(uint8_images)
    torch.testing.assert_close(view, F.normalize(images, list(MEAN), list(STD)), atol=EXACT, rtol=0)


@pytest.mark.parametrize("name", ["amdim", "simclr", "byol", "yadim"])
def test_every_sample_gets_its_own_parameters(uint8_images: torch.Tensor, name: str) -> None:
    same = uint8_images[:1].expand(8, 3, 32, 32)
    first, second = _build(name)(same, torch.Generator().manual_seed(1))
    flat = torch.cat([first, second]).flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(16) > 1e-3
    assert distinct.all(), "two views of the same image came out identical"


def test_fixed_seed_reproduces(uint8_images: torch.Tensor) -> None:
    pipeline = _build("simclr")
    once = pipeline(uint8_images, torch.Generator().manual_seed(7))
    again = pipeline(uint8_images, torch.Generator().manual_seed(7))
    other = pipeline(uint8_images, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(once, again))
    assert not torch.equal(once[0], other[0])


def test_block_size_does_not_change_views(uint8_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    # parameters are drawn for the whole batch before the CPU applies them block by block
    whole = _build("byol")(uint8_images, torch.Generator().manual_seed(2))
    monkeypatch.setattr(views, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(views, "CPU_MIN_BLOCK", 3)  # blocks of 3 samples, straddling the two views
    blocked = _build("byol")(uint8_images, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(whole, blocked))


def test_options_are_checked_and_shared() -> None:
    with pytest.raises(ValueError, match="hue"):
        _build("simclr", jitter_strength=3.0)  # hue jitter 0.6 > 0.5
    with pytest.raises(ValueError, match="translate_max"):
        _build("amdim", translate_max=32)
    asymmetric = _build("simclr", blur_prob=(1.0, 0.0))  # a pair gives one probability per view
    assert [view.blur_prob for view in asymmetric.views] == [1.0, 0.0]
    for name in ("simclr", "moco_v2", "byol", "yadim"):
        assert {"jitter_strength", "jitter_prob", "grayscale_prob", "crop_scale_min"} <= set(AUGMENT.options(name))


def test_uint8_and_float_inputs_agree(uint8_images: torch.Tensor, images: torch.Tensor) -> None:
    for name in ("amdim", "simclr"):
        from_uint8 = _build(name)(uint8_images, torch.Generator().manual_seed(5))
        from_float = _build(name)(images, torch.Generator().manual_seed(5))
        for a, b in zip(from_uint8, from_float):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _total_variation(images: torch.Tensor) -> torch.Tensor:
    return (images.diff(dim=-1).abs().mean(dim=(1, 2, 3)) + images.diff(dim=-2).abs().mean(dim=(1, 2, 3)))


def test_byol_views_are_asymmetric() -> None:
    # bright noise: blurring lowers its total variation; solarizing (x -> 1 - x above 0.5) makes it dark
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2000, 3, 32, 32, generator=generator) * 0.5 + 0.5
    pipeline = _build("byol", jitter_prob=0.0, grayscale_prob=0.0, crop_scale_min=1.0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    first, second = (view * std + mean for view in pipeline(noise, generator))
    original = _total_variation(noise)
    blurred = [(_total_variation(view) < 0.99 * original).float().mean() for view in (first, second)]
    solarized = [(view.mean(dim=(1, 2, 3)) < 0.5).float().mean() for view in (first, second)]
    # view 1 always blurred (sigma < ~0.3 barely changes a 3-tap kernel: ~10% of draws); view 2 with p = 0.1
    assert blurred[0] > 0.85 and 0.05 < blurred[1] < 0.15
    # view 1 never solarized, view 2 with p = 0.2
    assert solarized[0] == 0 and 0.16 < solarized[1] < 0.24


@pytest.mark.parametrize("name", ["simclr", "byol", "amdim"])
def test_device_path_matches_host_path(uint8_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # off the CPU, masked ops run on every sample and torch.where picks (no host sync); forced here on the CPU
    on_host = _build(name)(uint8_images, torch.Generator().manual_seed(4))
    monkeypatch.setattr(ops, "select_on_host", lambda images: False)
    on_device = _build(name)(uint8_images, torch.Generator().manual_seed(4))
    for a, b in zip(on_host, on_device):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(uint8_images: torch.Tensor) -> None:
    # the GPU selects samples with torch.where, the CPU with index_select: same result from the same parameters
    images = uint8_images.float() / 255
    generator = torch.Generator().manual_seed(0)
    p = draw_jitter(8, (0.8, 0.8, 0.8, 0.2), 0.8, generator)
    sigma, mask = torch.rand(8, generator=generator) * 2 + 0.1, torch.rand(8, generator=generator) < 0.5
    on_cpu = ops.gaussian_blur(ops.color_jitter(images, *vars(p).values()), sigma, 3, mask)
    moved = [t.cuda() for t in vars(p).values()]
    on_gpu = ops.gaussian_blur(ops.color_jitter(images.cuda(), *moved), sigma.cuda(), 3, mask.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=0)
    cuda_generator = torch.Generator(device="cuda").manual_seed(0)
    for name in AUGMENT.names():
        views = _build(name)(uint8_images.cuda(), cuda_generator)
        assert all(view.is_cuda and torch.isfinite(view).all() for view in views)
