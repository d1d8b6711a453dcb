"""PBT over trials of one process and of two Ray Train workers (search.train_trial), on a local instance of 2 CPUs.

Both trials train side by side (with two workers: half a CPU each). A trial that PBT clones into is paused and
restarts from the other trial's Tune checkpoint; with two workers, its Train workers must give their CPUs back
(``TrainCleanup``) and its new Train run loads that checkpoint.
The grid's two trials differ in the InfoNCE temperature: at 50 the softmax over similarities is all but uniform
and the loss is log(2N-1) whatever the embeddings, at 0.5 it is lower as soon as the two views of an image are
more alike than two images, which holds for a random network too. So the trial at 50 is the worse one at every
comparison, on any machine, and PBT clones the other's config and checkpoint into it at least once, whichever
trial reports first. PBT then perturbs the learning rate, the space's one continuous dimension.

A population that does not fit at once is refused: PBT could not compare its trials (``search.run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.drivers import Driver

SPACE = """\
name: pbt
metric: ssl_loss
mode: min
budget: {{epochs: {epochs}, grace_period: 1}}
fixed: {{method: simclr, encoder: resnet18, width: 0.0625, batch_size: 32, train_limit: {images}, test_limit: 32,
        device: cpu, workers_per_trial: {workers}, proj_dim: 16, proj_hidden: 32, similarity: cosine, seed: 0}}
params:
  temperature: {{choice: [0.5, 50.0]}}
  lr: {{uniform: [1.0e-3, 2.0e-3]}}
"""


# PBT's async mode clones a trial's checkpoint of a perturbation at which that trial ranked in the upper quantile,
# so the two trials' reports must interleave: a trial of one process gets epochs of about a second (16 steps) and
# one more of them, far above the start-up skew of two actors; two workers' Train runs start far apart but pause.
@pytest.mark.parametrize(("workers", "images", "epochs"), [(1, 512, 4), (2, 64, 3)])
def test_pbt_pauses_and_clones_trials(tmp_path: Path, workers: int, images: int, epochs: int) -> None:
    from mlflow import MlflowClient

    from search.models import ENCODER_DIR, has_model

    space = tmp_path / "pbt.yaml"
    space.write_text(SPACE.format(workers=workers, images=images, epochs=epochs))
    folder = tmp_path / "runs" / "pbt"
    driver = Driver(["run", str(space), "--searcher", "grid", "--scheduler", "pbt", "--storage", str(tmp_path / "runs"),
                     "--name", "pbt", "--num-cpus", "2", "--cpus-per-trial", str(1 / workers)],
                    tmp_path / "run.log")  # fmt: skip
    try:
        code = driver.wait(900)
    finally:
        driver.stop()
    text = driver.text()
    assert code == 0, text[-3000:]

    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert sorted((r["status"], r["epochs"]) for r in rows) == [("finished", epochs)] * 2, rows
    # PBT's own record of each exploit: [target tag, clone tag, their epochs, the clone's config, the new config]
    exploits = [json.loads(line) for line in (folder / "pbt_global.txt").read_text().splitlines()]
    assert exploits, "PBT cloned no trial"
    for _target, _clone, _epoch, _clone_epoch, clone, new in exploits:
        assert clone["temperature"] == new["temperature"] == 0.5  # the better trial cloned, its temperature kept
        assert new["lr"] != clone["lr"] and 1.0e-3 <= new["lr"] <= 2.0e-3  # its learning rate explored, in bounds
    # With two workers, a trial restarted from a Tune checkpoint (a clone, an unpause) ran a Train run of its own,
    # whose workers loaded that checkpoint: they went on from its epoch, never from epoch 1 again. Tune holds every
    # trial's checkpoints.
    trials = [p for p in folder.iterdir() if p.name.startswith("csl_trial_")]
    if workers > 1:
        saved = folder.glob("csl_trial_*/train-*/checkpoint_*/csl_result.json")
        restarted = [json.loads(f.read_text())["epoch"] for f in saved]
        assert restarted and min(restarted) >= 2, restarted
    for trial in trials:
        assert list(trial.glob("checkpoint_*/state.pt")), f"{trial.name}: Tune holds no checkpoint of it"

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pbt")
    kids = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(kids) == 2
    for kid in kids:
        assert kid.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "ssl_loss")]
        assert sorted(steps) == list(range(1, epochs + 1)), steps  # every epoch on record, once
        assert client.list_artifacts(kid.info.run_id, ENCODER_DIR)  # its best epoch's model, from Tune's checkpoints
    assert sum(has_model(client, kid.info.run_id) for kid in kids) == 1  # the best trial's, as an MLflow model


def test_pbt_refuses_a_population_of_multi_worker_trials_that_does_not_fit_at_once(tmp_path: Path) -> None:
    space = tmp_path / "pbt.yaml"
    space.write_text(SPACE.format(workers=2, images=64, epochs=3))
    driver = Driver(["run", str(space), "--searcher", "grid", "--scheduler", "pbt", "--storage",
                     str(tmp_path / "runs"), "--name", "pbt", "--num-cpus", "2"], tmp_path / "run.log")  # fmt: skip
    try:
        code = driver.wait(300)
    finally:
        driver.stop()
    lines = [line for line in driver.text().splitlines() if line.strip()]
    assert code == 2, lines
    assert lines[-1].startswith("csl-search: error: --scheduler pbt ") and "(it holds 1)" in lines[-1], lines
    assert "Traceback" not in driver.text()
