"""The best checkpoint and the best model: kept by Tune, logged to MLflow, registered, exported, and kept by
``csl train --checkpoint``.

Best ≠ last by construction: kNN with a temperature of 10^6 over the whole bank (``knn_k`` above its size) weighs
every neighbour alike, so it predicts the bank's majority class whatever the features are, and the bank (the first
121 training images, none held out) has exactly one class with 13 images against 12 for the others. knn_acc is
therefore the same at every epoch of every trial: every epoch ties, the earliest (epoch 1) is the best by
``search.best``, the last is epoch 3, and Tune's own rule (a later equal score wins) would keep the wrong one. The
weights still change from epoch to epoch, so the best epoch's embedding differs from the last one's.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import cifar_mini, table_with, tiny, transcribed_best, transcribed_order  # noqa: F401 (fixture)

CONSTANT_KNN = {"train_limit": 121, "label_free_samples": 0, "test_limit": 64, "knn_k": 100000,
                "knn_temperature": 1.0e6}  # fmt: skip
SPACE = """\
name: t_model
metric: knn_acc
mode: max
budget: {epochs: 3}
fixed:
  method: simclr
  encoder: resnet18
  width: 0.0625
  proj_dim: 16
  proj_hidden: 32
  batch_size: 32
  train_limit: 121
  label_free_samples: 0
  test_limit: 64
  knn_k: 100000
  knn_temperature: 1.0e+6
  seed: 0
  device: cpu
params:
  lr: {choice: [1.0e-3, 3.0e-3]}
"""
REGISTERED = "csl-test-best-encoder"


def fixed_batch(size: int = 6) -> torch.Tensor:
    """Test images as the model takes them: float32 in [0, 1]."""
    from csl.data import load

    return load("cifar10-mini", split="test", limit=size).images.float() / 255


def reference_embedding(folder: Path, images: torch.Tensor) -> torch.Tensor:
    """What kNN evaluation computes from a checkpoint: the trainer rebuilt from its config, its state loaded,
    ``model.representation(pipeline.eval_view(images))`` in float32 (no ``csl.embedder``)."""
    from csl.train import Run

    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    run = Run({**state["config"], "amp": False})
    run.load(folder)
    run.model.eval()
    with torch.no_grad():
        return run.model.representation(run.pipeline.eval_view(images)).float()


# ------------------------------------------------------------------------------------------------ Tune's kept best


@pytest.mark.parametrize("mode", ["max", "min"])
def test_tune_keeps_the_best_epoch_by_search_best_and_the_latest(mode: str, tmp_path: Path) -> None:
    """Ray's own checkpoint manager, fed the trainable's scored results (NaN epochs, ties), keeps on disk exactly
    the transcribed rule's best epoch and the latest one."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from csl.best import NONE
    from search.trainable import SCORE, scored

    rng = random.Random(mode)
    for case in range(40):
        manager = _CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                      checkpoint_score_order="max"))  # fmt: skip
        history, best, folders = {}, NONE, {}
        for epoch in range(1, rng.randint(1, 7) + 1):
            value = rng.choice([0.1, 0.2, 0.3, 0.3, math.nan])
            history[epoch] = value
            result = {"epoch": epoch, "knn_acc": value}
            best = scored(result, best, "knn_acc", mode)
            folder = tmp_path / f"c{case}_{mode}" / f"checkpoint_{epoch:06d}"
            folder.mkdir(parents=True)
            folders[epoch] = folder
            manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(folder)), result))
        kept = sorted(e for e, f in folders.items() if f.exists())
        expected = transcribed_best(history, mode)
        last = max(history)
        assert manager.latest_checkpoint_result.metrics["epoch"] == last
        if expected is None:
            assert kept == [last]
            continue
        assert manager.best_checkpoint_result.metrics["epoch"] == expected[0], history
        assert kept == sorted({expected[0], last}), history


# ------------------------------------------------------------------------------------------------ the embedder


