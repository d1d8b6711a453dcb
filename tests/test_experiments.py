"""The three robustness studies end to end at ``--scale smoke`` (real training, Ray Tune, a local SQLite MLflow
store), and their reports checked against the MLflow runs they came from, read here independently with
``MlflowClient`` (each run's latest ``knn_acc`` as MLflow stores it, its params, its tags).

One Ray instance (2 CPUs) serves the module; the three studies take a few minutes together on 2 cores.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import local_ray, search_env
from tests.helpers import table_with

pytestmark = pytest.mark.slow

TOL = 6e-5  # the report prints 4 decimals
PNG = b"\x89PNG\r\n\x1a\n"
METHODS = ["amdim", "byol", "cpc_v2", "moco_v2", "simclr", "yadim"]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    """Storage folder, SQLite tracking URI and one shared local Ray instance for the module."""
    storage = tmp_path_factory.mktemp("studies")
    with local_ray():
        yield {"storage": storage, "uri": f"sqlite:///{storage / 'mlflow.db'}", "timings": {}}


def run_study(module: Any, name: str, store: dict[str, Any]) -> dict[str, Any]:
    from mlflow import MlflowClient

    started = time.time()
    code = module.main(["--scale", "smoke", "--storage", str(store["storage"]), "--mlflow-uri", store["uri"],
                        "--name", name, "--resamples", "2000"])
    store["timings"][name] = time.time() - started
    print(f"{name}: {store['timings'][name]:.0f} s")
    assert code == 0
    client = MlflowClient(tracking_uri=store["uri"])
    (study,) = client.search_runs([client.get_experiment_by_name(module.STUDY).experiment_id],
                                  filter_string=f"attributes.run_name = '{name}'")
    assert study.data.tags["csl.study"] == module.STUDY
    assert study.info.status == "FINISHED"
    folder = Path(study.data.tags["csl.study_folder"])
    report = folder / "report" / "report.md"
    assert report.exists()
    stages = {r.data.tags["csl.stage"]: r for r in client.search_runs(
        [study.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study.info.run_id}'")}
    trials = {stage: client.search_runs([study.info.experiment_id],
                                        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                                        max_results=5000)
              for stage, run in stages.items()}
    logged = {Path(a.path).name for a in client.list_artifacts(study.info.run_id, "report")}
    return {"client": client, "study": study, "folder": folder, "report": report.read_text(), "stages": stages,
            "trials": trials, "logged": logged}


# ------------------------------------------------------------------------------------------------ parsing


def interval(text: str) -> tuple[float, float]:
    low, high = text.strip("[]").split(", ")
    return float(low), float(high)


# ------------------------------------------------------------------------------------------------ independent numbers


def final_values(runs: list[Any], keys: list[str]) -> dict[tuple, list[float]]:
    """Cell (params ``keys``) -> the last-epoch knn_acc of each finished run, as MLflow stores it."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        assert run.data.tags["csl.status"] == "finished", run.data.tags
        cells[tuple(run.data.params[k] for k in keys)].append(run.data.metrics["knn_acc"])
    return cells


def check_cells(report: str, cells: dict[tuple, list[float]], header: list[str], rename=lambda v: v) -> None:
    rows = table_with(report, *header, "seeds", "mean")
    shown = {tuple(r[h] for h in header): r for r in rows}
    expected = {tuple(rename(v) if i == 0 else v for i, v in enumerate(key)): vals for key, vals in cells.items()}
    assert set(shown) == set(expected)
    for key, values in expected.items():
        assert int(shown[key]["seeds"]) == len(values) == 2
        assert float(shown[key]["mean"]) == pytest.approx(np.mean(values), abs=TOL)
        low, high = interval(shown[key]["95% CI"])
        assert min(values) - TOL <= low <= np.mean(values) + TOL  # a bootstrap of 2 seeds spans [min, max]
        assert np.mean(values) - TOL <= high <= max(values) + TOL


