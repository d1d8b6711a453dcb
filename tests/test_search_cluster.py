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


def test_search_spreads_trials_over_both_nodes(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the cluster was started

    out = subprocess.run(
        [sys.executable, "-m", "search", "run", str(REPO / "spaces" / "tiny_grid.yaml"), "--searcher", "grid",
         "--scheduler", "fifo", "--max-concurrent", "2", "--address", ray_cluster, "--storage", str(tmp_path),
         "--name", "cluster", "--quiet"],
        cwd=REPO, env=search_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    # --max-concurrent 2: without it Tune keeps one trial pending at a time for a custom searcher, and these
    # sub-second trials all finish on the head's reused actor before the worker node's first actor has started.
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = pq.read_table(tmp_path / "cluster" / "results.parquet").to_pylist()
    assert len(rows) == 9 and {r["status"] for r in rows} == {"finished"}

    ray.init(address=ray_cluster, log_to_driver=False)
    try:
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert len(nodes) == 2
    used = {r["node_id"] for r in rows}
    assert used == nodes, (used, nodes)  # every trial ran on a node of the cluster, and both nodes ran trials
    assert len({r["hostname"] for r in rows}) == 1  # one machine: the node id is what tells the nodes apart
    # The search's own Ray instance was the cluster's, not a local one: the default store sits in the storage folder.
    assert (tmp_path / "mlflow.db").exists()
