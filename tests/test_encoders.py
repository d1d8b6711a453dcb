"""Encoder aspect: the Features contract of every registered encoder, widths, references, options."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from csl.encoders import ENCODER
from csl.registry import ChoiceError
from csl.types import Features

EXPECTED = {"resnet18", "resnet34", "resnet50", "wide_resnet", "amdim", "cpc_resnet"}
TINY = 1 / 16  # width for contract tests
# keep the tests quick: AMDIM with 3 units per block instead of 10 (its default is tested separately)
FAST = {"amdim": {"n_depth": 3}}


def build(name: str, **options):
    return ENCODER.build(name, **{"width": TINY, **FAST.get(name, {}), **options})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_lists_every_encoder():
    assert EXPECTED <= set(ENCODER.names())


@pytest.mark.parametrize("name", ENCODER.names())
@pytest.mark.parametrize("size", [32, 8])
def test_features_contract(name, size):
    model = build(name)
    assert isinstance(model.vector_dim, int) and model.vector_dim > 0
    assert isinstance(model.map_channels, tuple) and all(isinstance(c, int) for c in model.map_channels)
    x = torch.randn(3, 3, size, size)
    out = model(x)
    assert isinstance(out, Features)
    assert out.vector.shape == (3, model.vector_dim)
    assert len(out.maps) == len(model.map_channels) >= 1
    sides = []
    for fmap, channels in zip(out.maps, model.map_channels):
        assert fmap.ndim == 4 and fmap.shape[:2] == (3, channels)
        sides.append(fmap.shape[-1])
        assert fmap.shape[-2] == fmap.shape[-1] >= 1
    assert sides == sorted(sides, reverse=True), f"maps not shallow→deep: {sides}"
    assert torch.isfinite(out.vector).all()
    if name != "amdim":  # ResNets: the vector is the average-pooled last map
        torch.testing.assert_close(out.vector, out.maps[-1].mean((2, 3)))

    loss = out.vector.square().mean() + sum(m.square().mean() for m in out.maps)
    loss.backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ENCODER.names())
def test_width_scales_parameters(name):
    small, large = n_params(build(name, width=1 / 16)), n_params(build(name, width=1 / 8))
    assert small < large
    assert build(name, width=1 / 16).vector_dim < build(name, width=1 / 8).vector_dim


@pytest.mark.parametrize("name", ENCODER.names())
def test_channels_last_and_copy(name):
    model = build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        target = copy.deepcopy(model)  # momentum targets deep-copy the encoder
        out = target.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out.vector, ref.vector, rtol=1e-4, atol=1e-5)
    for a, b in zip(out.maps, ref.maps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _torchvision_cifar(arch: str) -> nn.Module:
    """torchvision's ResNet with SimCLR's CIFAR stem and no classifier, built independently of csl."""
    ref = getattr(torchvision.models, arch)(weights=None)
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ref.fc = nn.Identity()
    return ref


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_matches_torchvision_parameter_count(arch):
    assert n_params(ENCODER.build(arch)) == n_params(_torchvision_cifar(arch))


@pytest.mark.parametrize("arch, stem", [("resnet18", "cifar"), ("resnet18", "imagenet"), ("resnet50", "imagenet")])
def test_resnet_computes_torchvision_features(arch, stem):
    if stem == "cifar":
        ref = _torchvision_cifar(arch)
    else:
        ref = getattr(torchvision.models, arch)(weights=None)
        ref.fc = nn.Identity()
    model = ENCODER.build(arch, stem=stem)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    model.load_state_dict(state, strict=True)
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).vector, ref(x), rtol=1e-4, atol=1e-5)


def test_resnet_stems():
    x = torch.randn(2, 3, 32, 32)
    assert [m.shape[-1] for m in build("resnet18")(x).maps] == [32, 16, 8, 4]
    assert [m.shape[-1] for m in build("resnet18", stem="imagenet")(x).maps] == [8, 4, 2, 1]
    assert [m.shape[-1] for m in build("resnet18", stem="imagenet")(torch.randn(2, 3, 8, 8)).maps] == [2, 1, 1, 1]


def test_resnet_width_rounding():
    model = ENCODER.build("resnet18", width=0.125)
    assert model.conv1.out_channels == 8 and model.map_channels == (8, 16, 32, 64) and model.vector_dim == 64
    assert ENCODER.build("resnet50", width=0.125).map_channels == (32, 64, 128, 256)
    assert ENCODER.build("resnet18", width=1e-4).map_channels == (1, 1, 1, 1)


def test_wide_resnet():
    wide = build("wide_resnet")
    assert wide.map_channels == tuple(2 * c for c in build("resnet34").map_channels)
    assert wide.conv1.out_channels == build("resnet34").conv1.out_channels  # the stem is not widened
    assert n_params(wide) > n_params(build("resnet34"))
    assert n_params(build("wide_resnet", widen=1.0)) == n_params(build("resnet34"))
    assert build("wide_resnet", depth=50).vector_dim == 2 * build("resnet50").vector_dim


@pytest.mark.parametrize("stem, size", [("cifar", 32), ("stl10", 64), ("imagenet", 128)])
def test_amdim_multiscale_maps(stem, size):
    model = build("amdim", stem=stem)
    out = model(torch.randn(2, 3, size, size))
    assert [tuple(m.shape[-2:]) for m in out.maps] == [(7, 7), (5, 5)]
    assert model.map_channels == (model.vector_dim,) * 2


def test_amdim_default_config():
    assert ENCODER.options("amdim")["n_depth"] == 10
    model = ENCODER.build("amdim", width=1 / 32)  # default depth 10
    assert model.vector_dim == 40 and model.map_channels == (40, 40)
    out = model(torch.randn(2, 3, 32, 32))
    assert [m.shape[-1] for m in out.maps] == [7, 5] and out.vector.shape == (2, 40)
    assert n_params(model) > n_params(ENCODER.build("amdim", width=1 / 32, n_depth=3))
    full = ENCODER.build("amdim", width=1.0, n_depth=1)
    assert full.vector_dim == 1280 and full.rkhs_block_7.conv1.in_channels == 4 * 320


def test_amdim_narrow_rkhs_uses_conv_shortcut():
    model = build("amdim", ndf=320, n_rkhs=256)  # n_rkhs < 4·ndf: the last unit narrows
    out = model(torch.randn(2, 3, 32, 32))
    assert out.vector.shape == (2, model.vector_dim) == (2, 16)


def test_cpc_resnet_is_batch_independent():
    model = build("cpc_resnet").train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        together, alone = model(x).vector[:1], model(x[:1]).vector
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert n_params(build("cpc_resnet", depth=101)) > n_params(build("cpc_resnet"))


def test_unknown_choices_raise():
    with pytest.raises(ChoiceError):
        ENCODER.build("resnet18", temperature=0.1)
    with pytest.raises(ChoiceError):
        ENCODER.build("resnet19")
    with pytest.raises(ChoiceError):
        ENCODER.build("resnet18", stem="tiny")
    with pytest.raises(ChoiceError):
        ENCODER.build("resnet18", width=0)
    with pytest.raises(ChoiceError):
        ENCODER.build("cpc_resnet", depth=34)
    with pytest.raises(ChoiceError):
        ENCODER.build("wide_resnet", depth=28)
    with pytest.raises(ChoiceError):
        ENCODER.build("amdim", n_depth=0)
    with pytest.raises(ChoiceError):
        ENCODER.build("amdim", stem="huge")


def test_build_from_flat_config():
    config = {"encoder": "resnet18", "width": TINY, "depth": 101, "temperature": 0.5}
    model = ENCODER.build_from_config("resnet18", config, context={})
    assert model.vector_dim == 32
    assert ENCODER.context("resnet18") == []
    assert ENCODER.context("amdim") == ["image_size"]  # its layout follows the input side (test_fidelity_amdim)


@pytest.mark.parametrize("channels_last", [False, True])
def test_subsampled_shortcut_equals_a_strided_1x1_conv(channels_last):
    """The ResNet shortcut that the CPU computes as subsample-then-conv gives a strided 1×1 convolution's output
    and gradients (held against float64, which oneDNN does not take: on an AVX2 CPU its strided channels-last
    kernel for these sizes hangs or returns wrong weight gradients), and loads its state dict."""
    from csl.encoders.resnet import SubsampledConv1x1

    ours = SubsampledConv1x1(4, 8, kernel_size=1, stride=2, bias=False)
    reference = nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False).double()
    reference.load_state_dict(ours.state_dict())
    memory = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(32, 4, 32, 32)
    xa = x.clone().contiguous(memory_format=memory).requires_grad_()
    xb = x.double().detach().requires_grad_()
    out, expected = ours(xa), reference(xb)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(ours.weight.grad.double(), reference.weight.grad, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=1e-5, atol=1e-4)
