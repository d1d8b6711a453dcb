"""Losses and similarities against references written out from their published formulas with explicit loops.

The references share no code with csl: they loop over anchors and candidates in float64 and use math directly.
Tolerance: 1e-5 relative (float32 implementation vs float64 reference).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import csl  # noqa: F401
from csl.extract.last_vector import two_view_pairs
from csl.extract.multiscale import same_image_pairs
from csl.model import NegativeQueue
from csl.registry import EXTRACT, LOSS, SIMILARITY
from csl.types import Features, Pairs

TOL = {"rel": 1e-5, "abs": 1e-5}
PATHS = ["index", "mask"]  # positives as positive_index (cross-entropy fast path) or as an M×K mask


def on_path(pairs: Pairs, path: str) -> Pairs:
    """The same comparison with its positives given the way ``path`` names."""
    if path == "index":
        assert pairs.positive_index is not None and pairs.positives is None
        return pairs
    return Pairs(pairs.anchors, pairs.candidates, pairs.positive_mask(), pairs.exclude, pairs.name)


def cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(sum(a * b for a, b in zip(u.tolist(), v.tolist())) / (math.sqrt(sum(a * a for a in u.tolist()))
                                                                         * math.sqrt(sum(b * b for b in v.tolist()))))


def nt_xent_reference(za: torch.Tensor, zb: torch.Tensor, tau: float) -> float:
    """SimCLR eq. (1): l(i,j) = −log exp(sim(z_i,z_j)/τ) / Σ_{k≠i} exp(sim(z_i,z_k)/τ), averaged over all 2N."""
    z = list(za) + list(zb)
    n = len(za)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(cos(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(z[i], z[j]) / tau) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_infonce_with_cosine_is_nt_xent(tau: float, path: str) -> None:
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    pairs = on_path(two_view_pairs(za, zb, za, zb, symmetric=True), path)
    scores = SIMILARITY.build("cosine", temperature=tau)(pairs.anchors, pairs.candidates)
    ours = LOSS.build("infonce")(scores, pairs)
    assert float(ours) == pytest.approx(nt_xent_reference(za, zb, tau), **TOL)


@pytest.mark.parametrize("path", PATHS)
def test_nt_xent_gradient_masks_self_similarity(path: str) -> None:
    """The self term is masked out, so the gradient equals that of the reference (pl_bolts subtracted it)."""
    g = torch.Generator().manual_seed(1)
    za = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pairs = on_path(two_view_pairs(za, zb, za, zb, symmetric=True), path)
    scores = SIMILARITY.build("cosine", temperature=0.5)(pairs.anchors, pairs.candidates).double()
    LOSS.build("infonce")(scores, pairs).backward()
    ours = (za.grad.clone(), zb.grad.clone())

    z = torch.cat([za, zb]).detach().requires_grad_(True)
    zn = z / z.norm(dim=1, keepdim=True)
    total = z.new_zeros(())
    for i in range(6):
        terms = torch.stack([zn[i] @ zn[k] / 0.5 for k in range(6) if k != i])
        total = total - (zn[i] @ zn[(i + 3) % 6] / 0.5 - torch.logsumexp(terms, 0))
    (total / 6).backward()
    torch.testing.assert_close(torch.cat(ours), z.grad, rtol=1e-6, atol=1e-8)


def test_amdim_nce_global_to_local() -> None:
    """AMDIM: each (image, location) positive against every location of the other images, on clipped scores;
    + 0.05·mean(s²) of the raw scores (the full preset path: tests/test_fidelity_amdim.py)."""
    g = torch.Generator().manual_seed(2)
    n, locs, d, tclip = 3, 4, 6, 5.0
    glob, local = 3 * torch.randn(n, d, generator=g), 3 * torch.randn(n, locs, d, generator=g)
    cand_img = torch.arange(n).repeat_interleave(locs)
    pairs = same_image_pairs(glob, torch.arange(n), local.reshape(-1, d), cand_img, "1:5")
    raw_scores, scores = SIMILARITY.build("dot", tclip=tclip).raw_and_clipped(pairs.anchors, pairs.candidates)
    ours = LOSS.build("amdim_nce", reg_weight=0.05)(scores, pairs, raw_scores=raw_scores)

    def raw(i: int, j: int, l: int) -> float:
        return sum(a * b for a, b in zip(glob[i].tolist(), local[j, l].tolist())) / math.sqrt(d)

    def s(i: int, j: int, l: int) -> float:
        return tclip * math.tanh(raw(i, j, l) / tclip)

    nce, count, reg = 0.0, 0, 0.0
    for i in range(n):
        negatives = [s(i, j, l) for j in range(n) if j != i for l in range(locs)]
        for l in range(locs):
            pos = s(i, i, l)
            nce += -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(x) for x in negatives)))
            count += 1
        reg += sum(raw(i, j, l) ** 2 for j in range(n) for l in range(locs))
    reference = nce / count + 0.05 * reg / (n * n * locs)
    assert float(ours) == pytest.approx(reference, **TOL)


@pytest.mark.parametrize("path", PATHS)
def test_byol_is_two_minus_two_cosine(path: str) -> None:
    g = torch.Generator().manual_seed(3)
    qa, qb, ka, kb = (torch.randn(4, 8, generator=g) for _ in range(4))
    pairs = on_path(two_view_pairs(qa, qb, ka, kb, symmetric=False), path)
    scores = SIMILARITY.build("cosine", temperature=1.0)(pairs.anchors, pairs.candidates)
    ours = LOSS.build("byol")(scores, pairs)
    reference = sum(2 - 2 * cos(qa[i], kb[i]) + 2 - 2 * cos(qb[i], ka[i]) for i in range(4)) / 8
    assert float(ours) == pytest.approx(reference, **TOL)


@pytest.mark.parametrize("batch_negatives", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_moco_negatives_are_the_queue(path: str, batch_negatives: bool) -> None:
    """MoCo: −log e^{q·k⁺/τ} / (e^{q·k⁺/τ} + Σ_{k⁻} e^{q·k⁻/τ}), k⁻ over the queue (all K entries: it starts full
    of random keys, here half replaced by past keys); with batch_negatives also over the keys (both views) of the
    other images in the batch, the query's own image's same-view key excluded."""
    g = torch.Generator().manual_seed(4)
    n, d, tau = 3, 5, 0.2
    qa, qb, ka, kb = (torch.randn(n, d, generator=g) for _ in range(4))
    past = torch.randn(4, d, generator=g)
    queue = NegativeQueue(size=8)
    pairs = on_path(two_view_pairs(qa, qb, ka, kb, symmetric=False), path)
    queue.push(Pairs(past, past, torch.zeros(4, 4, dtype=torch.bool), None, pairs.name))
    queued = queue.rings[pairs.name].clone()
    assert torch.equal(queued[:4], past) and torch.allclose(queued[4:].norm(dim=1), torch.ones(4))
    extended = queue.extend(pairs)
    scores = SIMILARITY.build("cosine", temperature=tau)(extended.anchors, extended.candidates)
    ours = LOSS.build("moco", queue_size=8, batch_negatives=batch_negatives)(scores, extended)

    total = 0.0
    for q_side, k_side in ((qa, kb), (qb, ka)):
        for i in range(n):
            pos = math.exp(cos(q_side[i], k_side[i]) / tau)
            neg = sum(math.exp(cos(q_side[i], key) / tau) for key in queued)
            if batch_negatives:
                neg += sum(math.exp(cos(q_side[i], keys[j]) / tau) for keys in (ka, kb) for j in range(n) if j != i)
            total += -math.log(pos / (pos + neg))
    assert float(ours) == pytest.approx(total / (2 * n), **TOL)


def test_queue_is_a_ring_buffer() -> None:
    queue = NegativeQueue(size=3)
    for value in range(5):
        keys = torch.full((1, 2), float(value))
        queue.push(Pairs(keys, keys, torch.ones(1, 1, dtype=torch.bool), None, "x"))
    assert sorted(queue.rings["x"][:, 0].tolist()) == [2.0, 3.0, 4.0]
    assert queue.pointer["x"] == 5 % 3


@pytest.mark.parametrize("path", PATHS)
def test_triplet_hardest_negative(path: str) -> None:
    g = torch.Generator().manual_seed(5)
    za, zb = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    pairs = on_path(two_view_pairs(za, zb, za, zb, symmetric=True), path)
    scores = SIMILARITY.build("cosine", temperature=1.0)(pairs.anchors, pairs.candidates)
    ours = LOSS.build("triplet", margin=0.3)(scores, pairs)
    z = list(za) + list(zb)
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        hardest = max(cos(z[i], z[k]) for k in range(8) if k not in (i, j))
        total += max(0.0, 0.3 - cos(z[i], z[j]) + hardest)
    assert float(ours) == pytest.approx(total / 8, **TOL)


def random_single_positive(m: int, k: int, with_exclude: bool, dtype: torch.dtype, seed: int,
                           positives_below: int | None = None) -> tuple[torch.Tensor, Pairs]:
    """Scores M×K and index-form pairs; with exclude, ~30% of candidates excluded and anchor 0 left no negative.
    positives_below: every positive among the first candidates (the batch's, before a queue's)."""
    g = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(m, k, generator=g, dtype=dtype)
    index = torch.randint(positives_below or k, (m,), generator=g)
    exclude = None
    if with_exclude:
        exclude = torch.rand(m, k, generator=g) < 0.3
        exclude[0] = True
        exclude[torch.arange(m), index] = False  # a positive is never excluded
    return scores, Pairs(torch.zeros(m, 1), torch.zeros(k, 1), None, exclude, "random", positive_index=index)


def value_and_grad(loss: torch.nn.Module, scores: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scores.clone().requires_grad_(True)
    value = loss(scores, pairs)
    (grad,) = torch.autograd.grad(value, scores)
    return value.detach(), grad


# moco's options: 20 of the 53 candidates are its queue, with and without the batch's other candidates as negatives
LOSS_OPTIONS = {
    "infonce": ("infonce", {}), "amdim_nce": ("amdim_nce", {}), "moco": ("moco", {"queue_size": 20}),
    "moco+batch": ("moco", {"queue_size": 20, "batch_negatives": True}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_index_path_equals_mask_path(name: str, with_exclude: bool, dtype: torch.dtype) -> None:
    """The cross-entropy fast path gives the mask path's value and gradient (amdim_nce: its regulariser too)."""
    loss_name, options = LOSS_OPTIONS[name]
    loss = LOSS.build(loss_name, **options)
    for seed in range(3):
        below = 53 - options["queue_size"] if loss_name == "moco" else None
        scores, pairs = random_single_positive(37, 53, with_exclude, dtype, seed, positives_below=below)
        fast = value_and_grad(loss, scores, pairs)
        masked = value_and_grad(loss, scores, on_path(pairs, "mask"))
        torch.testing.assert_close(fast, masked)


