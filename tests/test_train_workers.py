"""A trial of two Ray Train workers (search.train_trial) on a local instance: a killed worker is replaced and the
Train run continues from its last checkpoint; the trial still ends with every planned epoch, each logged once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from tests.drivers import Driver, wait_until

SPACE = """\
name: {name}
metric: ssl_loss
mode: min
budget: {{epochs: 4}}
fixed: {{method: simclr, encoder: resnet18, width: 0.0625, batch_size: 32, train_limit: 256, test_limit: 64,
        device: cpu, workers_per_trial: 2, proj_dim: 16, proj_hidden: 32, similarity: cosine}}
"""


def _train_workers(root: int) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_killed_train_worker_restarts_from_its_checkpoint_and_the_trial_completes(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    space = tmp_path / "workers.yaml"
    space.write_text(SPACE.format(name="killed-worker"))
    folder = tmp_path / "runs" / "kw"
    driver = Driver(["run", str(space), "--searcher", "grid", "--scheduler", "fifo", "--storage",
                     str(tmp_path / "runs"), "--name", "kw", "--num-cpus", "2"], tmp_path / "run.log")  # fmt: skip
    try:
        checkpoints = lambda: sorted(folder.glob("*/train/checkpoint_*/state.pt"))  # noqa: E731
        wait_until(checkpoints, 400, "the Train run's first checkpoint", driver, poll=0.5)
        workers = wait_until(lambda: _train_workers(driver.pid), 60, "two Train workers", driver)
        os.kill(workers[-1].pid, signal.SIGKILL)
        code = driver.wait(600)
    finally:
        driver.stop()
    text = driver.text()
    assert code == 0, text[-3000:]
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert [(r["status"], r["epochs"]) for r in rows] == [("finished", 4)]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("killed-worker")
    (kid,) = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    steps = [m.step for m in client.get_metric_history(kid.info.run_id, "ssl_loss")]
    assert sorted(steps) == sorted(set(steps)) and set(steps) == {1, 2, 3, 4}, steps
    assert "[FailurePolicy] RETRY" in text  # Train's own word: the worker group was restarted, not the trial
