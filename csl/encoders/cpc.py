"""CPC v2's patch encoder (Hénaff et al. 2019; pl_bolts ``cpc_resnet50`` / ``cpc_resnet101``).

A Bottleneck ResNet whose normalisation is layer norm instead of batch norm: batch statistics would leak
information between the patches of one image (and between images), which CPC's prediction task can exploit.
The layer norm is ``GroupNorm(1, C)`` — normalisation over (C, H, W) per sample, with a per-channel affine —
which, unlike pl_bolts' ``nn.LayerNorm([C, H, W])``, does not fix the spatial size at construction, so the same
encoder takes 8×8 patches and whole images.

Differences from the paper and from pl_bolts, on purpose:
- standard torchvision layouts (ResNet-50: 3-4-6-3, ResNet-101: 3-4-23-3, expansion 4); pl_bolts' CPCResNet101
  uses 46 blocks of expansion 8 in layer3, and the paper a ResNet-161-like v2 (pre-activation) network;
- post-activation (v1) blocks, as every other ResNet here;
- the CIFAR stem (3×3 stride 1, no max-pool) by default, since the encoder sees small patches (8×8 of a 32×32
  image gives 8, 4, 2, 1 pixel maps); ``stem="imagenet"`` restores the 7×7/2 conv and max-pool for 64 px patches.
"""

from __future__ import annotations

from csl.encoders._common import check_choice
from csl.encoders.resnet import ResNet, build_resnet, layer_norm
from csl.registry import ENCODER

DEPTHS = (50, 101)


@ENCODER.register("cpc_resnet")
def cpc_resnet(
    *, width: float = 1.0, depth: int = 50, stem: str = "cifar", zero_init_residual: bool = True
) -> ResNet:
    """Layer-norm Bottleneck ResNet-50/101; 2048·width-dim vector, maps of 256/512/1024/2048·width channels."""
    check_choice("cpc_resnet", "depth", depth, DEPTHS)
    return build_resnet(
        "cpc_resnet",
        depth,
        width=width,
        stem=stem,
        zero_init_residual=zero_init_residual,
        norm_layer=layer_norm,
    )
