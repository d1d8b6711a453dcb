"""ResNet encoders: ``resnet18``, ``resnet34``, ``resnet50`` and ``wide_resnet``.

Built from torchvision's ``BasicBlock`` / ``Bottleneck`` with torchvision's module names (``conv1``, ``bn1``,
``layer1`` .. ``layer4``), so at ``width=1, stem="imagenet"`` a state dict of ``torchvision.models.resnetXX``
(minus ``fc``) loads unchanged.

Stems:
- ``"cifar"`` (default): 3×3 stride-1 conv, no max-pool (SimCLR's CIFAR variant). At 32×32 the four stages give
  32, 16, 8, 4 pixel maps; at 8×8 (CPC patches) 8, 4, 2, 1.
- ``"imagenet"``: 7×7 stride-2 conv + 3×3 stride-2 max-pool, for STL-10 (96 px) or ImageNet (224 px).

Pooling is adaptive, so any input of at least 1×1 after the stem works.

``bn_splits`` (default 1, plain batch norm) computes each batch norm's training statistics over that many
sub-batches (``SplitBatchNorm``): MoCo's single-device stand-in for per-GPU batch norm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from csl.encoders._common import check_choice, check_positive, scaled
from csl.registry import ENCODER, ChoiceError
from csl.types import Features

STEMS = ("cifar", "imagenet")
LAYOUTS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def layer_norm(channels: int) -> nn.Module:
    """LayerNorm over (C, H, W) with a per-channel affine, independent of the spatial size: GroupNorm(1, C)."""
    return nn.GroupNorm(1, channels)


class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics come from ``num_splits`` sub-batches, each normalised on its own.

    MoCo trains on 8 GPUs, each normalising its own 32 images, and shuffles the keys across GPUs so that a key's
    batch-norm statistics come from other images than its query's (Shuffle-BN, He et al. 2020 §3.3); without it
    the model finds its positive through the statistics. MoCo's CIFAR demo simulates the GPUs on one device
    with this layer (facebookresearch/moco ``colab/moco_cifar10_demo.ipynb``, ``SplitBatchNorm``, ``--bn-splits
    8``), as does lightly's CIFAR-10 MoCo benchmark (``lightly.models.batchnorm.SplitBatchNorm``); the key pass's
    shuffle is ``csl.model.KeyShuffle``. As in the demo: sub-batch k holds the samples k, k + s, k + 2s, ...
    (the batch viewed as N/s × (s·C) channels), the running statistics move by the mean of the sub-batches'
    updates, and evaluation normalises with them as plain batch norm does. A subclass of ``nn.BatchNorm2d``
    with its parameters and buffers, so state dicts are torchvision's.
    """

    def __init__(self, num_features: int, *, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        splits = self.num_splits
        if not self.training or splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % splits:
            raise ValueError(f"bn_splits {splits} needs a batch divisible by {splits}, got {n} samples")
        # The sub-batches as channels: a view of an NCHW tensor; a channels-last one is copied, and so is the result
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        running_mean, running_var = self.running_mean.repeat(splits), self.running_var.repeat(splits)
        y = F.batch_norm(x.contiguous().view(n // splits, splits * c, h, w), running_mean, running_var,
                         self.weight.repeat(splits), self.bias.repeat(splits), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, c).mean(dim=0))
            self.running_var.copy_(running_var.view(splits, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        y = y.view(n, c, h, w)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


class ResNet(nn.Module):
    """A ResNet trunk returning ``Features``: ``vector`` the pooled ``layer4``, ``maps`` the outputs of layer1..4.

    stem_channels: channels of the stem conv. stage_planes: ``planes`` of the four stages (a stage outputs
    ``planes * block.expansion`` channels). norm_layer: a callable ``C -> nn.Module`` (BatchNorm2d by default).
    ``bn_splits`` declares how many sub-batches its batch norms normalise over (1: the whole batch), so the model
    knows to shuffle a momentum target's batch (``csl.model.KeyShuffle``) and that batches must divide by it.
    """

    bn_splits: int = 1

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        stem_channels: int,
        stage_planes: Sequence[int],
        stem: str = "cifar",
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(stage_planes) != 4:
            raise ValueError("a ResNet has four stages")
        check_choice("resnet", "stem", stem, STEMS)
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(stem_channels)
        self.relu = nn.ReLU(inplace=True)

        inplanes = stem_channels
        stages = []
        for i, (planes, blocks) in enumerate(zip(stage_planes, layers)):
            stride = 1 if i == 0 else 2
            stage, inplanes = _make_stage(block, inplanes, planes, blocks, stride, norm_layer)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        self.map_channels: tuple[int, ...] = tuple(p * block.expansion for p in stage_planes)
        self.vector_dim: int = self.map_channels[-1]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts at zero, so each block starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Features:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        vector = torch.flatten(self.avgpool(x), 1)
        return Features(vector=vector, maps=maps)


class SubsampledConv1x1(nn.Conv2d):
    """torchvision's strided ``conv1x1`` shortcut, computed on the CPU as subsampling then a unit-stride 1×1 conv.

    Both give the same result: a 1×1 kernel at stride s reads exactly every s-th pixel. The reason is a oneDNN bug:
    with torch 2.14.1 (oneDNN 3.12) on a CPU without AVX-512 (an AMD EPYC with AVX2), the strided 1×1 backward-
    weights kernel it picks for channels-last inputs never returns, or crashes, for 3 to 5 input channels (N=32,
    4→8 channels, 32×32, stride 2: the layer2 shortcut of a 1/16-wide ResNet-18 at batch 16). The unit-stride
    kernel is not affected. Elsewhere (GPUs) the convolution runs strided as usual. A subclass of ``nn.Conv2d``,
    so state dicts are torchvision's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and self.stride != (1, 1):
            return F.conv2d(x[..., :: self.stride[0], :: self.stride[1]], self.weight, self.bias)
        return super().forward(x)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """torchvision's ``conv1x1`` (no bias), as ``SubsampledConv1x1``."""
    return SubsampledConv1x1(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int,
    norm_layer: Callable[[int], nn.Module],
) -> tuple[nn.Sequential, int]:
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), norm_layer(out))
    layers = [block(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
    layers += [block(out, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def build_resnet(
    name: str,
    depth: int,
    *,
    width: float,
    widen: float = 1.0,
    stem: str,
    zero_init_residual: bool,
    norm_layer: Callable[[int], nn.Module] | None = None,
    bn_splits: int = 1,
) -> ResNet:
    """A ResNet of a torchvision depth; the stem has ``64·width`` channels, stage i ``64·2^i·width·widen`` planes.

    norm_layer: default batch norm, over ``bn_splits`` sub-batches when that is above 1 (``SplitBatchNorm``)."""
    width = check_positive(name, "width", width)
    widen = check_positive(name, "widen", widen)
    check_choice(name, "depth", depth, sorted(LAYOUTS))
    check_choice(name, "stem", stem, STEMS)
    if isinstance(bn_splits, bool) or not isinstance(bn_splits, int) or bn_splits < 1:
        raise ChoiceError(f"encoder '{name}': bn_splits must be a positive integer, got {bn_splits!r}")
    if norm_layer is not None and bn_splits != 1:
        raise ChoiceError(f"encoder '{name}': bn_splits splits batch norm, which this encoder does not use")
    if norm_layer is None:
        norm_layer = functools.partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    block, layers = LAYOUTS[depth]
    resnet = ResNet(
        block,
        layers,
        stem_channels=scaled(64, width),
        stage_planes=[scaled(64 * 2**i, width * widen) for i in range(4)],
        stem=stem,
        norm_layer=norm_layer,
        zero_init_residual=zero_init_residual,
    )
    resnet.bn_splits = bn_splits
    return resnet


@ENCODER.register("resnet18")
def resnet18(*, width: float = 1.0, stem: str = "cifar", zero_init_residual: bool = True, bn_splits: int = 1
             ) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); 512·width-dim vector, maps of 64/128/256/512·width channels."""
    return build_resnet("resnet18", 18, width=width, stem=stem, zero_init_residual=zero_init_residual,
                        bn_splits=bn_splits)


@ENCODER.register("resnet34")
def resnet34(*, width: float = 1.0, stem: str = "cifar", zero_init_residual: bool = True, bn_splits: int = 1
             ) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); 512·width-dim vector, maps of 64/128/256/512·width channels."""
    return build_resnet("resnet34", 34, width=width, stem=stem, zero_init_residual=zero_init_residual,
                        bn_splits=bn_splits)


@ENCODER.register("resnet50")
def resnet50(*, width: float = 1.0, stem: str = "cifar", zero_init_residual: bool = True, bn_splits: int = 1
             ) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); 2048·width-dim vector, maps of 256/512/1024/2048·width channels."""
    return build_resnet("resnet50", 50, width=width, stem=stem, zero_init_residual=zero_init_residual,
                        bn_splits=bn_splits)


@ENCODER.register("wide_resnet")
def wide_resnet(
    *,
    width: float = 1.0,
    widen: float = 2.0,
    depth: int = 34,
    stem: str = "cifar",
    zero_init_residual: bool = True,
    bn_splits: int = 1,
) -> ResNet:
    """A widened ResNet (default: ResNet-34 layout, stages twice as wide: YADIM's wide ResNet-34).

    The four stages' channels are multiplied by ``widen`` on top of ``width``; the stem conv keeps ``64·width``
    channels, as in Zagoruyko & Komodakis' Wide ResNets, whose stem is not widened. ``depth`` is any torchvision
    layout (18, 34 with BasicBlock; 50, 101, 152 with Bottleneck). Unlike torchvision's ``wide_resnet50_2``
    (which widens only the bottleneck's inner 3×3), every stage channel is widened, so the vector is
    ``512·width·widen`` (BasicBlock) or ``2048·width·widen`` (Bottleneck) wide.
    """
    return build_resnet(
        "wide_resnet", depth, width=width, widen=widen, stem=stem, zero_init_residual=zero_init_residual,
        bn_splits=bn_splits,
    )