def check_ranking(report: str, cells: dict[tuple, list[float]], first: str, rename=lambda v: v) -> None:
    """worst / mean / spread of each combination over its conditions, and the order and the verdict."""
    per: dict[str, list[float]] = defaultdict(list)
    for key, values in cells.items():
        per[rename(key[0])].append(float(np.mean(values)))
    rows = table_with(report, "rank", first, "worst")
    assert {r[first] for r in rows} == set(per)
    for row in rows:
        means = per[row[first]]
        assert float(row["worst"]) == pytest.approx(min(means), abs=TOL)
        assert float(row["mean"]) == pytest.approx(np.mean(means), abs=TOL)
        assert float(row["spread"]) == pytest.approx(max(means) - min(means), abs=TOL)
        assert int(row["conditions"]) == len(means)
    worst = [float(r["worst"]) for r in rows]
    assert worst == sorted(worst, reverse=True)
    leader, runner = rows[0], rows[1]
    separated = interval(leader["worst 95% CI"])[0] > interval(runner["worst 95% CI"])[1]
    if separated and min(int(leader["min seeds"]), int(runner["min seeds"])) >= 3:
        assert f"winner: **{leader[first]}**" in report
    else:  # smoke runs 2 seeds: never enough to declare a winner
        assert not re.search(r"(?<!no )winner: \*\*", report)
        assert "no winner" in report and f"**{leader[first]}**" in report


def check_spearman(report: str, runs: list[Any], client: Any, grace: int = 1) -> None:
    from scipy.stats import spearmanr

    early, final = [], []
    for run in runs:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "knn_acc")}
        if max(history) > grace:
            early.append(history[grace])
            final.append(history[max(history)])
    match = re.search(r"rho = (-?[0-9.]+) over (\d+) trials", report)
    assert match, "the report prints the early-stopping rank correlation"
    assert int(match.group(2)) == len(early)
    assert float(match.group(1)) == pytest.approx(spearmanr(early, final).statistic, abs=6e-4)


def check_files(result: dict[str, Any], names: list[str]) -> None:
    folder = result["folder"] / "report"
    for name in ["report.md", *names]:
        path = folder / name
        assert path.exists() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG
            assert f"]({name})" in result["report"]
        assert name in result["logged"], f"{name} not logged to the study run"


# ------------------------------------------------------------------------------------------------ the studies


def test_encoder_robustness_smoke(store):
    from experiments import encoder_robustness

    result = run_study(encoder_robustness, "enc", store)
    (runs,) = result["trials"].values()
    assert len(runs) == 6 * 2 * 2  # methods × encoders × seeds, nothing refused
    cells = final_values(runs, ["method", "encoder"])
    assert {k[1] for k in cells} == {"resnet18", "amdim"}
    check_cells(result["report"], cells, ["method", "encoder"])
    check_ranking(result["report"], cells, "method")
    check_spearman(result["report"], runs, result["client"])
    check_files(result, ["grid_heatmap_encoder.png", "grid_robustness.png", "grid_marginals.png",
                         "grid_early_stopping.png"])
    assert "Ranked by the **worst case**" in result["report"]


def test_extraction_robustness_smoke(store):
    from experiments import extraction_robustness

    result = run_study(extraction_robustness, "ext", store)
    (runs,) = result["trials"].values()
    launched = {(r.data.params["method"], r.data.params["extract"]) for r in runs}
    assert ("cpc_v2", "multiscale") not in launched  # refused before launch ...
    assert len(launched) == 6 * 4 - 1 and len(runs) == 2 * len(launched)
    report = result["report"]
    na = table_with(report, "method", "extract", "reason")  # ... and listed as not applicable, with the reason
    assert [(r["method"], r["extract"]) for r in na] == [("cpc_v2", "multiscale")]
    assert "scale 7" in na[0]["reason"] and "intermediate feature map" in na[0]["reason"]
    cells = final_values(runs, ["method", "extract"])
    check_cells(report, cells, ["method", "extract"])
    check_ranking(report, cells, "method")
    rows = {r["method"]: r for r in table_with(report, "rank", "method", "worst")}
    assert rows["cpc_v2"]["missing"] == "—" and int(rows["cpc_v2"]["conditions"]) == 3
    check_spearman(report, runs, result["client"])
    check_files(result, ["grid_heatmap_extract.png", "grid_robustness.png", "grid_marginals.png"])


