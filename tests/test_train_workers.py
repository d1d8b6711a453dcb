"""A trial of two Ray Train workers (search.train_trial) on a local instance, failing at both levels: a killed
worker is replaced and the Train run continues from its last checkpoint (Train's FailureConfig); then the trial's
own process, the Train run's driver, is killed and Tune's retry starts a Train run from the trial's last Tune
checkpoint (Tune's FailureConfig). The trial still ends with every planned epoch, each logged once."""

from __future__ import annotations

import json
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
budget: {{epochs: 6}}
fixed: {{method: simclr, encoder: resnet18, width: 0.0625, batch_size: 32, train_limit: 256, test_limit: 64,
        device: cpu, workers_per_trial: 2, proj_dim: 16, proj_hidden: 32, similarity: cosine}}
"""


def _processes(root: int, name: str) -> list[psutil.Process]:
    """The processes under ``root`` whose command line names ``name`` (Ray names its actors' processes)."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if name in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _results(folder: Path) -> list[dict]:
    """The results Tune has logged for the search's one trial so far."""
    found = []
    for path in folder.glob("csl_trial_*/result.json"):
        for line in path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    return found


def test_a_killed_train_worker_and_a_killed_trial_resume_from_their_checkpoints(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    space = tmp_path / "workers.yaml"
    space.write_text(SPACE.format(name="killed-worker"))
    folder = tmp_path / "runs" / "kw"
    driver = Driver(["run", str(space), "--searcher", "grid", "--scheduler", "fifo", "--storage",
                     str(tmp_path / "runs"), "--name", "kw", "--num-cpus", "2"], tmp_path / "run.log")  # fmt: skip
    try:
        checkpoints = lambda: sorted(folder.glob("*/train/checkpoint_*/state.pt"))  # noqa: E731
        wait_until(checkpoints, 400, "the Train run's first checkpoint", driver, poll=0.5)
        workers = wait_until(lambda: _processes(driver.pid, "RayTrainWorker"), 60, "two Train workers", driver)
        os.kill(workers[-1].pid, signal.SIGKILL)
        # The second epoch, from the restarted Train run, reported to Tune: kill the trial's process (the pid
        # Tune's session put in the trial's results), the driver of its Train run.
        second = lambda: [r for r in _results(folder) if r["epoch"] >= 2]  # noqa: E731
        os.kill(int(wait_until(second, 400, "the second epoch's result", driver, poll=0.2)[0]["pid"]), signal.SIGKILL)
        code = driver.wait(600)
    finally:
        driver.stop()
    text = driver.text()
    assert code == 0, text[-3000:]
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert [(r["status"], r["epochs"]) for r in rows] == [("finished", 6)]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("killed-worker")
    (kid,) = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    steps = [m.step for m in client.get_metric_history(kid.info.run_id, "ssl_loss")]
    assert sorted(steps) == sorted(set(steps)) and set(steps) == set(range(1, 7)), steps
    assert "[FailurePolicy] RETRY" in text  # Train's own word: the worker group was restarted, not the trial
    (trial_folder,) = folder.glob("csl_trial_*")
    assert [p for p in trial_folder.glob("train-*") if list(p.glob("checkpoint_*/state.pt"))], "no retried Train run"