def test_positive_mask_from_index() -> None:
    index = torch.tensor([2, 0, 2])
    pairs = Pairs(torch.zeros(3, 1), torch.zeros(4, 1), None, None, "x", positive_index=index)
    expected = [[j == int(index[i]) for j in range(4)] for i in range(3)]
    assert pairs.positive_mask().tolist() == expected
    mask = torch.tensor(expected)
    assert Pairs(torch.zeros(3, 1), torch.zeros(4, 1), mask).positive_mask() is mask
    with pytest.raises(ValueError, match="exactly one"):
        Pairs(torch.zeros(3, 1), torch.zeros(4, 1), mask, positive_index=index)
    with pytest.raises(ValueError, match="exactly one"):
        Pairs(torch.zeros(3, 1), torch.zeros(4, 1), None)
    with pytest.raises(ValueError, match="one column per anchor"):
        Pairs(torch.zeros(3, 1), torch.zeros(4, 1), None, positive_index=index[:2])


def test_multiscale_against_the_global_scale_gives_positive_index() -> None:
    """In 'a:1' the candidates are the N global vectors, so an anchor's one positive is its own image's vector."""
    torch.manual_seed(8)
    n = 3
    extract = EXTRACT.build("multiscale", vector_dim=5, map_channels=(4, 6), comparisons="5:1, 1:1", proj_dim=3,
                            anchor_locations=2)
    views = [Features(torch.randn(n, 5), [torch.randn(n, 4, 3, 3), torch.randn(n, 6, 2, 2)]) for _ in range(2)]
    embedded = [extract.embed(f) for f in views]
    loss, similarity = LOSS.build("amdim_nce"), SIMILARITY.build("dot", tclip=5.0)
    for pairs in extract.pairs(embedded[0], embedded[1], None, None):
        assert pairs.positives is None and pairs.positive_index is not None
        anchor_img = torch.arange(n).repeat_interleave(pairs.anchors.shape[0] // n)
        reference = same_image_pairs(pairs.anchors, anchor_img, pairs.candidates, torch.arange(n), pairs.name)
        assert torch.equal(pairs.positive_mask(), reference.positives)
        scores = similarity(pairs.anchors, pairs.candidates)
        torch.testing.assert_close(loss(scores, pairs), loss(scores, reference))


def test_similarities_by_formula() -> None:
    g = torch.Generator().manual_seed(6)
    a, c = torch.randn(2, 4, generator=g), torch.randn(3, 4, generator=g)
    dot = SIMILARITY.build("dot", temperature=0.5, scale_by_dim=False)(a, c)
    assert float(dot[1, 2]) == pytest.approx(sum(x * y for x, y in zip(a[1].tolist(), c[2].tolist())) / 0.5, **TOL)
    clipped = SIMILARITY.build("dot", temperature=1.0, tclip=1.0, scale_by_dim=False)(a * 10, c)
    assert float(clipped.abs().max()) <= 1.0
    cosine = SIMILARITY.build("cosine", temperature=0.2)(a, c)
    assert float(cosine[0, 1]) == pytest.approx(cos(a[0], c[1]) / 0.2, **TOL)
    bilinear = SIMILARITY.build("bilinear", dim=4, temperature=1.0)
    with torch.no_grad():
        bilinear.weight.copy_(torch.arange(16.0).reshape(4, 4))
    w = bilinear.weight.tolist()
    ref = sum(a[0, i].item() * w[i][j] * c[1, j].item() for i in range(4) for j in range(4))
    assert float(bilinear(a, c)[0, 1].detach()) == pytest.approx(ref, rel=1e-5)
    assert F.normalize(a, dim=1).shape == a.shape


def test_bad_options_are_named() -> None:
    with pytest.raises(csl.ChoiceError, match="margin"):
        LOSS.build("infonce", margin=1.0)
    with pytest.raises(csl.ChoiceError, match="choose one of"):
        LOSS.build("nope")
    with pytest.raises(ValueError, match="temperature"):
        SIMILARITY.build("cosine", temperature=0.0)
