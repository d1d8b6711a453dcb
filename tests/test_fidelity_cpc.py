"""CPC v2 as its authors built it: the cpc_v2 preset against an independent transcription of the paper's pseudocode.

The reference below is written from Hénaff et al. 2019 ("Data-Efficient Image Recognition with Contrastive
Predictive Coding", appendix A.2: ``pixelCNN`` and ``CPC``) in the pseudocode's own layout (latents B×H×W×D,
TensorFlow kernels kh×kw×in×out, 'SAME' and 'VALID' padding written out tap by tap), shares no code with csl, and
is given its own random weights, which are then loaded into the preset's modules. Tolerance: the similarity
scores in float32, the reference computes in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import csl  # noqa: F401
from csl.config import resolve
from csl.model import CSLModel
from csl.registry import AUGMENT, EXTRACT, LOSS, SIMILARITY
from csl.types import Features, Pairs

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
TOL = {"rtol": 1e-5, "atol": 1e-6}

# ---- the reference: the appendix's pseudocode, transcribed -------------------------------------------------------

Weights = dict[str, tuple[Tensor, Tensor]]  # name -> (kernel kh×kw×in×out, bias out)


def pad(x: Tensor, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0) -> Tensor:
    """Zero padding of B×H×W×C, as the pseudocode's ``Pad``."""
    b, h, w, c = x.shape
    x = torch.cat([x.new_zeros(b, top, w, c), x, x.new_zeros(b, bottom, w, c)], dim=1)
    return torch.cat([x.new_zeros(b, h + top + bottom, left, c), x, x.new_zeros(b, h + top + bottom, right, c)], dim=2)


