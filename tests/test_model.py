"""Every preset and every extraction × similarity × loss combination builds and trains, or is refused with a reason."""

from __future__ import annotations

import itertools

import pytest
import torch

import csl  # noqa: F401
from csl.config import resolve
from csl.model import CombinationError, build_model
from csl.presets import PRESETS
from csl.registry import EXTRACT, LOSS, SIMILARITY, ChoiceError
from csl.train import Run
from tests.helpers import cifar_mini, random_images, tiny  # noqa: F401  (cifar_mini is a fixture)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def one_step(config: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    pipeline, model = build_model(resolve(config), image_size=32, mean=MEAN, std=STD)
    g = torch.Generator().manual_seed(0)
    view_a, view_b = pipeline(random_images(8), g)
    loss, _ = model(view_a, view_b)
    loss.backward()
    return loss, model


def first_conv_grad(model: torch.nn.Module) -> torch.Tensor:
    conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.grad is not None
    return conv.weight.grad


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_trains_a_few_steps(method: str, cifar_mini) -> None:
    run = Run(tiny(method=method), data=cifar_mini)
    before = None
    if run.model.target is not None:
        before = [p.clone() for p in run.model.target.parameters()]
    losses = []
    for images, labels in run.train_data.batches(run.config["batch_size"], run.generator):
        losses.append(float(run.train_step(images, labels)))
        if len(losses) == 3:
            break
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert first_conv_grad(run.model).abs().sum() > 0, "no gradient reached the encoder"
    if method in ("byol", "moco_v2"):
        assert run.model.target is not None
        after = list(run.model.target.parameters())
        assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True)), "EMA target did not move"
    else:
        assert run.model.target is None


COMBOS = list(itertools.product(EXTRACT.names(), SIMILARITY.names(), LOSS.names()))


@pytest.mark.parametrize(("extract", "similarity", "loss"), COMBOS)
def test_every_extract_similarity_loss_combination(extract: str, similarity: str, loss: str) -> None:
    config = tiny(augment="simclr", encoder="resnet18", extract=extract, similarity=similarity, loss=loss,
                  comparisons="1:5, 1:7, 5:5")
    if loss == "byol" and similarity != "cosine":
        with pytest.raises(CombinationError, match="needs similarity 'cosine'"):
            one_step(config)
        return
    value, model = one_step(config)
    assert torch.isfinite(value)
    assert first_conv_grad(model).abs().sum() > 0


@pytest.mark.parametrize("extract", ["last_vector", "multiscale", "cpc_context", "last_map"])
def test_patch_pipeline_with_every_extraction(extract: str) -> None:
    """CPC's patch views compose with every extraction, except multiscale comparisons that need a second map."""
    config = tiny(augment="cpc", encoder="resnet18", extract=extract, similarity="dot", loss="infonce")
    if extract == "multiscale":
        with pytest.raises(CombinationError, match="intermediate feature map"):
            one_step({**config, "comparisons": "1:5, 1:7, 5:5"})
        config["comparisons"] = "1:5, 5:5"
    value, model = one_step(config)
    assert torch.isfinite(value)
    assert first_conv_grad(model).abs().sum() > 0


def test_target_ema_updates_every_parameter_and_buffer() -> None:
    _, model = one_step(tiny(method="byol", encoder="resnet18"))
    assert model.target is not None
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
        for b in model.encoder.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    t_before = [t.clone() for t in model.target["encoder"].state_dict().values()]
    model.update_target(0.9)
    moved = [not torch.equal(b, a) for b, a in zip(t_before, model.target["encoder"].state_dict().values(),
                                                    strict=True)]
    names = list(model.target["encoder"].state_dict())
    float_names = [n for n, t in model.target["encoder"].state_dict().items() if t.is_floating_point()]
    assert any("bias" in n for n in float_names) and any("running_mean" in n for n in float_names)
    assert all(m for m, n in zip(moved, names, strict=True) if n in float_names)
    # τ-weighted average, checked on one bias by the EMA formula: t ← τ·t + (1 − τ)·o.
    name = next(n for n in float_names if n.endswith("bias"))
    t0 = dict(zip(names, t_before, strict=True))[name]
    o = model.encoder.state_dict()[name]
    torch.testing.assert_close(model.target["encoder"].state_dict()[name], 0.9 * t0 + 0.1 * o)


def test_loss_needing_target_with_momentum_zero_is_refused() -> None:
    with pytest.raises(CombinationError, match="momentum target"):
        one_step(tiny(method="moco_v2", encoder="resnet18", target_momentum=0))