def test_rediscover_yadim_smoke(store):
    from experiments import rediscover_yadim

    result = run_study(rediscover_yadim, "red", store)
    assert set(result["stages"]) == {"a", "b"}
    stage_a, stage_b = result["trials"]["a"], result["trials"]["b"]
    # (a): ASHA + Optuna over paper.yaml on one encoder
    parent_a = result["stages"]["a"].data.params
    assert parent_a["scheduler"] == "asha" and parent_a["searcher"] == "optuna"
    assert 1 <= len(stage_a) <= 6
    assert {r.data.params["encoder"] for r in stage_a} == {"resnet18"}
    assert len({r.data.params["loss"] for r in stage_a} | {r.data.params["augment"] for r in stage_a}) > 1
    # (b): the six presets and the found combinations, on every encoder × extraction × seed that can build
    variants = {r.data.params["variant"] for r in stage_b}
    presets = {"base", "amdim", "cpc_v2", "simclr", "byol", "moco_v2"}
    found = variants - presets
    assert presets <= variants and 1 <= len(found) <= 2 and all(v.startswith("found") for v in found)
    assert {r.data.params["method"] for r in stage_b if r.data.params["variant"] in found} == {"None"}
    for r in stage_b:
        assert r.data.params["encoder"] in ("resnet18", "amdim")
        assert r.data.params["extract"] in ("last_vector", "last_map")
    report = result["report"]
    label = {"base": "yadim"}
    rename = lambda v: label.get(v, v)  # noqa: E731
    cells = final_values(stage_b, ["variant", "encoder", "extract"])
    check_cells(report, cells, ["combination", "encoder", "extract"], rename)
    check_ranking(report, cells, "combination", rename)
    # the winner (or leader) against YADIM's published choices, aspect by aspect
    yadim = table_with(report, "aspect")
    assert [r["aspect"] for r in yadim] == ["augment", "encoder", "extract", "similarity", "loss"]
    published = {r["aspect"]: r["YADIM (published)"] for r in yadim}
    assert published == {"augment": "yadim", "encoder": "wide_resnet", "extract": "last_map", "similarity": "dot",
                         "loss": "amdim_nce"}
    leader = table_with(report, "rank", "combination", "worst")[0]["combination"]
    leader_runs = [r for r in stage_b if rename(r.data.params["variant"]) == leader]
    for row in yadim:
        assert row["agree"] == ("yes" if row[leader] == row["YADIM (published)"] else "no")
        if row["aspect"] in ("augment", "similarity", "loss"):
            assert row[leader] == leader_runs[0].data.params[row["aspect"]]
    assert "Agrees with YADIM on" in report
    assert report.count("Spearman rank correlation") + report.count("not measurable") >= 2  # both stages
    check_spearman(report.split("## Stage (b)")[1], stage_b, result["client"])
    check_files(result, ["a_marginals.png", "b_heatmap_encoder.png", "b_heatmap_extract.png", "b_robustness.png",
                         "b_marginals.png"])


