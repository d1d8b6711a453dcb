"""A search on a two-node Ray cluster (two ``ray start`` nodes on loopback, 1 CPU each), joined with ``--address``.

Both nodes live on this machine, so they share a hostname and an IP: the trials tell them apart by the Ray node
id each one reports (``results.parquet`` column ``node_id``). Deselect with ``-m "not cluster"``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, search_env

pytestmark = pytest.mark.cluster

CLUSTER_SPACE = """\
name: cluster
metric: knn_acc
mode: max
budget: {epochs: 2}
fixed: {data: cifar10-mini, train_limit: 256, test_limit: 64, batch_size: 32, width: 0.0625, encoder: resnet18,
        extract: last_vector, loss: infonce, lr: 1.0e-3}
params:
  augment: {choice: [simclr, amdim]}
  similarity: {choice: [cosine, dot]}
"""


def _alive_nodes(address: str) -> set[str]:
    """The cluster's live node ids, asked from a child process: Ray caches its auth mode in the process that first
    inits, and an in-process client with auth disabled makes a later local instance of this test session (token
    auth) fail to start."""
    code = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); " \
           "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    listed = subprocess.run([sys.executable, "-c", code, address], env=search_env(RAY_AUTH_MODE="disabled"),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-3000:]
    return set(listed.stdout.split())


def test_search_spreads_trials_over_both_nodes(ray_cluster: str, tmp_path: Path) -> None:
    # Two trials in flight (--max-concurrent 2; without it Tune keeps one pending at a time for a custom searcher),
    # each long enough (256 images, 2 epochs) that the worker node's first actor has started before the head's
    # reused actor could take every trial: sub-second trials all ran on the head under load.
    space = tmp_path / "cluster.yaml"
    space.write_text(CLUSTER_SPACE)
    out = subprocess.run(
        [sys.executable, "-m", "search", "run", str(space), "--searcher", "grid", "--scheduler", "fifo",
         "--max-concurrent", "2", "--address", ray_cluster, "--storage", str(tmp_path), "--name", "cluster", "--quiet"],
        cwd=REPO, env=search_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = pq.read_table(tmp_path / "cluster" / "results.parquet").to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}

    nodes = _alive_nodes(ray_cluster)
    assert len(nodes) == 2
    used = {r["node_id"] for r in rows}
    assert used == nodes, (used, nodes)  # every trial ran on a node of the cluster, and both nodes ran trials
    assert len({r["hostname"] for r in rows}) == 1  # one machine: the node id is what tells the nodes apart
    # The search's own Ray instance was the cluster's, not a local one: the default store sits in the storage folder.
    assert (tmp_path / "mlflow.db").exists()


WORKERS_SPACE = """\
name: cluster-workers
metric: ssl_loss
mode: min
budget: {epochs: 2, grace_period: 1}
fixed: {method: simclr, encoder: resnet18, width: 0.0625, batch_size: 32, train_limit: 128, test_limit: 64, device: cpu,
        workers_per_trial: 2, proj_dim: 16, proj_hidden: 32}
params:
  similarity: {choice: [cosine, dot]}
"""


def test_a_trial_of_two_train_workers_spans_both_nodes_under_asha(ray_cluster: str, tmp_path: Path) -> None:
    """Each trial is a TorchTrainer of 2 workers (1 CPU each: one per node of the cluster), inside its Tune trial."""
    from mlflow import MlflowClient

    space = tmp_path / "workers.yaml"
    space.write_text(WORKERS_SPACE)
    out = subprocess.run(
        [sys.executable, "-m", "search", "run", str(space), "--searcher", "grid", "--scheduler", "asha",
         "--address", ray_cluster, "--storage", str(tmp_path), "--name", "workers", "--quiet"],
        cwd=REPO, env=search_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = pq.read_table(tmp_path / "workers" / "results.parquet").to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"finished", "stopped"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cluster-workers")
    kids = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(kids) == 2  # one MLflow child per trial, not one per worker
    nodes = _alive_nodes(ray_cluster)
    for kid in kids:
        assert kid.data.params["workers_per_trial"] == "2"
        assert set(kid.data.tags["csl.node_id"].split(",")) == nodes  # its two workers: one on each node
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "ssl_loss")]  # epochs arrived
    # Train's own checkpoints live in the trial's folder
    assert list((tmp_path / "workers").glob("*/train/checkpoint_*"))
