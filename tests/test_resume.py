"""Kill, interrupt and resume real searches: every trial that ran stays on record, every planned trial ends once.

Each test drives ``python -m search`` child processes against the session's MLflow server and hits them with real
signals at moments read off the experiment folder and MLflow: SIGKILL of the driver before Tune's first
snapshot, between snapshots, and just as a trial ends (one search, killed three times, resumed three times);
SIGINT mid-trial, then resume (the interrupted trials reach their planned epochs, the Ray ports stay on
loopback); two searches started together on one storage folder and one new SQLite store.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.drivers import TINY_FIXED, Driver, listening_sockets, session_pids, space_text, wait_until

pytestmark = pytest.mark.slow

FINAL = {"finished", "stopped", "failed", "diverged"}


def children(client: Any, experiment: str, *, deleted: bool = False) -> list[Any]:
    from mlflow.entities import ViewType

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    runs = client.search_runs([found.experiment_id], run_view_type=view, max_results=500)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def planned(folder: Path) -> list[dict[str, Any]]:
    from search.ledger import Ledger

    return [{"first": p.first_id, "current": p.trial_id, "ids": p.ids} for p in Ledger(str(folder)).planned()]


def check_complete(folder: Path, client: Any, experiment: str, samples: int) -> list[dict[str, Any]]:
    """Every planned trial ended exactly once: one results row, one live MLflow child, no epoch twice."""
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    plan = planned(folder)
    assert len(plan) == samples == len(rows), (len(plan), len(rows))
    assert {r["trial_id"] for r in rows} == {p["current"] for p in plan}
    assert {r["status"] for r in rows} <= FINAL
    kids = children(client, experiment)
    assert len(kids) == samples and {k.data.tags["csl.trial_id"] for k in kids} == {r["trial_id"] for r in rows}
    assert {r["mlflow_run_id"] for r in rows} == {k.info.run_id for k in kids}
    for kid in kids:
        assert kid.info.status != "RUNNING" and kid.data.tags["csl.status"] in FINAL
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "ssl_loss")]
        assert steps == list(range(1, len(steps) + 1)), steps
    history = pq.read_table(folder / "history.parquet").to_pylist()
    pairs = [(h["trial_id"], h["epoch"]) for h in history]
    assert len(pairs) == len(set(pairs)) == sum(r["epochs"] for r in rows)
    return rows


def ended(client: Any, experiment: str) -> list[Any]:
    return [r for r in children(client, experiment) if r.info.status not in ("RUNNING", "SCHEDULED")]


def snapshot_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("experiment_state-*.json"))


def test_killed_three_times_every_planned_trial_ends_once(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    samples, experiment = 4, "csl-test-kill3"
    space = tmp_path / "kill3.yaml"
    space.write_text(space_text("kill3", epochs=2, samples=samples, budget=", max_concurrent_trials: 2"))
    folder = tmp_path / "runs" / "kill3"
    client = MlflowClient(mlflow_server)
    run = ["run", str(space), "--storage", str(tmp_path / "runs"), "--name", "kill3", "--mlflow-uri", mlflow_server,
           "--experiment", experiment, "--num-cpus", "2", "--quiet"]  # fmt: skip
    resume = ["resume", str(folder)]

    # 1. Before Tune's first snapshot: the Tuner exists (tuner.pkl), no experiment state has reached the folder.
    driver = Driver(run, tmp_path / "run.log")
    try:
        wait_until(lambda: (folder / "tuner.pkl").exists(), 300, "tuner.pkl", driver, poll=0.01)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.stop()
    assert snapshot_files(folder) == [], "the kill came after Tune's first snapshot"

    # 2. Between snapshots: a trial has ended, another is training.
    driver = Driver(resume, tmp_path / "resume1.log")
    try:
        wait_until(lambda: ended(client, experiment) and snapshot_files(folder), 300, "a trial ended", driver)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.stop()
    assert "rebuilding from the ledger (Tune had not snapshotted" in driver.text()
    before = {r.info.run_id: r for r in ended(client, experiment)}

    # 3. As trials end: the moment the next one's MLflow run is ended, before Tune's snapshot can say so.
    driver = Driver(resume, tmp_path / "resume2.log")
    try:
        wait_until(lambda: len(ended(client, experiment)) > len(before), 300, "another trial ended", driver,
                   poll=0.02)  # fmt: skip
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.stop()

    driver = Driver(resume, tmp_path / "resume3.log")
    try:
        assert driver.wait(400) == 0, driver.text()[-3000:]
    finally:
        driver.stop()
    rows = check_complete(folder, client, experiment, samples)
    runs = {r.info.run_id: r for r in children(client, experiment)}
    for run_id, earlier in before.items():  # ended before a kill: kept as it was, never trained again
        assert runs[run_id].info.end_time == earlier.info.end_time
        assert runs[run_id].data.tags["csl.status"] == earlier.data.tags["csl.status"]
    assert not [r for r in children(client, experiment, deleted=True) if r.info.lifecycle_stage == "deleted"]
    parent = client.get_run(json.loads((folder / "csl_search.json").read_text())["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["csl.resumes"] == "3"
    assert {r["status"] for r in rows} <= {"finished", "stopped"}


def test_sigint_pauses_and_resume_finishes_every_trial(tmp_path: Path, mlflow_server: str) -> None:
    """Ctrl-C mid-trial: exit 130 in seconds, trials interrupted (not stopped, not finished), resume completes them.

    While the search trains, every socket its Ray instance listens on is bound to 127.0.0.1.
    """
    from mlflow import MlflowClient

    experiment = "csl-test-sigint"
    space = tmp_path / "sigint.yaml"
    # 5 epochs: under load one trial must not end before the other has reported its first
    space.write_text(space_text("sigint", epochs=5, samples=2, budget=", max_concurrent_trials: 2"))
    folder = tmp_path / "runs" / "sigint"
    client = MlflowClient(mlflow_server)
    driver = Driver(["run", str(space), "--scheduler", "fifo", "--storage", str(tmp_path / "runs"), "--name",
                     "sigint", "--mlflow-uri", mlflow_server, "--experiment", experiment, "--num-cpus", "2",
                     "--quiet"], tmp_path / "run.log")  # fmt: skip

    def first_epochs() -> bool:
        kids = children(client, experiment)
        return len(kids) == 2 and all(client.get_metric_history(k.info.run_id, "ssl_loss") for k in kids)

    try:
        wait_until(first_epochs, 300, "both trials reported an epoch", driver)
        sockets = listening_sockets(session_pids(driver.pid))
        os.kill(driver.pid, signal.SIGINT)
        stopped = time.time()
        code = driver.wait(120)
        took = time.time() - stopped
    finally:
        driver.stop()
    text = driver.text()
    assert code == 130, text[-3000:]
    assert f"csl-search resume {folder}" in text and "Tuner.restore" not in text
    assert took < 60, took
    assert len({pid for *_, pid in sockets}) >= 3, sockets  # gcs_server, raylet, workers, the driver...
    assert {address for address, *_ in sockets} == {"127.0.0.1"}, sockets

    kids = children(client, experiment)
    assert {k.data.tags["csl.status"] for k in kids} == {"interrupted"}
    assert {k.info.status for k in kids} == {"SCHEDULED"}
    parent_id = json.loads((folder / "csl_search.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["csl.search_status"] == "interrupted" and parent.info.status == "SCHEDULED"
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"interrupted"} and all(r["epochs"] < 5 for r in rows)
    epochs_before = {r["trial_id"]: r["epochs"] for r in rows}

    driver = Driver(["resume", str(folder)], tmp_path / "resume.log")
    try:
        assert driver.wait(400) == 0, driver.text()[-3000:]
    finally:
        driver.stop()
    rows = check_complete(folder, client, "csl-test-sigint", 2)
    assert {r["status"] for r in rows} == {"finished"} and {r["epochs"] for r in rows} == {5}
    assert set(epochs_before) == {r["trial_id"] for r in rows}  # continued, not replaced
    for kid in children(client, experiment):  # each continued from its last checkpoint: no epoch trained twice
        assert kid.data.tags["csl.epochs_run"] == "5" and kid.info.status == "FINISHED"
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_two_searches_at_once_on_one_folder_and_a_new_sqlite_store(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    space = tmp_path / "twins.yaml"
    space.write_text(space_text("twins", epochs=1, samples=2))
    storage = tmp_path / "runs"
    args = ["run", str(space), "--storage", str(storage), "--num-cpus", "1", "--quiet"]
    drivers = [Driver(args, tmp_path / f"twin{i}.log") for i in range(2)]  # the same second, the same store
    try:
        codes = [d.wait(600) for d in drivers]
    finally:
        for d in drivers:
            d.stop()
    assert codes == [0, 0], [d.text()[-2000:] for d in drivers]
    folders = sorted(p for p in storage.iterdir() if (p / "csl_search.json").exists())
    assert len(folders) == 2
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    parents = set()
    for folder in folders:
        state = json.loads((folder / "csl_search.json").read_text())
        rows = pq.read_table(folder / "results.parquet").to_pylist()
        assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
        assert {r["trial_id"] for r in rows} == {p["current"] for p in planned(folder)}  # its own trials only
        kids = client.search_runs([state["experiment_id"]],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
        assert {k.info.run_id for k in kids} == {r["mlflow_run_id"] for r in rows}
        assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
        parents.add(state["parent_run_id"])
    assert len(parents) == 2


# ---------------------------------------------------------------------------------------------------- damaged folders

DAMAGE_VARIANTS = """\
base: {{lr: 1.0e-3}}
variants:
  - {{name: explodes, lr: 1.0e+4, similarity: dot}}
  - {{name: too_few, data: "parquet:{few}"}}
