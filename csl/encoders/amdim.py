"""The AMDIM encoder (Bachman, Hjelm & Buchwalter 2019; pl_bolts ``AMDIMEncoder``).

A conv stem, then stacks of "ConvResNxN" residual blocks — an N×N (strided, unpadded) conv, a 1×1 conv whose
weights start at zero, and a parameter-free shortcut (average pooling, zero-padded channels) — then "fake RKHS"
1×1 residual heads that project the 7×7 and 5×5 feature maps to ``n_rkhs`` channels. Batch norm is optional
inside the trunk ("MaybeBatchNorm2d", off by default as in the paper) but always on at the three outputs.

``forward`` returns ``Features(vector, maps=[r7, r5])``: ``vector`` is the final 1×1 map flattened (n_rkhs), and
the maps are the two RKHS-projected maps, 7×7 and 5×5 at the layout's input size, each with ``n_rkhs`` channels.

Layouts (``stem``), amdim-public ``model.py`` ``Encoder`` for ``encoder_size`` 32, 64 and 128, each giving 7×7,
5×5 and 1×1 outputs at its input size:
- ``"cifar"`` (32 px): 3×3 conv → 1×1 res → 4×4/2 block (ndf→2ndf) → 2×2/2 block (→4ndf)
  → [7×7] → 3×3 block → [5×5] → 3×3 block → 3×3 res to n_rkhs → [1×1];
- ``"stl10"`` (64 px): 3×3 conv → 4×4/2, 4×4/2, 2×2/2 blocks (→8ndf) → the same tail;
- ``"imagenet"`` (128 px): 5×5/2 conv (reflect-padded) + 3×3 conv → as ``"stl10"``.
By default the layout follows the side of the images the encoder will see (``image_size``, which the model
supplies: the pipeline's views, or its patches): the largest layout whose size is not above it (``amdim_stem``),
so STL-10's views (cropped to 64 by the amdim pipeline) get ``"stl10"`` and CPC's 8-px patches ``"cifar"``.

Other input sizes: the convs are unpadded, so an input smaller than a layout's size would run out of pixels
(an 8×8 CPC patch is 2×2 after the cifar layout's first block, 1×1 after the second). Wherever a map is smaller
than the kernel about to slide over it, it is replicate-padded just enough for one output pixel; a 1×1 map
padded this way keeps its value through the average-pool shortcut. At or above the layout's size nothing is
padded (the network is exactly AMDIM's). Larger inputs give larger maps, and ``vector`` is the adaptive average
of the last map (exactly the 1×1 map at the layout's size). At 8×8 the cifar layout gives 1×1 maps throughout.

Not carried over: AMDIM's ``NopNet`` (an identity / L2 normalisation used by its classifier heads, not the
encoder) and the dummy forward pass that locates the 7/5/1 layers (the layers are fixed by the layout here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl.encoders._common import check_choice, check_positive, scaled
from csl.registry import ChoiceError, ENCODER
from csl.types import Features

STEMS = ("cifar", "stl10", "imagenet")
STEM_SIZES = {"cifar": 32, "stl10": 64, "imagenet": 128}


def amdim_stem(image_size: int) -> str:
    """The layout amdim-public builds for this input side: the largest whose size is not above it (cifar below)."""
    fitting = [stem for stem, size in STEM_SIZES.items() if size <= image_size]
    return fitting[-1] if fitting else "cifar"


def _fit(x: Tensor, size: int) -> Tensor:
    """Replicate-pad ``x`` so both spatial sides are at least ``size`` (no-op when they already are)."""
    h, w = x.shape[-2:]
    if h >= size and w >= size:
        return x
    ph, pw = max(0, size - h), max(0, size - w)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")


def maybe_batch_norm(channels: int, use_bn: bool) -> nn.Module:
    """AMDIM's MaybeBatchNorm2d, without the unused BatchNorm when off (no parameters without gradients)."""
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class ConvBNReLU(nn.Module):
    """AMDIM's stem conv ("Conv3x3"): optional explicit padding, conv, optional BN, ReLU."""

    def __init__(
        self, n_in: int, n_out: int, kernel: int, stride: int, pad: int, use_bn: bool, pad_mode: str = "constant"
    ) -> None:
        super().__init__()
        self.kernel, self.pad, self.pad_mode = kernel, pad, pad_mode
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=not use_bn)
        self.bn = maybe_batch_norm(n_out, use_bn)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad > 0:
            # reflect padding needs more pixels than it pads; tiny inputs fall back to replicate
            mode = self.pad_mode if self.pad_mode != "reflect" or min(x.shape[-2:]) > self.pad else "replicate"
            x = F.pad(x, (self.pad,) * 4, mode=mode)
        return self.relu(self.bn(self.conv(_fit(x, self.kernel))))


class ConvResNxN(nn.Module):
    """AMDIM's residual unit: N×N conv (stride s) → BN? → ReLU → 1×1 conv (zero-init), plus a shortcut.

    The shortcut is N×N average pooling with the same stride, its channels zero-padded when the unit widens;
    a unit that narrows uses a learned N×N conv shortcut instead.
    """

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, pad: int, use_bn: bool) -> None:
        super().__init__()
        self.n_in, self.n_out, self.kernel, self.stride, self.pad = n_in, n_out, kernel, stride, pad
        self.conv1 = nn.Conv2d(n_in, n_out, kernel, stride, pad, bias=False)
        self.bn1 = maybe_batch_norm(n_out, use_bn)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        self.conv3 = nn.Conv2d(n_in, n_out, kernel, stride, pad, bias=True) if n_out < n_in else None
        nn.init.zeros_(self.conv2.weight)  # fixup-like: the unit starts as its shortcut

    def forward(self, x: Tensor) -> Tensor:
        x = _fit(x, self.kernel - 2 * self.pad)
        h = self.conv2(self.relu(self.bn1(self.conv1(x))))
        if self.conv3 is not None:
            shortcut = self.conv3(x)
        else:
            shortcut = x
            if self.kernel > 1 or self.stride > 1:
                shortcut = F.avg_pool2d(x, self.kernel, self.stride, self.pad)
            if self.n_out > self.n_in:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h + shortcut