@pytest.mark.parametrize("method", ["simclr", "cpc_v2"])
def test_the_embedder_is_what_knn_evaluation_reads(method: str, tmp_path: Path, cifar_mini) -> None:
    from csl import embedder
    from csl.evaluate import extract_features
    from csl.train import Run

    run = Run(tiny(method=method, amp=False), data=cifar_mini)
    run.train_epoch()
    features, _ = extract_features(run.model, run.pipeline, cifar_mini[1], batch_size=32, device=run.device,
                                   autocast=False)  # fmt: skip
    images = cifar_mini[1].images.float() / 255
    run.save(tmp_path / "ckpt")
    built, description = embedder.from_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(built(images), features, rtol=1e-4, atol=1e-5)
        reloaded = embedder.load(embedder.save(built, description, tmp_path / "plain"))
        torch.testing.assert_close(reloaded(images), features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(cifar_mini[1].images[:4]), features[:4], rtol=1e-4, atol=1e-5)  # uint8
    assert set(torch.load(tmp_path / "plain" / "encoder.pt", weights_only=True)) == set(built.state_dict())


def test_csl_train_checkpoint_keeps_the_best_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from csl.cli import main
    args = ["--encoder", "resnet18", "--width", "0.0625", "--batch_size", "32", "--proj_hidden", "32", "--proj_dim",
            "16", "--warmup_epochs", "0"]
    knn = [x for k, v in CONSTANT_KNN.items() for x in (f"--{k}", str(v))]
    assert main(["train", "--method", "simclr", "--checkpoint", str(tmp_path / "c"), "--epochs", "3", *args,
                 *knn]) == 0  # fmt: skip
    out = capsys.readouterr().out
    values = [float(line.split("knn_acc=")[1].split()[0]) for line in out.splitlines() if line.startswith("epoch ")]
    assert len(values) == 3 and len(set(values)) == 1  # every epoch ties: the earliest is the best
    latest = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    kept = torch.load(tmp_path / "c" / "best" / "state.pt", weights_only=True)
    assert (latest["epoch"], kept["epoch"]) == (3, 1)
    assert json.loads((tmp_path / "c" / "best" / "best.json").read_text())["epoch"] == 1
    assert "best epoch 1 (knn_acc" in out


# ------------------------------------------------------------------------------------------------ a search