"""


def _main(*argv: str) -> tuple[int, str, str]:
    """``csl-search ARGV`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from search.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Any]:
    """A finished three-trial search: one trains, one explodes (finite loss, diverged), one cannot train (8 images
    for a batch of 16: failed at once)."""
    import pyarrow.parquet as pq_

    from csl.data import mini_path

    folder = tmp_path_factory.mktemp("finished")
    few = folder / "few.parquet"
    pq_.write_table(pq_.read_table(Path(mini_path()) / "train.parquet").slice(0, 8), few)
    text = ("name: damage\nmetric: ssl_loss\nmode: min\nbudget: {epochs: 1}\nfixed:\n" + TINY_FIXED
            + DAMAGE_VARIANTS.format(few=few).replace("{{", "{").replace("}}", "}"))  # fmt: skip
    space = folder / "damage.yaml"
    space.write_text(text)
    started = time.time()
    code, out, err = _main("run", str(space), "--searcher", "grid", "--scheduler", "fifo", "--storage",
                           str(folder / "runs"), "--name", "done", "--mlflow-uri", mlflow_server, "--experiment",
                           "csl-test-damage", "--num-cpus", "2", "--max-failures", "2", "--quiet")  # fmt: skip
    assert code == 0, out[-2000:] + err[-2000:]
    return {"folder": folder / "runs" / "done", "uri": mlflow_server, "wall_s": time.time() - started}


def _mlflow_view(uri: str) -> dict[str, tuple]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {r.info.run_id: (r.info.status, r.info.end_time, r.info.lifecycle_stage, r.data.tags.get("csl.status"))
            for r in children(client, "csl-test-damage", deleted=True)}  # fmt: skip


def test_a_config_that_cannot_train_fails_at_once_and_an_explosion_keeps_its_history(finished: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(finished["uri"])
    kids = {k.data.params["variant"]: k for k in children(client, "csl-test-damage")}
    few = kids["too_few"]
    assert few.data.tags["csl.status"] == "failed" and few.info.status == "FAILED"
    assert "larger than the training set (8 images)" in few.data.tags["csl.error"]
    assert few.data.tags.get("csl.retries", "0") == "0"  # --max-failures 2, and not retried
    boom = kids["explodes"]
    assert boom.data.tags["csl.status"] == "diverged" and "diverge_factor" in boom.data.tags["csl.error"]
    history = client.get_metric_history(boom.info.run_id, "ssl_loss")
    assert [m.step for m in history] == [1] and history[0].value > 1e6  # the exploded (finite) loss is on record
    assert kids["base"].data.tags["csl.status"] == "finished"
    rows = {r["variant"]: r for r in pq.read_table(finished["folder"] / "results.parquet").to_pylist()}
    assert rows["too_few"]["status"] == "failed" and "8 images" in rows["too_few"]["error"]
    assert rows["explodes"]["status"] == "diverged" and rows["explodes"]["last_ssl_loss"] > 1e6


def _copy(finished: dict, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(finished["folder"], target)
    return target


def _only(folder: Path, pattern: str) -> Path:
    """The newest of Tune's files matching ``pattern`` (the one a resume reads)."""
    return sorted(folder.glob(pattern))[-1]


@pytest.mark.parametrize("damage", ["searcher-cut", "searcher-pickle", "search-gen-pickle", "experiment-cut",
                                    "group-writable"])  # fmt: skip
def test_a_damaged_folder_is_refused_before_anything_is_touched(finished: dict, tmp_path: Path, damage: str) -> None:
    from tests.test_reliability import Payload

    folder = _copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    if damage == "searcher-cut":
        state = _only(folder, "searcher-state-*.pkl")
        state.write_bytes(state.read_bytes()[:50])
    elif damage == "searcher-pickle":
        _only(folder, "searcher-state-*.pkl").write_bytes(__import__("pickle").dumps(Payload(marker)))
    elif damage == "search-gen-pickle":
        _only(folder, "search_gen_state-*.json").write_bytes(__import__("pickle").dumps(Payload(marker)))
    elif damage == "experiment-cut":
        state = _only(folder, "experiment_state-*.json")
        state.write_text(state.read_text()[:500])
    else:
        folder.chmod(0o775)
    views, table = _mlflow_view(finished["uri"]), (folder / "results.parquet").read_bytes()
    code, out, err = _main("resume", str(folder))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    expected = {"searcher-cut": "not a csl-search searcher state", "searcher-pickle": "not a csl-search searcher",
                "search-gen-pickle": "names posix.system", "experiment-cut": "damaged",
                "group-writable": "writable by others"}[damage]  # fmt: skip
    assert expected in err, err
    if damage != "group-writable":
        assert "--rebuild" in err or "nothing in it was run" in err
    assert not marker.exists()  # the payload never ran
    assert _mlflow_view(finished["uri"]) == views  # no run reopened, ended or trashed
    assert (folder / "results.parquet").read_bytes() == table  # no table rewritten


def test_a_replaced_tuner_pkl_is_never_read_and_a_damaged_search_rebuilds(finished: dict, tmp_path: Path) -> None:
    """tuner.pkl holding a payload: the resume builds its Tuner anew and never loads it. Then the searcher state
    cut short: refused; --rebuild continues from the ledger and MLflow, every trial once, its run kept."""
    from tests.test_reliability import Payload

    folder = _copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    (folder / "tuner.pkl").write_bytes(__import__("pickle").dumps(Payload(marker)))
    code, out, err = _main("resume", str(folder))
    assert code == 0, out[-2000:] + err[-2000:]
    assert not marker.exists()

    before = {k: v for k, v in _mlflow_view(finished["uri"]).items()}
    state = _only(folder, "searcher-state-*.pkl")
    state.write_bytes(state.read_bytes()[:50])
    assert _main("resume", str(folder))[0] == 1
    code, out, err = _main("resume", str(folder), "--rebuild")
    assert code == 0, out[-2000:] + err[-2000:]
    assert "rebuilding from the ledger (as asked (--rebuild)): 3 planned trials" in out
    assert list(folder.glob("superseded-*/experiment_state-*.json"))  # set aside, not deleted
    after = _mlflow_view(finished["uri"])
    assert set(after) == set(before)  # the same runs: adopted by the replays, none new, none trashed
    assert {v[2] for v in after.values()} == {"active"}
    for run_id, (status, end, _, tag) in before.items():
        assert after[run_id][0] == status and after[run_id][3] == tag
        if tag != "failed":  # ended: repeated its end without training, untouched (a failed trial is tried again)
            assert after[run_id][1] == end
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert len(rows) == 3 and {r["mlflow_run_id"] for r in rows} == set(after)
    assert {r["status"] for r in rows} == {"finished", "failed", "diverged"}