def conv_res_block(n_in: int, n_out: int, kernel: int, stride: int, depth: int, use_bn: bool) -> nn.Sequential:
    """AMDIM's ConvResBlock: one N×N ConvResNxN that changes size and width, then ``depth - 1`` 1×1 units."""
    units = [ConvResNxN(n_in, n_out, kernel, stride, 0, use_bn)]
    units += [ConvResNxN(n_out, n_out, 1, 1, 0, use_bn) for _ in range(depth - 1)]
    return nn.Sequential(*units)


class FakeRKHSConvNet(nn.Module):
    """AMDIM's 1×1 residual projection of a feature map to ``n_rkhs`` channels, batch-normed at the output."""

    def __init__(self, n_in: int, n_out: int, use_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 1, bias=False)
        self.bn1 = maybe_batch_norm(n_out, use_bn)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, bias=False)
        self.shortcut = nn.Conv2d(n_in, n_out, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(n_out)
        nn.init.zeros_(self.conv2.weight)
        if n_out >= n_in:  # start the shortcut near the identity (on the first n_in channels)
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                idx = torch.arange(n_in)
                self.shortcut.weight[idx, idx, 0, 0] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.bn_out(self.conv2(self.relu(self.bn1(self.conv1(x)))) + self.shortcut(x))


class AMDIMEncoder(nn.Module):
    def __init__(self, *, ndf: int, n_rkhs: int, depth: int, use_bn: bool = False, stem: str = "cifar") -> None:
        super().__init__()
        check_choice("amdim", "stem", stem, STEMS)
        layers: list[nn.Module]
        if stem == "cifar":
            top = 4 * ndf
            layers = [
                ConvBNReLU(3, ndf, 3, 1, 0, use_bn=False),
                ConvResNxN(ndf, ndf, 1, 1, 0, use_bn),
                conv_res_block(ndf, 2 * ndf, 4, 2, depth, use_bn),
                conv_res_block(2 * ndf, 4 * ndf, 2, 2, depth, use_bn),
            ]
        else:
            top = 8 * ndf
            if stem == "imagenet":
                layers = [
                    ConvBNReLU(3, ndf, 5, 2, 2, use_bn=False, pad_mode="reflect"),
                    ConvBNReLU(ndf, ndf, 3, 1, 0, use_bn=False),
                ]
            else:
                layers = [ConvBNReLU(3, ndf, 3, 1, 0, use_bn=False)]
            layers += [
                conv_res_block(ndf, 2 * ndf, 4, 2, depth, use_bn),
                conv_res_block(2 * ndf, 4 * ndf, 4, 2, depth, use_bn),
                conv_res_block(4 * ndf, 8 * ndf, 2, 2, depth, use_bn),
            ]
        layers.append(maybe_batch_norm(top, use_bn))
        self.trunk = nn.Sequential(*layers)  # → the 7×7 map
        self.block5 = conv_res_block(top, top, 3, 1, depth, use_bn)  # → the 5×5 map
        self.block1 = nn.Sequential(  # → the 1×1 map
            conv_res_block(top, top, 3, 1, depth, use_bn),
            ConvResNxN(top, n_rkhs, 3, 1, 0, use_bn),
            nn.BatchNorm2d(n_rkhs),
        )
        self.rkhs_block_7 = FakeRKHSConvNet(top, n_rkhs, use_bn)
        self.rkhs_block_5 = FakeRKHSConvNet(top, n_rkhs, use_bn)
        self.vector_dim: int = n_rkhs
        self.map_channels: tuple[int, ...] = (n_rkhs, n_rkhs)

    def forward(self, x: Tensor) -> Features:
        h7 = self.trunk(x)
        h5 = self.block5(h7)
        h1 = self.block1(h5)
        vector = torch.flatten(F.adaptive_avg_pool2d(h1, 1), 1)
        return Features(vector=vector, maps=[self.rkhs_block_7(h7), self.rkhs_block_5(h5)])


@ENCODER.register("amdim")
def amdim(
    *,
    width: float = 1.0,
    ndf: int = 320,
    n_rkhs: int = 1280,
    n_depth: int = 10,
    use_bn: bool = False,
    stem: str | None = None,
    image_size: int = 32,
) -> AMDIMEncoder:
    """AMDIM's encoder with ``ndf·width`` base channels and ``n_rkhs·width``-dim outputs (defaults: pl_bolts'
    CIFAR-10 config, ndf 320, n_rkhs 1280, 10 units per block); ``n_depth`` units per ConvResBlock (≥ 1), named as
    in AMDIM's code so that it is not confused with the ResNets' layout ``depth`` in a flat config. ``stem``: the
    layout; ``None`` picks amdim-public's for ``image_size`` (context: the side of the encoder's input, which the
    model supplies; 32 when the encoder is built on its own)."""
    width = check_positive("amdim", "width", width)
    for option, value in (("ndf", ndf), ("n_rkhs", n_rkhs), ("n_depth", n_depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ChoiceError(f"encoder 'amdim': {option} must be a positive int, got {value!r}")
    return AMDIMEncoder(
        ndf=scaled(ndf, width), n_rkhs=scaled(n_rkhs, width), depth=n_depth, use_bn=use_bn,
        stem=amdim_stem(image_size) if stem is None else stem,
    )