def test_report_cli_on_a_plain_search_and_on_a_bad_target(store, tmp_path, capsys):
    from mlflow import MlflowClient

    from experiments.report.cli import main

    client = MlflowClient(tracking_uri=store["uri"])
    experiment = client.get_experiment_by_name("rediscover_yadim")
    if experiment is None:
        pytest.skip("needs the rediscover study of this module")
    (search,) = client.search_runs([experiment.experiment_id], filter_string="tags.`csl.stage` = 'a'")
    assert main([search.info.run_id, "--mlflow-uri", store["uri"], "--out", str(tmp_path), "--no-log",
                 "--resamples", "500"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "Top" in text and "trials" in text
    assert main(["no-such-experiment-or-run", "--mlflow-uri", store["uri"], "--no-log"]) == 2
    assert "neither a run id nor an experiment name" in capsys.readouterr().err
    assert math.isfinite(sum(store["timings"].values()))


def test_csl_search_report_hands_a_study_run_to_its_entry_point(store, tmp_path, monkeypatch):
    """``csl-search report <study run>`` through the entry point ``pyproject.toml`` declares (its metadata built by
    setuptools, as ``pip install -e .`` would, onto the child's path); without the plugin, one clear error."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient
    from setuptools import build_meta

    from search.report.build import write_report
    from search.report.mlflow_io import ReportError
    from tests.conftest import REPO

    client = MlflowClient(tracking_uri=store["uri"])
    experiment = client.get_experiment_by_name("encoder_robustness")
    if experiment is None:
        pytest.skip("needs the encoder study of this module")
    (study,) = client.search_runs([experiment.experiment_id], filter_string="tags.`csl.study` LIKE '%'")
    with pytest.raises(ReportError, match="python -m experiments.report"):
        write_report(store["uri"], study.info.run_id, tmp_path / "none", reporters={})
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    monkeypatch.chdir(REPO)  # setuptools reads pyproject.toml from the working folder
    build_meta.prepare_metadata_for_build_wheel(str(metadata))
    env = search_env()
    env["PYTHONPATH"] = os.pathsep.join([str(metadata), env["PYTHONPATH"]])
    out = subprocess.run([sys.executable, "-m", "search", "report", "encoder_robustness", "--mlflow-uri", store["uri"],
                          "--out", str(tmp_path / "out"), "--no-log", "--resamples", "200"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "# Robustness to the choice of encoder" in report and "Ranked by the **worst case**" in report


@pytest.mark.parametrize("scale_name", ["smoke", "cifar", "paper"])
def test_every_scale_generates_spaces_that_load(scale_name, tmp_path):
    """No training: the generated space files of every scale load, and the refused cells are found by probing."""
    import yaml

    from experiments import encoder_robustness, extraction_robustness, rediscover_yadim
    from experiments.common import SCALES
    from search.space import load_space

    scale = SCALES[scale_name]
    path, refused = encoder_robustness.write_grid(scale, tmp_path / "enc")
    space = load_space(path)
    assert len(space.grid()) == 6 * len(scale.encoders) * len(scale.seeds) - len(refused) * len(scale.seeds)
    path, refused = extraction_robustness.write_grid(scale, tmp_path / "ext")
    assert ("cpc_v2", "multiscale") in {(r["cell"]["method"], r["cell"]["extract"]) for r in refused}
    assert len(load_space(path).grid()) == (6 * 4 - len(refused)) * len(scale.seeds)
    source = yaml.safe_load(rediscover_yadim.PAPER_SPACE.read_text())
    space_a = load_space(rediscover_yadim.write_stage_a(scale, source, tmp_path / "red"))
    assert "encoder" not in space_a.dimensions and space_a.fixed["encoder"] == scale.search_encoder
    assert {"augment", "extract", "similarity", "loss", "lr", "temperature"} <= set(space_a.dimensions)
    found = [{"trial_id": "t1", "status": "finished", "value": 0.5,
              "config": {**space_a.fixed, "augment": "cpc", "extract": "last_map", "similarity": "dot",
                         "loss": "infonce", "lr": 1e-3, "temperature": 0.5}}]
    path_b, refused_b, labels, _ = rediscover_yadim.write_stage_b(scale, found, tmp_path / "red")
    space_b = load_space(path_b)
    assert set(labels) == {"base", "amdim", "cpc_v2", "simclr", "byol", "moco_v2", "found1"}
    if "multiscale" in scale.extractions:  # CPC's patch grid cannot take multiscale's 1:7 comparison
        assert {(r["cell"]["variant"], r["cell"]["extract"]) for r in refused_b} >= {("cpc_v2", "multiscale"),
                                                                                    ("found1", "multiscale")}
    cells = len(labels) * len(scale.encoders) * len(scale.extractions)
    assert len(space_b.grid()) == (cells - len(refused_b)) * len(scale.seeds)


def test_top_combinations_are_distinct_and_prefer_finished_trials():
    from types import SimpleNamespace

    from experiments.rediscover_yadim import top_combinations

    space = SimpleNamespace(fixed={"encoder": "resnet18", "seed": 0},
                            dimensions={"augment": 0, "extract": 0, "similarity": 0, "loss": 0, "lr": 0})

    def row(trial, status, value, augment="simclr", similarity="cosine", loss="infonce", lr=1e-3):
        return {"trial_id": trial, "status": status, "last_knn_acc": value, "augment": augment,
                "extract": "last_vector", "similarity": similarity, "loss": loss, "lr": lr, "epochs": 2}

    rows = [
        row("stopped-best", "stopped", 0.9, augment="amdim"),  # stopped early: only fills up
        row("a", "finished", 0.5),
        row("a-again", "finished", 0.45, lr=3e-3),  # same augment × similarity × loss as "a": skipped
        row("b", "finished", 0.4, loss="triplet"),
        row("diverged", "diverged", float("nan"), augment="byol"),
    ]
    top = top_combinations(rows, space, 2)
    assert [t["trial_id"] for t in top] == ["a", "b"]
    assert top[0]["config"] == {"encoder": "resnet18", "seed": 0, "augment": "simclr", "extract": "last_vector",
                                "similarity": "cosine", "loss": "infonce", "lr": 1e-3}
    assert [t["trial_id"] for t in top_combinations(rows, space, 3)] == ["a", "b", "stopped-best"]