def conv2d(x: Tensor, kernel: Tensor, bias: Tensor, padding: str = "SAME") -> Tensor:
    """Stride-1 ``Conv2D`` on B×H×W×C, one einsum per kernel tap; 'SAME' pads (k - 1) // 2 before, the rest after."""
    kh, kw = kernel.shape[:2]
    if padding == "SAME":
        x = pad(x, (kh - 1) // 2, kh - 1 - (kh - 1) // 2, (kw - 1) // 2, kw - 1 - (kw - 1) // 2)
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = bias.expand(x.shape[0], out_h, out_w, -1)
    for i in range(kh):
        for j in range(kw):
            out = out + torch.einsum("bhwc,co->bhwo", x[:, i : i + out_h, j : j + out_w], kernel[i, j])
    return out


def pixel_cnn_reference(latents: Tensor, blocks: list[Weights]) -> Tensor:
    cres = latents
    for w in blocks:
        c = torch.relu(conv2d(cres, *w["c1"]))  # 1×1 to 256
        c = conv2d(c, *w["c2"])  # 1×3
        c = pad(c, top=1)
        c = torch.relu(conv2d(c, *w["c3"], padding="VALID"))  # 2×1
        c = conv2d(c, *w["c4"])  # 1×1 back to cres_dim
        cres = cres + c
    return torch.relu(cres)


def cross_entropy_with_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over rows of logsumexp(row) - row[label]."""
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(len(labels)), labels]).mean()


def cpc_reference(latents: Tensor, context: Tensor, target_weights: tuple[Tensor, Tensor],
                  predictions: dict[int, tuple[Tensor, Tensor]], emb_scale: float, steps_to_ignore: int,
                  steps_to_predict: int) -> Tensor:
    """``CPC(latents, ...)``, the context given (``pixelCNN(latents)``) so that directions can share it."""
    loss = latents.new_zeros(())
    targets = conv2d(latents, *target_weights)
    target_dim = targets.shape[-1]
    batch_dim, col_dim, rows = targets.shape[:-1]
    targets = targets.reshape(-1, target_dim)
    for i in range(steps_to_ignore, steps_to_predict):
        col_dim_i = col_dim - i - 1
        if col_dim_i <= 0:  # the pseudocode would take an empty slice here (pl_bolts skips the NaN loss it gives)
            continue
        total_elements = batch_dim * col_dim_i * rows
        preds_i = conv2d(context, *predictions[i])
        preds_i = preds_i[:, : -(i + 1), :, :] * emb_scale
        preds_i = preds_i.reshape(-1, target_dim)
        logits = preds_i @ targets.T
        b = torch.arange(total_elements) // (col_dim_i * rows)
        col = torch.arange(total_elements) % (col_dim_i * rows)
        labels = b * col_dim * rows + (i + 1) * rows + col
        loss = loss + cross_entropy_with_logits(logits, labels)
    return loss


def turned(latents: Tensor, direction: str) -> Tensor:
    """B×H×W×D seen so that ``direction`` runs down the rows."""
    return {"south": latents, "north": latents.flip(1), "east": latents.transpose(1, 2),
            "west": latents.transpose(1, 2).flip(1)}[direction]


def random_kernel(g: torch.Generator, kh: int, kw: int, c_in: int, c_out: int) -> tuple[Tensor, Tensor]:
    scale = (kh * kw * c_in) ** -0.5
    return (torch.randn(kh, kw, c_in, c_out, generator=g, dtype=torch.float64) * scale,
            torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1)


# ---- the csl side ------------------------------------------------------------------------------------------------


class Latents(nn.Module):
    """An 'encoder' whose input is already the latents N×D×h×w: the model's path from there on is the preset's."""

    def forward(self, x: Tensor) -> Features:
        return Features(vector=x.mean(dim=(2, 3)), maps=[x])


def preset(**overrides: object) -> dict:
    return resolve({"method": "cpc_v2", **overrides})


def build_extract(config: dict, channels: int) -> nn.Module:
    return EXTRACT.build_from_config(config["extract"], config, {"map_channels": (channels,), "vector_dim": channels})


def conv_weight(kernel: Tensor) -> Tensor:
    """TensorFlow's kh×kw×in×out as torch's out×in×kh×kw."""
    return kernel.permute(3, 2, 0, 1)


def load_block(block: nn.Module, w: Weights) -> None:
    for layer, name in ((block.reduce, "c1"), (block.across, "c2"), (block.down, "c3"), (block.expand, "c4")):
        layer.weight.copy_(conv_weight(w[name][0]))
        layer.bias.copy_(w[name][1])


def load_linear(layer: nn.Linear, weights: tuple[Tensor, Tensor]) -> None:
    layer.weight.copy_(weights[0][0, 0].T)
    layer.bias.copy_(weights[1])


CASES = [  # directions, context_per_direction, steps_to_ignore, steps_to_predict, grid height, width
    ("south", False, 2, 3, 7, 7),  # the preset
    ("south", False, 0, 3, 5, 4),
    ("south", False, 1, 6, 5, 4),  # pl_bolts' offsets 2-6, those that fit
    ("south,north,east,west", False, 2, 3, 7, 7),
    ("south,north,east,west", True, 0, 2, 5, 4),
]


@pytest.mark.parametrize(("directions", "per_direction", "ignore", "predict", "h", "w"), CASES)
def test_cpc_v2_preset_is_the_papers_pseudocode(directions: str, per_direction: bool, ignore: int, predict: int,
                                                h: int, w: int) -> None:
    """The preset's extract → similarity → loss, weighted as the model sums it, against ``CPC`` of each view
    (summed over directions, the two views averaged), on the same random latents with the same weights."""
    config = preset(directions=directions, context_per_direction=per_direction, steps_to_ignore=ignore,
                    steps_to_predict=predict)
    assert (config["target_dim"], config["emb_scale"], config["context_blocks"]) == (64, 0.1, 5)
    g = torch.Generator().manual_seed(0)
    n, d, hidden, target_dim = 3, 12, config["context_hidden"], config["target_dim"]
    names = directions.split(",")
    contexts = names if per_direction else ["shared"]
    blocks = {c: [{"c1": random_kernel(g, 1, 1, d, hidden), "c2": random_kernel(g, 1, 3, hidden, hidden),
                   "c3": random_kernel(g, 2, 1, hidden, hidden), "c4": random_kernel(g, 1, 1, hidden, d)}
                  for _ in range(config["context_blocks"])] for c in contexts}
    target_weights = random_kernel(g, 1, 1, d, target_dim)
    heads = {name: {i: random_kernel(g, 1, 1, d, target_dim) for i in range(ignore, predict)} for name in names}

    extract = build_extract(config, d).double()
    with torch.no_grad():
        load_linear(extract.targets, target_weights)
        for c in contexts:
            for block, w_block in zip(extract.context[c].blocks, blocks[c], strict=True):
                load_block(block, w_block)
        for name in names:
            for j, i in enumerate(range(ignore, predict)):
                load_linear(extract.predict[name][j], heads[name][i])
    similarity = SIMILARITY.build_from_config(config["similarity"], config, {"dim": extract.out_dim})
    model = CSLModel(Latents(), extract, similarity, LOSS.build_from_config(config["loss"], config, {}), False)

    latents = [torch.randn(n, h, w, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ours, _ = model(*(x.permute(0, 3, 1, 2) for x in latents))

    per_view = []
    for x in latents:
        loss = x.new_zeros(())
        for name in names:
            seen = turned(x, name)
            context = pixel_cnn_reference(seen, blocks[name if per_direction else "shared"])
            loss = loss + cpc_reference(seen, context, target_weights, heads[name], config["emb_scale"], ignore,
                                        predict)
        per_view.append(loss)
    reference = (per_view[0] + per_view[1]) / 2

    torch.testing.assert_close(ours.double(), reference, **TOL)
    ours_grads = torch.autograd.grad(ours, latents, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, latents)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_the_preset_predicts_three_rows_ahead_only() -> None:
    """The pseudocode's loop ``for i in range(2, 3)`` runs once and predicts row r + i + 1."""
    extract = build_extract(preset(), 8)
    assert extract.offsets == (3,)
    assert [k for _, k, _, _ in extract.plan(7, 7, torch.device("cpu"))] == [3]


# ---- what is predicted from where --------------------------------------------------------------------------------

STEP = {"south": (1, 0), "north": (-1, 0), "east": (0, 1), "west": (0, -1)}


def test_each_direction_predicts_k_positions_that_way_and_nothing_else() -> None:
    """From plan(): every anchor's target lies k steps from its context position in its direction, and every
    position with a target that far inside the grid is an anchor exactly once."""
    h, w = 5, 4
    extract = build_extract(preset(directions="south,north,east,west", steps_to_ignore=0, steps_to_predict=4), 6)
    seen = set()
    for direction, k, context_at, target_at in extract.plan(h, w, torch.device("cpu")):
        seen.add((direction, k))
        dr, dc = STEP[direction]
        starts = [(r, c) for r in range(h) for c in range(w) if 0 <= r + k * dr < h and 0 <= c + k * dc < w]
        pairs = [(divmod(int(a), w), divmod(int(t), w)) for a, t in zip(context_at, target_at, strict=True)]
        assert sorted(a for a, _ in pairs) == sorted(starts)
        assert all(t == (a[0] + k * dr, a[1] + k * dc) for a, t in pairs)
    # rows offer offsets 1-4, columns 1-3: an offset beyond the grid is skipped, not wrapped
    assert seen == {(d, k) for d in ("south", "north") for k in (1, 2, 3, 4)} | {
        (d, k) for d in ("east", "west") for k in (1, 2, 3)}


def test_pairs_follow_the_plan() -> None:
    """Each comparison's positive is the plan's target of its image; candidates are all positions of all images."""
    n, h, w, d = 2, 5, 4, 6
    extract = build_extract(preset(directions="south,west", steps_to_ignore=1, steps_to_predict=3), d)
    embedded = [extract.embed(Features(torch.zeros(n, d), [torch.randn(n, d, h, w)])) for _ in range(2)]
    plan = extract.plan(h, w, torch.device("cpu"))
    all_pairs = extract.pairs(embedded[0], embedded[1], None, None)
    assert len(all_pairs) == 2 * len(plan)
    for number, pairs in enumerate(all_pairs):
        direction, k, _, target_at = plan[number % len(plan)]
        view = embedded[number // len(plan)]
        assert pairs.name == f"{'ab'[number // len(plan)]} {direction} k={k}" and pairs.weight == 0.5
        expected = torch.cat([image * h * w + target_at for image in range(n)])
        assert pairs.positive_index.dtype == torch.int64 and torch.equal(pairs.positive_index, expected)
        assert torch.equal(pairs.candidates, view["targets"].reshape(n * h * w, -1))


def test_context_is_causal() -> None:
    """Perturbing rows > r never changes the context at rows <= r, and does change the rows below."""
    torch.manual_seed(0)
    extract = build_extract(preset(context_hidden=16), 6)
    net = extract.context["shared"]
    latents = torch.randn(2, 6, 7, 5)
    before = net(latents)
    for r in range(6):
        changed = latents.clone()
        changed[:, :, r + 1 :] += torch.randn_like(changed[:, :, r + 1 :])
        after = net(changed)
        torch.testing.assert_close(after[:, :, : r + 1], before[:, :, : r + 1], rtol=0, atol=0)
        assert not torch.allclose(after[:, :, r + 1 :], before[:, :, r + 1 :])


@pytest.mark.parametrize("per_direction", [False, True])
def test_no_anchor_sees_what_it_predicts(per_direction: bool) -> None:
    """For every direction: perturbing the latents at one position changes the anchor made at that position and
    no anchor whose context position lies behind it in that direction, so no prediction sees its own target."""
    torch.manual_seed(1)
    n, h, w, d = 1, 5, 4, 6
    config = preset(directions="south,north,east,west", context_per_direction=per_direction, steps_to_ignore=0,
                    steps_to_predict=2, context_hidden=16)
    extract = build_extract(config, d)
    latents = torch.rand(n, d, h, w) + 1.0  # positive, so the final ReLU passes every change
    plan = extract.plan(h, w, torch.device("cpu"))

    def anchors(x: Tensor) -> list[Tensor]:
        embedded = extract.embed(Features(x.mean(dim=(2, 3)), [x]))
        return [pairs.anchors for pairs in extract.pairs(embedded, embedded, None, None)[: len(plan)]]

    base = anchors(latents)
    for q in range(h * w):
        changed = latents.clone()
        changed[0, :, q // w, q % w] += 1.0
        for (direction, _, context_at, _), old, new in zip(plan, base, anchors(changed), strict=True):
            moved = (new - old).abs().amax(dim=1) > 0
            dr, dc = STEP[direction]
            ahead = [(q // w - int(a) // w) * dr + (q % w - int(a) % w) * dc > 0 for a in context_at]
            assert not any(m and a for m, a in zip(moved.tolist(), ahead, strict=True)), (direction, q)
            assert all(moved[context_at == q]), (direction, q)


def footprint(position: int, grid_w: int, patch: int, stride: int) -> tuple[range, range]:
    r, c = divmod(position, grid_w)
    return range(r * stride, r * stride + patch), range(c * stride, c * stride + patch)


def overlapping(plan: list[tuple[str, int, Tensor, Tensor]], grid_w: int, patch: int, stride: int) -> int:
    count = 0
    for _, _, context_at, target_at in plan:
        for a, t in zip(context_at.tolist(), target_at.tolist(), strict=True):
            (ay, ax), (ty, tx) = footprint(a, grid_w, patch, stride), footprint(t, grid_w, patch, stride)
            count += bool(set(ay) & set(ty)) and bool(set(ax) & set(tx))
    return count


@pytest.mark.parametrize("directions", ["south", "south,north,east,west"])
def test_no_target_overlaps_its_anchors_patch(directions: str) -> None:
    """At the preset's defaults (8×8 patches at stride 4 on 32 px), the pixels of every predicted patch are
    disjoint from the pixels of the patch its prediction is made at; predicting one row ahead would not be."""
    config = preset(directions=directions)
    pipeline = AUGMENT.build_from_config(config["augment"], config, {"image_size": 32, "mean": MEAN, "std": STD})
    patch, stride = pipeline.patch_size, pipeline.patch_stride
    assert (patch, stride) == (8, 4)
    views, _ = pipeline(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.Generator())
    side = int(views.shape[1] ** 0.5)
    plan = build_extract(config, 8).plan(side, side, torch.device("cpu"))
    assert plan and overlapping(plan, side, patch, stride) == 0
    near = build_extract(preset(directions=directions, steps_to_ignore=0, steps_to_predict=1), 8)
    assert overlapping(near.plan(side, side, torch.device("cpu")), side, patch, stride) > 0


# ---- the extraction's other contracts ----------------------------------------------------------------------------


def on_mask_path(pairs: Pairs) -> Pairs:
    return Pairs(pairs.anchors, pairs.candidates, pairs.positive_mask(), pairs.exclude, pairs.name)


def test_cpc_pairs_match_the_mask_path() -> None:
    """positive_index (cross-entropy fast path) and the M×K mask give the same loss and gradients."""
    torch.manual_seed(7)
    n, h, w, d = 2, 4, 3, 6
    extract = build_extract(preset(steps_to_ignore=0, steps_to_predict=3, context_hidden=8), d).double()
    grids = [torch.randn(n, d, h, w, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    embedded = [extract.embed(Features(x.mean(dim=(2, 3)), [x])) for x in grids]
    similarity, loss = SIMILARITY.build("dot", scale_by_dim=False), LOSS.build("infonce")
    inputs = [*grids, *extract.parameters()]
    for pairs in extract.pairs(embedded[0], embedded[1], None, None):
        assert pairs.positives is None and pairs.positive_index is not None
        scores = similarity(pairs.anchors, pairs.candidates)
        fast, masked = loss(scores, pairs), loss(scores, on_mask_path(pairs))
        torch.testing.assert_close(fast, masked, **TOL)
        grads = [torch.autograd.grad(v, inputs, retain_graph=True, allow_unused=True) for v in (fast, masked)]
        for a, b in zip(*grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **TOL)


def test_targets_come_from_the_momentum_target_when_there_is_one() -> None:
    extract = build_extract(preset(context_hidden=8), 6)
    online, target = ({"latents": torch.randn(2, 6, 7, 7), "targets": torch.randn(2, 7, 7, 64)} for _ in range(2))
    for pairs in extract.pairs(online, online, target, target):
        assert torch.equal(pairs.candidates, target["targets"].reshape(98, 64))


def test_bad_options_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="'up' is not one of south, north, east, west"):
        build_extract(preset(directions="south,up"), 6)
    with pytest.raises(ValueError, match="names a direction twice"):
        build_extract(preset(directions="south,south"), 6)
    with pytest.raises(ValueError, match="steps_to_ignore < steps_to_predict"):
        build_extract(preset(steps_to_ignore=3, steps_to_predict=3), 6)
    extract = build_extract(preset(), 6)
    with pytest.raises(ValueError, match="3 to 3 rows ahead, beyond a grid of 3×3"):
        extract.plan(3, 3, torch.device("cpu"))


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
