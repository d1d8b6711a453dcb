"""The label-free validation study (``experiments.label_free``): its statistics on constructed data with known
answers, and the smoke scale end to end (real training, Ray Tune, a SQLite MLflow store), its report checked
against the trial runs as MLflow holds them, recomputed here with ``scipy.stats.spearmanr`` and by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments.label_free_report import mean_within, random_regret, regret, spearman
from tests.conftest import search_env

PNG = b"\x89PNG\r\n\x1a\n"
ORIENT = {"rankme": 1, "alpha_req": -1, "alpha_req_gap": -1, "alignment": -1, "uniformity": -1}
"""+1 where a higher value is better (csl.metrics), written out here rather than read from the table."""


# ------------------------------------------------------------------------------------------------ the statistics


def test_spearman_matches_scipy_and_its_interval_holds_it():
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = x + rng.normal(scale=0.8, size=12)
    estimate = spearman(x, y, n_resamples=3000)
    assert estimate.value == pytest.approx(stats.spearmanr(x, y).statistic)
    assert estimate.low <= estimate.value <= estimate.high and estimate.n == 12
    flipped = spearman(x, y, sign=-1, n_resamples=3000)
    assert flipped.value == pytest.approx(-estimate.value)
    assert (flipped.low, flipped.high) == pytest.approx((-estimate.high, -estimate.low), abs=0.05)


def test_spearman_of_a_monotone_relation_is_one_in_every_resample():
    x = np.arange(8.0)
    estimate = spearman(x, x ** 3, n_resamples=2000)  # no resample can break a monotone relation
    assert (estimate.value, estimate.low, estimate.high) == pytest.approx((1.0, 1.0, 1.0))


def test_spearman_skips_small_and_non_finite_groups():
    assert math.isnan(spearman([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]).value)  # fewer than 4 trials
    estimate = spearman([1.0, 2.0, np.nan, 3.0, 4.0, 5.0], [2.0, 1.0, 9.0, 3.0, 5.0, 4.0], n_resamples=1000)
    assert estimate.n == 5 and estimate.value == pytest.approx(0.8)  # ranks 2,1,3,5,4 against 1..5: 1 - 6·4/120


def test_mean_within_is_the_mean_of_each_groups_rho():
    a = (np.arange(6.0), np.array([1.0, 0.0, 2.0, 3.0, 5.0, 4.0]))
    b = (np.arange(5.0), np.array([4.0, 3.0, 2.0, 1.0, 0.0]))
    estimate = mean_within([a, b, (np.arange(2.0), np.arange(2.0))], n_resamples=2000)  # the pair is too small
    expected = (stats.spearmanr(*a).statistic + stats.spearmanr(*b).statistic) / 2
    assert estimate.value == pytest.approx(expected) and estimate.n == 11
    assert estimate.low <= estimate.value <= estimate.high


def test_regret_by_hand():
    metric = np.array([0.2, 0.9, 0.5, 0.1])
    knn = np.array([0.40, 0.31, 0.45, 0.20])
    high, pick = regret(metric, knn, mode="max", n_resamples=2000)
    assert pick == 1 and high.value == pytest.approx(100 * (0.45 - 0.31))
    assert 0.0 <= high.low <= high.high <= 100 * (0.45 - 0.20) + 1e-9
    low, pick = regret(metric, knn, mode="min", n_resamples=2000)
    assert pick == 3 and low.value == pytest.approx(25.0)
    perfect, _ = regret(knn, knn, mode="max", n_resamples=500)
    assert (perfect.value, perfect.low, perfect.high) == (0.0, 0.0, 0.0)
    assert random_regret(knn, n_resamples=500).value == pytest.approx(100 * (0.45 - knn.mean()))


# ------------------------------------------------------------------------------------------------ the study


def _table(markdown: str, first: str) -> dict[str, dict[str, str]]:
    """The first Markdown table under the heading ``first``, as {first cell: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i in range(lines.index(first), len(lines)) if lines[i].startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    header, body = block[0], block[2:]
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


def _value(cell: str) -> float:
    return float(cell.split(" [")[0])


@pytest.mark.slow
def test_label_free_study_smoke(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from experiments import label_free

    for key in ("PYTHONPATH", "RAY_AUTH_MODE"):  # Ray's workers import this checkout
        monkeypatch.setenv(key, search_env()[key])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = label_free.main(["--scale", "smoke", "--storage", str(tmp_path), "--mlflow-uri", uri, "--name", "lf",
                            "--num-cpus", "2", "--resamples", "1000"])
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("label_free").experiment_id
    (study,) = client.search_runs([experiment], filter_string="attributes.run_name = 'lf'")
    assert study.info.status == "FINISHED" and study.data.tags["csl.study"] == "label_free"
    (stage,) = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{study.info.run_id}'")
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{stage.info.run_id}'")
    assert len(runs) == 6 and {r.data.params["method"] for r in runs} == {"simclr", "byol", "moco_v2"}
    assert all(r.data.tags["csl.status"] == "finished" for r in runs)

    folder = Path(study.data.tags["csl.study_folder"])
    markdown = (folder / "report" / "report.md").read_text()
    assert (folder / "report" / "label_free_vs_knn.png").read_bytes()[:8] == PNG
    logged = {Path(a.path).name for a in client.list_artifacts(study.info.run_id, "report")}
    assert {"report.md", "label_free_vs_knn.png", "trials.csv"} <= logged

    knn = np.array([r.data.metrics["knn_acc"] for r in runs])
    rho = _table(markdown, "## Spearman's ρ with final kNN accuracy")
    picks = _table(markdown, "## Selection regret (kNN points)")
    for metric, sign in ORIENT.items():
        values = np.array([r.data.metrics[metric] for r in runs])
        expected = sign * stats.spearmanr(values, knn).statistic
        assert _value(rho[metric]["all trials"]) == pytest.approx(expected, abs=0.006)
        assert study.data.metrics[f"rho_knn_all_{metric}"] == pytest.approx(expected)
        chosen = int(np.argmax(sign * values))  # no ties among six real-valued metrics
        expected_regret = 100 * (knn.max() - knn[chosen])
        assert _value(picks[metric]["all trials: regret"]) == pytest.approx(expected_regret, abs=0.06)
        assert study.data.metrics[f"regret_knn_points_{metric}"] == pytest.approx(expected_regret)
        params = runs[chosen].data.params
        assert picks[metric]["all trials: picks"] == f"{params['method']} lr={float(params['lr']):.3g}"
    assert _value(picks["(random pick: best - mean)"]["all trials: regret"]) == pytest.approx(
        100 * (knn.max() - knn.mean()), abs=0.06)

    # --report writes the same report again from the folder alone (same bootstrap seed), training nothing
    (folder / "report" / "report.md").unlink()
    assert label_free.main(["--report", str(folder), "--resamples", "1000"]) == 0
    assert (folder / "report" / "report.md").read_text() == markdown
