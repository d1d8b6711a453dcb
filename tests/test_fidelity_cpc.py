"""CPC v2 as its authors built it: per-patch augmentation of the cpc pipeline."""

from __future__ import annotations

import pytest
import torch

import csl  # noqa: F401
from csl.registry import AUGMENT

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ---- per-patch augmentation --------------------------------------------------------------------------------------


def cpc_pipeline(**options: object):
    return AUGMENT.build("cpc", image_size=32, mean=MEAN, std=STD, **options)


@pytest.mark.parametrize("per_patch", [True, False])
def test_per_patch_augmentation_draws_per_patch(per_patch: bool) -> None:
    """Colour: a uniform gray image, jittered (only brightness can change gray): with per_patch the patches of one
    view come out in many brightnesses, without it all alike. Geometry: a left-to-right ramp, only flipped: with
    per_patch one view holds patches of both orientations, without it every patch of a view runs the same way."""
    generator = torch.Generator().manual_seed(0)
    gray = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    jitter = cpc_pipeline(per_patch=per_patch, jitter_prob=1.0, grayscale_prob=0.0, translate_prob=0.0)
    for view in jitter(gray, generator):
        levels = view.mean(dim=(2, 3, 4))  # N×P
        spread = levels.amax(dim=1) - levels.amin(dim=1)
        if per_patch:
            assert all(len(set(row)) > 40 for row in levels.round(decimals=5).tolist())  # 49 draws, rounded
        else:
            assert float(spread.max()) < 1e-5 and float(levels[:, 0].std()) > 1e-3

    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(8, 3, 32, 32).contiguous()
    flips = cpc_pipeline(per_patch=per_patch, jitter_prob=0.0, grayscale_prob=0.0, translate_prob=0.0)
    for view in flips(ramp, generator):
        mirrored = view[:, :, 0, 0, 0] > view[:, :, 0, 0, -1]  # N×P: the patch runs right to left
        per_view = mirrored.float().mean(dim=1)
        if per_patch:
            assert ((per_view > 0) & (per_view < 1)).all()
        else:
            assert ((per_view == 0) | (per_view == 1)).all() and 0 < float(per_view.mean()) < 1


def test_per_patch_sizes_count_in_patches() -> None:
    assert cpc_pipeline().views[0].translate_max == 1  # 8 px patch / 8
    assert cpc_pipeline(per_patch=False).views[0].translate_max == 4  # 32 px image / 8
    with pytest.raises(ValueError, match=r"translate_max must lie in \[0, patch_size\) with per_patch"):
        cpc_pipeline(translate_max=8)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for per_patch in (True, False):
        pipeline = cpc_pipeline(per_patch=per_patch)
        first, second = pipeline(images, torch.Generator().manual_seed(0))
        assert first.shape == second.shape == pipeline.eval_view(images).shape == (2, 49, 3, 8, 8)
