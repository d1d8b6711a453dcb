"""Unlabelled data end to end: the data forms that have no labels, a run on them (label-free metrics, no kNN),
a separate labelled evaluation set, a search ranked by RankMe under ASHA, and the validator's refusal of a label
metric on unlabelled data.

The unlabelled folder is made here: 40 random 32×32 PNGs directly under one folder (no class subfolders).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from csl.data import DataNotFoundError, has_labels, is_labelled, load
from csl.evaluate import extract_features, knn_accuracy
from csl.metrics import LABEL_FREE, check_metric
from csl.registry import ChoiceError
from csl.train import Run

from tests.conftest import REPO, search_env
from tests.helpers import tiny

LABEL_METRICS = ("knn_acc", "probe_acc")


def save_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flat")
    save_images(folder, 40)
    return folder


def test_a_folder_without_subfolders_is_unlabelled(flat_folder: Path) -> None:
    stream = load(f"imagefolder:{flat_folder}", workers=0, image_size=16)
    assert len(stream) == 40 and stream.classes == [] and stream.num_classes == 0
    assert stream.labels.tolist() == [-1] * 40 and not is_labelled(stream)
    images, labels = next(iter(stream.ordered_batches(8)))
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == [-1] * 8
    assert has_labels(f"imagefolder:{flat_folder}") is False
    few = stream.subset(torch.tensor([0, 5, 7]))
    assert len(few) == 3 and few.indices.tolist() == [0, 5, 7] and few.labels.tolist() == [-1] * 3


def test_nested_folders_that_are_not_classes_with_labels_none(tmp_path: Path) -> None:
    save_images(tmp_path / "site_a" / "2024", 3)
    save_images(tmp_path / "site_b", 2, seed=1)
    (tmp_path / "site_b" / "notes.txt").write_text("not an image")
    as_classes = load(f"imagefolder:{tmp_path}", workers=0)
    assert as_classes.classes == ["site_a", "site_b"] and as_classes.labels.tolist() == [0, 0, 0, 1, 1]
    unlabelled = load(f"imagefolder:{tmp_path}", workers=0, labels="none")
    assert len(unlabelled) == 5 and unlabelled.classes == [] and unlabelled.labels.tolist() == [-1] * 5
    assert has_labels(f"imagefolder:{tmp_path}") is True
    assert has_labels(f"imagefolder:{tmp_path}", labels="none") is False
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images in .*empty"):
        load(f"imagefolder:{empty}", labels="none")


def test_parquet_without_labels_and_labels_none(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(encoded, pa.binary())}), tmp_path / "train.parquet")
    data = load(f"parquet:{tmp_path}")
    assert data.labels.tolist() == [-1] * 6 and data.classes == [] and not is_labelled(data)
    assert has_labels(f"parquet:{tmp_path}") is False
    mini = load("cifar10-mini", limit=20, labels="none")
    assert mini.labels.tolist() == [-1] * 20 and mini.classes == [] and len(mini) == 20
    assert has_labels("cifar10-mini") is True and has_labels("cifar10-mini", labels="none") is False
    assert has_labels("parquet:/nonexistent/csl-test") is None  # cannot tell: loading it will say why
    with pytest.raises(ValueError, match="unknown labels 'no'"):
        load("cifar10-mini", labels="no")


def test_stl10_unlabeled_is_its_own_spec(tmp_path: Path) -> None:
    assert has_labels("stl10-unlabeled") is False and has_labels("stl10") is True
    with pytest.raises(DataNotFoundError, match="STL-10 not found"):
        load("stl10-unlabeled", root=str(tmp_path))
    with pytest.raises(ValueError, match="eval_data"):
        load("stl10-unlabeled", split="test", root=str(tmp_path))


# ------------------------------------------------------------------------------------------------------- runs


def unlabelled_config(folder: Path, **overrides: Any) -> dict[str, Any]:
    return tiny(method="simclr", data=f"imagefolder:{folder}", train_limit=None, label_free_samples=8, **overrides)


def test_a_run_on_a_flat_folder_reports_label_free_metrics_and_no_knn(flat_folder: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from csl.cli import main

    config = unlabelled_config(flat_folder)
    method = config.pop("method")
    args = [item for key, value in config.items() for item in (f"--{key}", str(value))]
    assert main(["train", "--method", method, "--linear-epochs", "1", *args]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1")]
    assert len(progress) == 1, captured.out
    assert all(f"{m}=" in progress[0] for m in LABEL_FREE) and "ssl_loss=" in progress[0]
    assert not any(f"{m}=" in captured.out for m in LABEL_METRICS)
    skip = [line for line in captured.err.splitlines() if "not measured" in line]
    assert len(skip) == 1 and "knn_acc" in skip[0] and "has no labels" in skip[0], captured.err
    assert "linear evaluation skipped" in captured.out

    run = Run(unlabelled_config(flat_folder))
    assert run.probe is None and run.test_data is None and run.eval_train is None
    assert len(run.train_data) == 32 and len(run.label_free_data) == 8
    metrics = run.train_epoch() | run.evaluate()
    assert set(LABEL_FREE) <= set(metrics) and not set(LABEL_METRICS) & set(metrics)


def test_eval_data_evaluates_on_the_other_set(flat_folder: Path, tmp_path: Path) -> None:
    run = Run(unlabelled_config(flat_folder, eval_data="cifar10-mini", eval_train_limit=60, test_limit=20))
    assert run.eval_train.name == "cifar10-mini/train" and len(run.eval_train) == 60
    assert run.test_data.name == "cifar10-mini/test" and len(run.test_data) == 20
    assert run.probe is None and "eval_data" in run.unmeasured["probe_acc"]
    metrics = run.evaluate()
    assert "probe_acc" not in metrics and set(LABEL_FREE) <= set(metrics)
    # the kNN figure is the one of cifar10-mini's images (32 px) seen at the folder's training size (96 px)
    assert run.pipeline.image_size == 96 and run.eval_train.images.shape[-1] == 32
    kwargs = {"batch_size": 256, "device": run.device, "autocast": run.autocast}
    bank, bank_labels = extract_features(run.model, run.pipeline, load("cifar10-mini", limit=60), **kwargs)
    query, query_labels = extract_features(run.model, run.pipeline, load("cifar10-mini", split="test", limit=20),
                                           **kwargs)
    assert bank.shape[0] == 60 and query.shape[0] == 20
    assert metrics["knn_acc"] == knn_accuracy(bank, bank_labels, query, query_labels, k=run.config["knn_k"],
                                              temperature=run.config["knn_temperature"], num_classes=10)
    with pytest.raises(ValueError, match=r"eval_data 'imagefolder:.*' has no labels"):
        Run(tiny(method="simclr", eval_data=f"imagefolder:{flat_folder}"))


def test_check_metric_refuses_what_runs_would_not_report(flat_folder: Path) -> None:
    unlabelled = {"data": f"imagefolder:{flat_folder}"}
    with pytest.raises(ChoiceError) as refused:
        check_metric("knn_acc", unlabelled)
    message = str(refused.value)
    assert "\n" not in message and "knn_acc needs labels" in message and all(m in message for m in LABEL_FREE)
    check_metric("rankme", unlabelled)
    check_metric("knn_acc", {**unlabelled, "eval_data": "cifar10-mini"})
    check_metric("knn_acc", {"data": "cifar10-mini"})
    for metric, config, words in [
        ("probe_acc", {**unlabelled, "eval_data": "cifar10-mini"}, "not eval_data's"),
        ("probe_acc", {"data": "cifar10-mini", "probe": False}, "probe is off"),
        ("rankme", {"data": "cifar10-mini", "label_free_samples": 0}, "label_free_samples is 0"),
        ("knn_accc", {}, "unknown metric"),
        ("rankme", {"eval_data": f"imagefolder:{flat_folder}"}, "has no labels"),
    ]:
        with pytest.raises(ChoiceError, match=words):
            check_metric(metric, config)


# ----------------------------------------------------------------------------------------------------- search

SPACE = """\
name: t_rankme
metric: {metric}
mode: max
budget: {{epochs: 2, grace_period: 1, reduction_factor: 2}}
fixed:
  method: simclr
  encoder: resnet18
  width: 0.0625
  proj_dim: 16
  proj_hidden: 32
  batch_size: 16
  label_free_samples: 8
  device: cpu
  data: "imagefolder:{folder}"