def test_unknown_names_and_options_are_refused() -> None:
    with pytest.raises(ChoiceError, match="choose one of"):
        resolve(tiny(method="simclr", loss="nope"))
    with pytest.raises(ChoiceError, match="unknown option not_an_option"):
        resolve(tiny(method="simclr", not_an_option=1))


def _loss_of(config: dict, views: tuple[torch.Tensor, torch.Tensor], state: dict | None = None) -> tuple:
    """The model's loss on views with batch norm on its running statistics (eval mode: no batch dependence)."""
    torch.manual_seed(0)
    _, model = build_model(resolve(config), image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    loss, _ = model(*views)
    return loss, model


@pytest.mark.parametrize("method", ["simclr", "amdim", "cpc_v2"])
def test_separate_views_equal_joint_views_when_batches_do_not_matter(method: str) -> None:
    """The two ways differ only in batch normalisation's batches: on running statistics the loss is the same, so
    the separate passes put vectors and every feature map back in the joint order."""
    torch.manual_seed(1)
    config = tiny(method=method)
    pipeline, _ = build_model(resolve(config), image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views = pipeline(random_images(8), torch.Generator().manual_seed(0))
    joint, model = _loss_of(config, views)
    separate, _ = _loss_of({**config, "encode_views": "separate"}, views, model.state_dict())
    assert torch.allclose(joint, separate, rtol=1e-5, atol=1e-6)


def test_separate_views_normalise_each_view_on_its_own() -> None:
    """With batch norm, a separate pass gives view a what the encoder gives view a alone; a joint pass does not."""
    from csl.model import encode_views
    from csl.registry import ENCODER

    torch.manual_seed(0)
    encoder = ENCODER.build("resnet18", width=1 / 16).train()
    a, b = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32) * 3 + 1  # views with different statistics
    alone = encoder(a).vector
    separate = encode_views(encoder, a, b, separate=True)
    joint = encode_views(encoder, a, b, separate=False)
    assert torch.allclose(separate.vector[:8], alone, atol=1e-6)
    assert torch.allclose(separate.vector[8:], encoder(b).vector, atol=1e-6)
    assert not torch.allclose(joint.vector[:8], alone, atol=1e-3)
    assert [m.shape for m in separate.maps] == [m.shape for m in joint.maps]


@pytest.mark.parametrize("method", ["byol", "cpc_v2"])
def test_separate_views_train(method: str, cifar_mini) -> None:
    """Momentum target and patch grids take the separate passes too."""
    run = Run(tiny(method=method, encode_views="separate"), data=cifar_mini)
    assert run.model.separate_views
    assert torch.isfinite(torch.tensor(run.train_epoch()["ssl_loss"]))


def test_encode_views_takes_only_its_two_values() -> None:
    with pytest.raises(ChoiceError, match="encode_views 'both'; choose one of: joint, separate"):
        resolve(tiny(method="simclr", encode_views="both"))


@pytest.mark.parametrize("kind", ["mlp", "mlp_bn"])
def test_projection_heads_match_their_formula(kind: str) -> None:
    """mlp: W2·relu(bn(W1·x)) + b2; mlp_bn: bn(W2·relu(bn(W1·x))) with no biases (SimCLR's code, lightly's
    SimCLRProjectionHead). Batch norm written out by hand: training mode, batch statistics, biased variance."""
    from csl.extract.heads import Head

    torch.manual_seed(0)
    head = Head(kind, 12, 20, 6)
    x = torch.randn(32, 12)

    def bn(h: torch.Tensor) -> torch.Tensor:
        return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)

    w1, w2 = head.net[0].weight, head.net[3].weight
    expected = torch.relu(bn(x @ w1.T)) @ w2.T
    if kind == "mlp":
        expected = expected + head.net[3].bias
    else:
        assert head.net[3].bias is None
        expected = bn(expected)
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-4)
    # a map's locations (N×L×C) go through the same head, as AMDIM's 1×1 embedding
    assert head(torch.randn(4, 8, 12)).shape == (4, 8, 6)


def test_mlp_bn_head_is_a_config_choice(cifar_mini) -> None:
    run = Run(tiny(method="simclr", head="mlp_bn"), data=cifar_mini)
    assert isinstance(run.model.extract.head.net[-1], torch.nn.BatchNorm1d)
    assert torch.isfinite(run.train_step(*next(iter(run.train_data.batches(16, run.generator)))))
    with pytest.raises(ChoiceError, match="head 'mlp_batchnorm'; choose one of: none, linear, mlp, mlp_bn"):
        resolve(tiny(method="simclr", head="mlp_batchnorm"))  # so a space file naming it fails when loaded