def csl_search(*args: str) -> tuple[int, str]:
    from search.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def model_search(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("model")
    space = folder / "t_model.yaml"
    space.write_text(SPACE)
    MlflowClient(mlflow_server).search_experiments(max_results=1)  # a cold server's first answer can be slow
    code, out = csl_search("run", str(space), "--searcher", "grid", "--scheduler", "fifo", "--storage",
                           str(folder / "runs"), "--name", "model", "--mlflow-uri", mlflow_server, "--experiment",
                           "csl-test-model", "--num-cpus", "2", "--quiet", "--register-model", REGISTERED)
    assert code == 0, out
    path = folder / "runs" / "model"
    client = MlflowClient(mlflow_server)
    parent = client.get_run(json.loads((path / "csl_search.json").read_text())["parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {"out": out, "path": path, "client": client, "parent": parent, "kids": kids, "uri": mlflow_server,
            "folder": folder}  # fmt: skip


def checkpoints(trial_folder: Path) -> dict[int, Path]:
    """epoch -> checkpoint folder, as the trial folder holds them."""
    return {json.loads((c / "csl_result.json").read_text())["epoch"]: c for c in trial_folder.glob("checkpoint_*")}


def test_each_trial_keeps_its_best_and_latest_checkpoint_and_logs_the_best_model(model_search: dict[str, Any]
                                                                                  ) -> None:  # fmt: skip
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from ray.tune import ExperimentAnalysis

    import csl.embedder
    from search.models import has_model

    from search.trainable import SCORE

    images = fixed_batch()
    analysis = ExperimentAnalysis(str(model_search["path"]))
    rows = {r["trial_id"]: r for r in pq.read_table(model_search["path"] / "results.parquet").to_pylist()}
    for kid in model_search["kids"]:
        trial_id = kid.data.tags["csl.trial_id"]
        history = {m.step: m.value for m in model_search["client"].get_metric_history(kid.info.run_id, "knn_acc")}
        assert len(history) == 3 and len(set(history.values())) == 1  # the construction: every epoch ties
        assert transcribed_best(history, "max")[0] == 1 == rows[trial_id]["best_epoch"]
        kept = checkpoints(model_search["path"] / f"csl_trial_{trial_id}")
        assert sorted(kept) == [1, 3]  # the best and the latest, nothing else
        trial = next(t for t in analysis.trials if t.trial_id == trial_id)
        best = analysis.get_best_checkpoint(trial, metric=SCORE, mode="max")
        assert Path(best.path) == kept[1]
        assert kid.data.tags["csl.model_epoch"] == "1"
        best_trial = trial_id == model_search["parent"].data.tags["csl.best_trial"]
        with _use_tracking_uri(model_search["uri"]), torch.no_grad():
            models = [csl.embedder.load(f"runs:/{kid.info.run_id}/encoder")]  # every trial: the plain form
            if best_trial:  # the search's best trial: an MLflow model too
                models.append(mlflow.pytorch.load_model(f"runs:/{kid.info.run_id}/model"))
            for model in models:
                logged = model(images)
                torch.testing.assert_close(logged, reference_embedding(kept[1], images), rtol=1e-4, atol=1e-5)
                assert not torch.allclose(logged, reference_embedding(kept[3], images), atol=1e-4)  # not the last
        assert has_model(model_search["client"], kid.info.run_id) == best_trial


def test_every_command_names_the_same_best_trial_and_the_parent_holds_its_model(model_search: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from tests.test_report import printed_table

    client, parent_id = model_search["client"], model_search["parent"].info.run_id
    curves = {k.data.tags["csl.trial_id"]: {m.step: m.value for m in client.get_metric_history(k.info.run_id,
                                                                                             "knn_acc")}
              for k in model_search["kids"]}  # fmt: skip
    expected = transcribed_order(curves, "max")
    first = expected[0]
    assert [row[1] for row in printed_table(model_search["out"], "ranked by best knn_acc (max):")] == expected
    parent = client.get_run(parent_id)
    assert parent.data.tags["csl.best_trial"] == first and parent.data.tags["csl.best_epoch"] == "1"
    code, out = csl_search("compare", "--mlflow-uri", model_search["uri"], "--parent-run", parent_id)
    assert code == 0 and [row[1] for row in printed_table(out, "top 2 configurations:")] == expected
    report = (model_search["path"] / "report" / "report.md").read_text()
    assert [r["trial"] for r in table_with(report, "rank", "trial")] == expected
    assert f"Best trial: **{first}**" in report

    # the parent's model is the best trial's best epoch, and it is a registered version
    best_run = parent.data.tags["csl.best_run_id"]
    folder = model_search["path"] / f"csl_trial_{first}"
    images = fixed_batch()
    expected_embedding = reference_embedding(checkpoints(folder)[1], images)
    with _use_tracking_uri(model_search["uri"]), torch.no_grad():
        torch.testing.assert_close(mlflow.pytorch.load_model(f"runs:/{parent_id}/model")(images), expected_embedding,
                                   rtol=1e-4, atol=1e-5)
        versions = client.search_model_versions(f"name = '{REGISTERED}'")
        assert [v.run_id for v in versions] == [parent_id]
        registered = mlflow.pytorch.load_model(f"models:/{REGISTERED}/{versions[0].version}")
        torch.testing.assert_close(registered(images), expected_embedding, rtol=1e-4, atol=1e-5)
    assert f"registered as {REGISTERED} version {versions[0].version}" in model_search["out"]
    assert best_run == next(k.info.run_id for k in model_search["kids"] if k.data.tags["csl.trial_id"] == first)

    # export: from the experiment folder and from the parent run, the same encoder as a plain state_dict
    from csl.embedder import load

    for target, out_dir in ((str(model_search["path"]), tmp_path / "from_dir"), (parent_id, tmp_path / "from_run")):
        code, out = csl_search("export", target, "--out", str(out_dir), "--mlflow-uri", model_search["uri"])
        assert code == 0, out
        assert "encoder.pt" in out and "csl.embedder.load(" in out and len(out.strip().splitlines()) == 1
        config = json.loads((out_dir / "config.json").read_text())
        best_lr = client.get_run(best_run).data.params["lr"]
        assert config["epoch"] == 1 and str(config["config"]["lr"]) == best_lr
        with torch.no_grad():
            torch.testing.assert_close(load(out_dir)(images), expected_embedding, rtol=1e-4, atol=1e-5)


def test_export_of_something_else_is_one_line_and_exit_2(model_search: dict[str, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    (tmp_path / "plain").mkdir()
    assert main(["export", str(tmp_path / "plain"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("csl-search: error: RUN_OR_DIR") and "no csl_search.json" in err and "\n" not in err
    assert main(["export", "0123456789abcdef", "--out", str(tmp_path / "o"), "--mlflow-uri", model_search["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither an experiment folder nor an MLflow run" in err and "\n" not in err