params:
  lr: {{choice: [1.0e-3, 3.0e-3]}}
"""


def test_a_label_metric_on_unlabelled_data_is_refused_in_one_line(flat_folder: Path, tmp_path: Path) -> None:
    space = tmp_path / "knn.yaml"
    space.write_text(SPACE.format(metric="knn_acc", folder=flat_folder))
    out = subprocess.run([sys.executable, "-m", "search", "run", str(space), "--storage", str(tmp_path / "runs")],
                         cwd=REPO, env=search_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csl-search: error: "), out.stderr
    assert "knn.yaml: metric: metric knn_acc needs labels" in lines[0] and "rankme" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_search_ranked_by_rankme_runs_under_asha(flat_folder: Path, tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    from search.cli import main

    space = tmp_path / "t_rankme.yaml"
    space.write_text(SPACE.format(metric="rankme", folder=flat_folder))
    code = main(["run", str(space), "--searcher", "grid", "--scheduler", "asha", "--storage", str(tmp_path / "runs"),
                 "--name", "rankme", "--mlflow-uri", mlflow_server, "--experiment", "csl-test-rankme",
                 "--num-cpus", "2", "--quiet"])
    assert code == 0
    folder = tmp_path / "runs" / "rankme"
    history = pq.read_table(folder / "history.parquet").to_pylist()
    assert history and all(1.0 <= row["rankme"] <= 8.0 for row in history)
    assert all(row["uniformity"] <= 0.0 for row in history)
    results = pq.read_table(folder / "results.parquet")
    assert results.schema.metadata[b"csl.metric"] == b"rankme" and results.num_rows == 2
    assert all(r["best_rankme"] is not None for r in results.to_pylist())

    client = MlflowClient(mlflow_server)
    parent = json.loads((folder / "csl_search.json").read_text())["parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    kids = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(kids) == 2
    for kid in kids:
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "rankme")]
        assert steps == list(range(1, int(kid.data.tags["csl.epochs_run"]) + 1))
        assert set(LABEL_FREE) <= set(kid.data.metrics)
        assert not set(LABEL_METRICS) & set(kid.data.metrics)  # absent, not NaN: MLflow never saw them
