"""The label-free metrics against hand-worked cases, and how a run holds out and measures its images.

Each metric is checked on inputs whose answer is known on paper: a matrix built with chosen singular values
(Q Σ Vᵀ with random orthonormal Q, V), a covariance whose spectrum is exactly a power law, points on a circle
whose alignment and uniformity are sums of a few cosines and exponentials.
"""

from __future__ import annotations

import math

import pytest
import torch

from csl import label_free
from csl.data import load
from csl.metrics import METRICS
from csl.train import LABEL_FREE_SEED, Run

from tests.helpers import cifar_mini, tiny  # noqa: F401 - cifar_mini is a fixture


def orthonormal(rows: int, cols: int, seed: int, *, centred: bool = False) -> torch.Tensor:
    """rows×cols float64 with orthonormal columns (QR of a Gaussian matrix); centred: columns of zero mean too."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if centred:
        x = x - x.mean(dim=0, keepdim=True)
    return torch.linalg.qr(x).Q


def with_singular_values(sigma: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    k = len(sigma)
    return orthonormal(rows, k, seed) @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) \
        @ orthonormal(cols, k, seed + 1).T


def with_covariance_spectrum(eigenvalues: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """rows×cols samples whose covariance (centred, divided by rows − 1) has exactly these eigenvalues."""
    k = len(eigenvalues)
    scale = torch.tensor(eigenvalues, dtype=torch.float64).sqrt() * math.sqrt(rows - 1)
    return orthonormal(rows, k, seed, centred=True) @ torch.diag(scale) @ orthonormal(cols, k, seed + 1).T


def rankme_by_hand(sigma: list[float], count: int) -> float:
    """exp of the entropy of p_k = σ_k / Σσ + ε over ``count`` singular values (the rest are zero)."""
    total = sum(sigma)
    p = [s / total + 1e-7 for s in sigma] + [1e-7] * (count - len(sigma))
    return math.exp(-sum(q * math.log(q) for q in p))


def test_rankme_of_a_matrix_with_known_singular_values() -> None:
    # σ = 4, 2, 1, 1: p = 1/2, 1/4, 1/8, 1/8, entropy 1.75 ln 2, RankMe 2^1.75 (ε aside)
    z = with_singular_values([4.0, 2.0, 1.0, 1.0], rows=50, cols=12)
    assert label_free.rankme(z) == pytest.approx(rankme_by_hand([4.0, 2.0, 1.0, 1.0], 12), rel=1e-9)
    assert label_free.rankme(z) == pytest.approx(2**1.75, rel=1e-4)
    # equal singular values: RankMe is their count; scale does not matter
    assert label_free.rankme(with_singular_values([3.0] * 7, rows=40, cols=9)) == pytest.approx(7.0, rel=1e-4)
    assert label_free.rankme(1e3 * z.float()) == pytest.approx(2**1.75, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_recovers_an_exact_power_law(alpha: float) -> None:
    z = with_covariance_spectrum([i ** -alpha for i in range(1, 65)], rows=400, cols=64)
    assert label_free.alpha_req(z) == pytest.approx(alpha, abs=1e-8)


def test_alpha_req_fits_ranks_6_to_100_and_only_what_the_sample_resolves() -> None:
    # The five largest eigenvalues and everything beyond rank 100 follow other laws: α comes from ranks 6..100.
    spectrum = [50.0, 30.0, 10.0, 9.0, 8.0] + [i**-1.5 for i in range(6, 101)] \
        + [1e-3 * i**-4.0 for i in range(101, 161)]
    z = with_covariance_spectrum(spectrum, rows=600, cols=160)
    assert label_free.alpha_req(z) == pytest.approx(1.5, abs=1e-8)
    # 40 samples of 64 dimensions resolve 39 eigenvalues (the centred matrix has rank 39): ranks 6..39
    few = with_covariance_spectrum([i**-0.8 for i in range(1, 40)], rows=40, cols=64)
    assert label_free.alpha_req(few) == pytest.approx(0.8, abs=1e-8)
    # fewer than two ranks from 6 on: no fit
    assert math.isnan(label_free.alpha_req(with_covariance_spectrum([1.0, 0.5, 0.2], rows=6, cols=8)))


def test_alpha_req_weights_ranks_by_one_over_i() -> None:
    """Off a power law the fit is the authors' weighted one: minimise Σ (1/i)(log λ_i + α log i − c)², solved here
    by the normal equations written out."""
    spectrum = [1.0] * 5 + [i**-1.0 * math.exp(-i / 10) for i in range(6, 41)]  # decreasing, not a power law
    z = with_covariance_spectrum(spectrum, rows=300, cols=40)
    xs = [math.log(i) for i in range(6, 41)]
    ys = [math.log(spectrum[i - 1]) for i in range(6, 41)]
    ws = [1.0 / i for i in range(6, 41)]
    sw, swx, swy = sum(ws), sum(w * x for w, x in zip(ws, xs)), sum(w * y for w, y in zip(ws, ys))
    swxx, swxy = sum(w * x * x for w, x in zip(ws, xs)), sum(w * x * y for w, x, y in zip(ws, xs, ys))
    slope = (sw * swxy - swx * swy) / (sw * swxx - swx**2)
    assert label_free.alpha_req(z) == pytest.approx(-slope, abs=1e-8)


def circle(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_alignment_of_views_at_known_angles() -> None:
    # ‖u − v‖² = 2 − 2 cos θ on the unit circle: θ = 0°, 90°, 180° give 0, 2, 4, mean 2; 60° alone gives 1
    anchors = circle([10.0, 20.0, 30.0])
    assert label_free.alignment(anchors, circle([10.0, 110.0, 210.0])) == pytest.approx(2.0, abs=1e-6)
    assert label_free.alignment(5.0 * circle([0.0]), 0.1 * circle([60.0])) == pytest.approx(1.0, abs=1e-6)


def test_uniformity_of_points_on_a_circle() -> None:
    # The square's 6 pairs: 4 sides with d² = 2, 2 diagonals with d² = 4
    square = circle([0.0, 90.0, 180.0, 270.0])
    expected = math.log((4 * math.exp(-2 * 2) + 2 * math.exp(-2 * 4)) / 6)
    assert label_free.uniformity(3.0 * square) == pytest.approx(expected, abs=1e-6)
    assert label_free.uniformity(circle([45.0] * 5)) == pytest.approx(0.0, abs=1e-6)  # one point: log 1


def test_label_free_metrics_are_the_table_s_held_out_metrics() -> None:
    views = circle([0.0, 90.0, 180.0, 270.0]), circle([0.0, 90.0, 180.0, 90.0])
    clean = with_covariance_spectrum([i**-2.0 for i in range(1, 17)], rows=100, cols=16).float()
    metrics = label_free.label_free_metrics(clean, *views)
    assert set(metrics) == {m.name for m in METRICS.values() if m.held_out}
    assert metrics["alpha_req"] == pytest.approx(2.0, abs=1e-4)
    assert metrics["alpha_req_gap"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["alignment"] == pytest.approx(1.0, abs=1e-6)  # one view of four at 180°: d² = 4
    assert metrics["uniformity"] == pytest.approx((label_free.uniformity(views[0])
                                                   + label_free.uniformity(views[1])) / 2)


# ------------------------------------------------------------------------------------------------ in a run


def rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(image.flatten().tolist()) for image in images}


def test_held_out_images_are_never_trained_on_and_the_same_in_every_trial(cifar_mini) -> None:
    run = Run(tiny(method="simclr", label_free_samples=8), data=cifar_mini)
    other_seed = Run(tiny(method="simclr", label_free_samples=8, seed=3), data=cifar_mini)
    held, trained = rows(run.label_free_data.images), rows(run.train_data.images)
    assert len(run.label_free_data) == 8 and len(run.train_data) == len(cifar_mini[0]) - 8
    assert not held & trained and held | trained == rows(cifar_mini[0].images)
    assert rows(other_seed.label_free_data.images) == held  # chosen with LABEL_FREE_SEED, not the run's seed
    auto = Run(tiny(method="simclr", train_limit=None), data=(load("cifar10-mini", limit=400), cifar_mini[1]))
    assert len(auto.label_free_data) == 10  # None: min(1024, 1/40 of the set)


def test_a_set_too_small_to_hold_out_from_says_so(cifar_mini, capsys: pytest.CaptureFixture) -> None:
    run = Run(tiny(method="simclr"), data=cifar_mini)  # 64 images: 1/40 of them is less than 2
    assert run.label_free_data is None and len(run.train_data) == 64
    assert not set(run.evaluate()) & {m.name for m in METRICS.values() if m.held_out}
    lines = [line for line in capsys.readouterr().err.splitlines() if "not measured" in line]
    assert len(lines) == 1 and "rankme, alpha_req" in lines[0] and "too small" in lines[0], lines


def test_label_free_evaluation_sees_the_same_views_and_leaves_training_draws_alone(cifar_mini) -> None:
    run = Run(tiny(method="simclr", label_free_samples=16), data=cifar_mini)
    state = run.generator.get_state()
    first = run.evaluate_label_free()
    assert torch.equal(run.generator.get_state(), state)  # the training generator's stream is untouched
    assert run.evaluate_label_free() == first  # the same images and views: the same figures
    run.train_epoch()
    again = run.evaluate()
    assert set(first) <= set(again) and {"knn_acc", "probe_acc"} <= set(again)
    assert again["rankme"] != first["rankme"]  # training moved the representations
    assert 1.0 <= again["rankme"] <= 16 and 0.0 <= again["alignment"] <= 4.0 and -4.0 <= again["uniformity"] <= 0.0
    assert LABEL_FREE_SEED == 0


def test_batch_size_check_counts_the_held_out_images(cifar_mini) -> None:
    with pytest.raises(ValueError, match=r"\(48 images after 16 held out .*label_free_samples"):
        Run(tiny(method="simclr", batch_size=64, label_free_samples=16), data=cifar_mini)
    with pytest.raises(ValueError, match="label_free_samples must be 0"):
        Run(tiny(method="simclr", label_free_samples=1), data=cifar_mini)
    off = Run(tiny(method="simclr", label_free_samples=0), data=cifar_mini)
    assert off.label_free_data is None and len(off.train_data) == len(cifar_mini[0])
