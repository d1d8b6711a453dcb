"""End-to-end tests of ``csl-search`` on the real trainer (``csl.train.train``), Ray Tune and an MLflow server.

Everything trains a 1/16-wide ResNet-18 on 256 images of the embedded cifar10-mini for at most 3 epochs, so the
file runs in a few minutes on 2 CPU cores. One search (six trials, ASHA) is shared by the MLflow, results and
compare tests; it also holds a trial that raises (its data set does not exist) and one whose loss becomes NaN.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from csl.train import native_bf16

from tests.conftest import REPO, free_port, search_env, stop_group

TINY_FIXED = """\
  encoder: resnet18
  width: 0.0625
  proj_dim: 16
  proj_hidden: 32
  batch_size: 32
  train_limit: 256
  test_limit: 128
  seed: 0
  device: cpu
"""

# Six trials, one per variant (grid searcher, launched in this order, two at a time): four that train, one whose
# loss becomes NaN, one that raises (its data set does not exist). The metric is the SSL loss: the two triplet
# trials launched first report about 0.8, the InfoNCE ones launched after them about 4, so at the one ASHA rung
# (epoch 1; reduction factor 4 keeps the top quarter) the InfoNCE trials are stopped for sure, while the first
# trial to report epoch 1 always goes on to the end.
MAIN_SPACE = f"""\
name: t_main
metric: ssl_loss
mode: min
budget: {{epochs: 2, grace_period: 1, reduction_factor: 4}}
fixed:
{TINY_FIXED}base: {{method: simclr, loss: triplet, similarity: cosine, optimizer: adam, lr: 1.0e-3, data: cifar10-mini}}
variants:
  - {{name: lr3, lr: 3.0e-3}}
  - {{name: infonce, loss: infonce}}
  - {{name: nan, loss: infonce, similarity: dot, optimizer: sgd, lr: 1.0e+8}}
  - {{name: tau1, loss: infonce, temperature: 1.0}}
  - {{name: nodata, data: "parquet:/nonexistent/csl-search-test"}}
"""

# Constrained categorical dimensions for the optuna searcher (kill / resume test).
RESUME_SPACE = f"""\
name: t_resume
metric: knn_acc
mode: max
budget: {{epochs: 3, grace_period: 1, reduction_factor: 2, num_samples: 6}}
fixed:
{TINY_FIXED}  method: simclr
params:
  similarity: {{choice: [cosine, dot, bilinear]}}
  temperature: {{choice: [0.2, 0.5, 1.0]}}
  lr: {{loguniform: [3.0e-4, 3.0e-3]}}
constraints:
  - forbid: {{similarity: bilinear, temperature: 0.2}}
    reason: "test: bilinear scores not with temperature 0.2"
  - when: {{similarity: dot}}
    require: {{temperature: 1.0}}
    reason: "test: dot scores only with temperature 1"
"""

# Two trials of one epoch (grid searcher), for resuming a search that has runs Tune never held.
LOST_SPACE = f"""\
name: t_lost
metric: ssl_loss
mode: min
budget: {{epochs: 1}}
fixed:
{TINY_FIXED}  method: simclr
params:
  lr: {{choice: [1.0e-3, 3.0e-3]}}
"""

STATUSES = {"finished", "stopped", "failed", "diverged"}


def write_space(folder: Path, text: str, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "search", *args], cwd=REPO, env=env or search_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def children(client: Any, parent_run_id: str) -> list[Any]:
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=500
    )


# ---------------------------------------------------------------------------------------------------- the main search


@pytest.fixture(scope="module")
def main_search(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Any]:
    """The six-trial search, run in-process through ``search.cli.main`` against the MLflow server."""
    import ray

    from search.cli import main

    folder = tmp_path_factory.mktemp("main")
    space = write_space(folder, MAIN_SPACE, "t_main")
    out = io.StringIO()
    started = time.time()
    with contextlib.redirect_stdout(out):
        code = main([
            "run", str(space), "--searcher", "grid", "--storage", str(folder / "runs"), "--name", "main",
            "--mlflow-uri", mlflow_server, "--experiment", "csl-test-main", "--num-cpus", "2", "--max-failures", "1",
            "--quiet",
        ])  # fmt: skip
    assert not ray.is_initialized(), "run_search shuts down the Ray instance it started"
    text = out.getvalue()
    assert code == 0, text
    return {
        "text": text, "space": space, "path": folder / "runs" / "main", "uri": mlflow_server,
        "wall_s": time.time() - started,
    }  # fmt: skip


def test_search_prints_a_ranked_table_and_how_to_open_mlflow(main_search: dict[str, Any]) -> None:
    text = main_search["text"]
    assert "ranked by best ssl_loss (min):" in text
    assert "rank" in text and "variant" in text
    assert f"open it: {main_search['uri']}" in text
    assert "csl-search compare" in text


def test_mlflow_has_one_parent_and_one_child_per_trial(main_search: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(main_search["uri"])
    experiment = client.get_experiment_by_name("csl-test-main")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    tags = parent.data.tags
    assert tags["csl.space_hash"] == hashlib.sha256(main_search["space"].read_bytes()).hexdigest()
    assert tags["csl.ray_version"] == "2.60.0" and tags["csl.torch_version"].startswith("2.")
    assert "run" in tags["csl.command"] and "t_main.yaml" in tags["csl.command"]
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space", "results"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} == {
        "results/results.parquet", "results/history.parquet"}  # fmt: skip
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "space")] == ["space/t_main.yaml"]

    kids = children(client, parent.info.run_id)
    assert len(kids) == 6 == len(runs) - 1
    assert len({k.data.tags["csl.trial_id"] for k in kids}) == 6
    by_variant = {k.data.params["variant"]: k for k in kids}
    assert set(by_variant) == {"base", "lr3", "infonce", "nan", "tau1", "nodata"}
    for kid in kids:
        params = kid.data.params
        for key in ("augment", "encoder", "extract", "similarity", "loss", "lr", "temperature", "epochs", "width"):
            assert key in params, (key, params)
        assert params["augment"] == "simclr" and params["encoder"] == "resnet18"  # from the preset / fixed
        assert kid.data.tags["csl.status"] in STATUSES
        assert "trial_config.json" in {a.path for a in client.list_artifacts(kid.info.run_id)}
        assert [d.dataset.name for d in kid.inputs.dataset_inputs] == [params["data"]]
    assert by_variant["tau1"].data.params["temperature"] == "1.0"
    assert by_variant["nan"].data.params["optimizer"] == "sgd"
    assert by_variant["base"].data.params["loss"] == "triplet"
    assert by_variant["infonce"].data.params["loss"] == "infonce"


def test_trials_run_side_by_side_on_the_cores_they_ask_for(main_search: dict[str, Any]) -> None:
    """Two 1-CPU slots, six short trials: some run at the same time. (Ray 2.60 keeps one trial pending for a
    custom searcher, and a reused actor then takes every trial in turn: search.run._pending_trials.)"""
    from mlflow import MlflowClient

    client = MlflowClient(main_search["uri"])
    parent = json.loads((main_search["path"] / "csl_search.json").read_text())["parent_run_id"]
    spans = sorted((r.info.start_time, r.info.end_time) for r in children(client, parent))
    assert len(spans) == 6
    overlapping = sum(1 for (_, end), (start, _) in zip(spans, spans[1:]) if start < end)
    assert overlapping >= 2, spans


def test_trial_statuses_and_metric_history(main_search: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(main_search["uri"])
    parent_id = json.loads((main_search["path"] / "csl_search.json").read_text())["parent_run_id"]
    kids = {k.data.params["variant"]: k for k in children(client, parent_id)}
    run_status = {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "diverged": "FAILED"}

    trained = [kids[v] for v in ("base", "lr3", "infonce", "tau1")]
    for kid in trained:
        status = kid.data.tags["csl.status"]
        assert status in ("finished", "stopped")
        assert kid.info.status == run_status[status]
        for metric in ("ssl_loss", "knn_acc", "probe_acc", "images_per_s", "epoch_time"):
            steps = [m.step for m in client.get_metric_history(kid.info.run_id, metric)]
            assert steps == list(range(1, len(steps) + 1)), (metric, steps)
            assert len(steps) == int(kid.data.tags["csl.epochs_run"])
        assert (len(steps) == 2) == (status == "finished")
        assert kid.data.tags["csl.node_id"]
    # The first trial to report epoch 1 goes on to the end; InfoNCE's loss is far above the triplet trials'.
    assert any(k.data.tags["csl.status"] == "finished" for k in trained[:2])
    assert kids["infonce"].data.tags["csl.status"] == "stopped" == kids["tau1"].data.tags["csl.status"]
    assert kids["infonce"].data.tags["csl.epochs_run"] == "1"

    nan = kids["nan"]
    assert nan.data.tags["csl.status"] == "diverged" and nan.info.status == "FAILED"
    assert "diverged" in nan.data.tags["csl.error"]
    assert len(client.get_metric_history(nan.info.run_id, "diverged")) == 1

    assert kids["base"].data.tags["csl.precision"] in ("bf16", "float32")

    nodata = kids["nodata"]
    assert nodata.data.tags["csl.status"] == "failed" and nodata.info.status == "FAILED"
    assert "nonexistent" in nodata.data.tags["csl.error"]
    assert nodata.data.tags["csl.retries"] == "1"  # --max-failures 1: one retry, then given up
    assert "error.txt" in {a.path for a in client.list_artifacts(nodata.info.run_id)}


def test_results_and_history_read_back_with_pyarrow(main_search: dict[str, Any]) -> None:
    results = pq.read_table(main_search["path"] / "results.parquet")
    history = pq.read_table(main_search["path"] / "history.parquet")
    assert results.num_rows == 6
    assert results.schema.metadata[b"csl.metric"] == b"ssl_loss"
    for name, kind in [("trial_id", "string"), ("status", "string"), ("error", "string"), ("epochs", "int64"),
                       ("wall_time_s", "double"), ("node_id", "string"), ("hostname", "string"),
                       ("precision", "string"), ("best_ssl_loss", "double"), ("best_knn_acc", "double"),
                       ("last_ssl_loss", "double"),
                       ("mlflow_run_id", "string"), ("variant", "string"), ("temperature", "double"),
                       ("lr", "double"), ("similarity", "string"), ("epochs", "int64")]:  # fmt: skip
        assert str(results.schema.field(name).type) == kind, name
    rows = {r["variant"]: r for r in results.to_pylist()}
    assert {r["status"] for r in rows.values()} <= STATUSES
    assert rows["nan"]["status"] == "diverged" and rows["nodata"]["status"] == "failed"
    assert "nonexistent" in rows["nodata"]["error"]
    assert rows["infonce"]["status"] == "stopped" and rows["infonce"]["epochs"] == 1
    assert {rows["base"]["status"], rows["lr3"]["status"]} & {"finished"}
    assert all(r["epochs"] == 2 for r in rows.values() if r["status"] == "finished")
    # amp is on in every trial: bf16 exactly where this CPU computes it natively
    assert rows["base"]["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "float32")

    assert [f.name for f in history.schema][:3] == ["trial_id", "epoch", "ssl_loss"]
    per_trial: dict[str, list[int]] = {}
    for row in history.to_pylist():
        per_trial.setdefault(row["trial_id"], []).append(row["epoch"])
    for row in rows.values():
        epochs = per_trial.get(row["trial_id"], [])
        assert epochs == list(range(1, row["epochs"] + 1)), row["variant"]
    assert rows["nodata"]["trial_id"] not in per_trial  # it never reported an epoch
    assert history.num_rows == sum(r["epochs"] for r in rows.values() if r["variant"] != "nodata")


def test_compare_prints_top_configs_and_marginals(main_search: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    from search.cli import main

    assert main(["compare", "--mlflow-uri", main_search["uri"], "--experiment", "csl-test-main"]) == 0
    text = capsys.readouterr().out
    assert "top 6 configurations" in text
    assert "variant: ssl_loss per value" in text  # the searched dimension
    assert "similarity: ssl_loss per value" in text  # an aspect that took two values
    assert "diverged" in text and "failed" in text


def test_the_search_wrote_its_report_with_its_schedulers_settings(main_search: dict[str, Any]) -> None:
    """The report a plain search writes as it ends (the real trainer, ASHA): the scheduler's parameters and the
    budget from the parent run, and the early-stopping check over the trials ASHA kept past the grace period."""
    import math

    from mlflow import MlflowClient

    client = MlflowClient(main_search["uri"])
    parent_id = json.loads((main_search["path"] / "csl_search.json").read_text())["parent_run_id"]
    params = client.get_run(parent_id).data.params
    assert (params["budget.grace_period"], params["scheduler.grace_period"]) == ("1", "1")
    assert params["scheduler.max_t"] == "2"
    assert float(params["scheduler.reduction_factor"]) == 4
    report = (main_search["path"] / "report" / "report.md").read_text()
    assert "scheduler asha (grace_period 1, reduction_factor 4.0000)" in report and "budget 2 epochs" in report
    assert "grace period 1 epoch(s)" in report
    histories = [client.get_metric_history(kid.info.run_id, "ssl_loss") for kid in children(client, parent_id)]
    past = sum(any(m.step > 1 and math.isfinite(m.value) for m in history) for history in histories)
    found = f"over {past} trials" if past >= 3 else f"not measurable: {past} trial(s) ran past the grace period"
    assert "**Early-stopping check** (trials that ran past the grace period" in report and found in report


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_space_file_exits_2_with_one_message_and_starts_nothing(tmp_path: Path) -> None:
    bad = write_space(tmp_path, MAIN_SPACE.replace("method: simclr", "method: simclrr"), "bad")
    broken = write_space(tmp_path, "name: [unclosed\n", "broken")
    storage = tmp_path / "runs"
    code = (
        "import sys; from search.cli import main; rc = main(sys.argv[1:]); "
        "sys.stderr.write('RAY-IMPORTED' if 'ray' in sys.modules else ''); sys.exit(rc)"
    )
    for space in (bad, broken, tmp_path / "missing.yaml"):
        out = subprocess.run(
            [sys.executable, "-c", code, "run", str(space), "--storage", str(storage)],
            cwd=REPO, env=search_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("csl-search: error: "), out.stderr
        assert str(space.name) in lines[0]
        assert out.stdout == ""
        assert not storage.exists()
    assert "simclrr" in subprocess.run(
        [sys.executable, "-m", "search", "run", str(bad)], cwd=REPO, env=search_env(), capture_output=True, text=True,
        timeout=120,
    ).stderr  # fmt: skip


def test_unreachable_tracking_server_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import ray

    from search.cli import main

    space = write_space(tmp_path, RESUME_SPACE, "t_resume")
    started = time.time()
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["run", str(space), "--storage", str(tmp_path / "runs"), "--mlflow-uri", uri]) == 1
    assert time.time() - started < 30
    err = capsys.readouterr().err
    assert f"--mlflow-uri {uri}: cannot open it" in err
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------------- searchers


def _allowed_grid(space: Any) -> set[tuple]:
    dims = space.categorical()
    allowed = set()
    for combo in itertools.product(*(d.values for d in dims)):
        config = space.trial_config(dict(zip((d.name for d in dims), combo)))
        if space.violation(config) is None:
            allowed.add(combo)
    return allowed


def test_grid_searcher_proposes_every_allowed_combination_once() -> None:
    from ray.tune.search import Searcher

    from search.searchers import GridSearcher
    from search.space import load_space

    space = load_space(REPO / "spaces" / "tiny_grid.yaml")
    searcher = GridSearcher(space)
    proposed = []
    while (config := searcher.suggest(f"t{len(proposed)}")) != Searcher.FINISHED:
        proposed.append(tuple(config[d.name] for d in space.categorical()))
    assert len(proposed) == len(set(proposed)) == 9
    assert set(proposed) == _allowed_grid(space)


def test_grid_search_launches_every_allowed_combination_once(tmp_path: Path) -> None:
    from search.run import SearchOptions, run_search
    from search.space import load_space

    space = load_space(REPO / "spaces" / "tiny_grid.yaml")
    outcome = run_search(
        space, SearchOptions(searcher="grid", scheduler="fifo", storage=str(tmp_path), name="grid", num_cpus=2,
                             verbose=0),
    )  # fmt: skip
    rows = pq.read_table(outcome.results_path).to_pylist()
    launched = [(r["augment"], r["similarity"], r["loss"]) for r in rows]
    assert len(launched) == len(set(launched)) == 9
    assert set(launched) == _allowed_grid(space)
    assert {r["status"] for r in rows} == {"finished"}
    excluded = {c for c in itertools.product(*(d.values for d in space.categorical()))} - set(launched)
    assert len(excluded) == 3
    assert all(space.violation(dict(zip(("augment", "similarity", "loss"), combo))) for combo in excluded)


def test_optuna_searcher_never_proposes_a_forbidden_config(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from search.searchers import ConstrainedOptunaSearcher
    from search.space import load_space

    space = load_space(write_space(tmp_path, RESUME_SPACE, "t_resume"))
    searcher = ConstrainedOptunaSearcher(space, max_epochs=3, seed=1)
    rng = random.Random(0)
    seen = set()
    for i in range(40):
        config = searcher.suggest(f"trial{i}")
        assert isinstance(config, dict)
        assert space.violation(config) is None, config
        assert config["epochs"] == 3 and config["width"] == 0.0625
        seen.add((config["similarity"], config["temperature"]))
        for epoch in (1, 2, 3):
            searcher.on_trial_result(f"trial{i}", {"knn_acc": rng.random(), "epoch": epoch})
        searcher.on_trial_complete(f"trial{i}", {"knn_acc": rng.random(), "epoch": rng.choice([1, 3])})
        if i == 20:  # Tune saves the searcher with the experiment (as JSON): a restored one goes on where it stood
            searcher.save(str(tmp_path / "searcher.pkl"))
            rejected_before = searcher.rejected
            searcher = ConstrainedOptunaSearcher(space, max_epochs=3, seed=1)
            searcher.restore(str(tmp_path / "searcher.pkl"))
    assert seen <= {("cosine", 0.2), ("cosine", 0.5), ("cosine", 1.0), ("bilinear", 0.5), ("bilinear", 1.0),
                    ("dot", 1.0)}  # fmt: skip
    states = [t.state for t in searcher.study.trials]
    # rejected draws are counted, not kept through a restore (TPE ignores FAIL trials)
    assert searcher.rejected > 0 and states.count(TrialState.FAIL) == searcher.rejected - rejected_before
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 40


# ---------------------------------------------------------------------------------------------------- kill and resume


def _child_runs(client: Any, experiment: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [
        r for r in client.search_runs([found.experiment_id], max_results=200) if "mlflow.parentRunId" in r.data.tags
    ]


# Wherever SIGKILL lands, including between a trial's MLflow run being made and the experiment snapshot that holds
# the trial reaching storage: the replay of a trial Tune lost continues its run (search.callback), so no 7th run.
def test_killed_search_resumes_without_rerunning_or_duplicating(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    space = write_space(tmp_path, RESUME_SPACE, "t_resume")
    storage, experiment = tmp_path / "runs", "csl-test-resume"
    client = MlflowClient(mlflow_server)
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(
        [sys.executable, "-m", "search", "run", str(space), "--storage", str(storage), "--name", "resume",
         "--mlflow-uri", mlflow_server, "--experiment", experiment, "--num-cpus", "2", "--quiet"],
        cwd=REPO, env=search_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            runs = _child_runs(client, experiment)
            done = [r for r in runs if r.info.status != "RUNNING"]
            if len(done) >= 2 and any(r.info.status == "RUNNING" for r in runs):
                break
            assert time.time() < deadline, "no two trials completed in 300 s"
            time.sleep(0.5)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its Ray instance dies with it
        driver.wait(timeout=30)
    finally:
        stop_group(driver)  # whatever is left of its process group
        log.close()
    before = {r.info.run_id: r for r in _child_runs(client, experiment)}
    completed = {k: r for k, r in before.items() if r.info.status != "RUNNING"}
    assert 2 <= len(completed) < 6

    out = cli("resume", str(storage / "resume"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "6 trials" in out.stdout

    after = _child_runs(client, experiment)
    assert len(after) == 6
    assert len({r.data.tags["csl.trial_id"] for r in after}) == 6
    assert set(before) <= {r.info.run_id for r in after}  # in-flight trials continued their own runs
    parents = {r.data.tags["mlflow.parentRunId"] for r in after}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["csl.resumes"] == "1"
    for run in after:
        assert run.info.status != "RUNNING" and run.data.tags["csl.status"] in STATUSES
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "ssl_loss")]
        assert steps == list(range(1, len(steps) + 1)), steps  # no epoch logged twice
        if run.info.run_id in completed:  # not rerun: untouched since the kill
            assert run.info.end_time == completed[run.info.run_id].info.end_time
            assert run.data.tags["csl.status"] == completed[run.info.run_id].data.tags["csl.status"]

    from search.space import load_space

    loaded = load_space(space)
    rows = pq.read_table(storage / "resume" / "results.parquet").to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} <= STATUSES
    for row in rows:  # the optuna searcher launched nothing the constraints forbid
        assert loaded.violation({k: row[k] for k in ("similarity", "temperature", "method")}) is None
    history = pq.read_table(storage / "resume" / "history.parquet").to_pylist()
    pairs = [(h["trial_id"], h["epoch"]) for h in history]
    assert len(pairs) == len(set(pairs)) == sum(r["epochs"] for r in rows)


# ------------------------------------------------------------------------------------------------ runs of lost trials


class _Trial:
    """What ``MlflowTrialCallback`` reads of a Ray trial, so each kill point can be staged without a kill."""

    def __init__(self, trial_id: str, config: dict[str, Any], folder: Path) -> None:
        import pyarrow.fs as pafs

        self.trial_id, self.config = trial_id, config
        self.storage = type("Storage", (), {"storage_filesystem": pafs.LocalFileSystem(),
                                            "experiment_fs_path": str(folder)})()  # fmt: skip
        self.status, self.last_result, self.num_failures = "RUNNING", {}, 0

    def __str__(self) -> str:
        return f"csl_trial_{self.trial_id}"

    def report(self, callback: Any, epoch: int) -> None:
        self.last_result = {"epoch": epoch, "ssl_loss": 1.0 / epoch, "diverged": 0}
        callback.on_trial_result(0, [], self, dict(self.last_result))

    def end(self, callback: Any) -> None:
        callback.on_trial_complete(0, [], self)
        self.status = "TERMINATED"


def _config(lr: float) -> dict[str, Any]:
    return {"method": "simclr", "lr": lr, "epochs": 2}


def _lost_trials_parent(uri: str, name: str) -> tuple[Any, str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(f"{name}-{time.time_ns()}")
    return client, experiment_id, client.create_run(experiment_id, run_name="search").info.run_id


def test_resume_adopts_or_retires_the_runs_of_trials_tune_lost(tmp_path: Path, mlflow_server: str) -> None:
    """Every kill point at once: Tune's snapshot held trial a only; b, c, d, e were lost with the driver."""
    import pickle

    from search.callback import ORPHAN_TAG, REPLAYS_TAG, MlflowTrialCallback
    from search.trainable import ENDED_FILE, parse_ended

    client, experiment_id, parent = _lost_trials_parent(mlflow_server, "csl-test-lost")
    first = MlflowTrialCallback(mlflow_server, experiment_id, parent, metric="ssl_loss", max_epochs=2)
    lrs = (1e-3, 2e-3, 3e-3, 4e-3, 5e-3)
    a, b, c, d, e = (_Trial(f"{x}0000000", _config(lr), tmp_path) for x, lr in zip("abcde", lrs))
    first.on_step_begin(0, [])
    for trial in (a, b, c, d, e):
        first.on_trial_start(0, [], trial)
    a.report(first, 1)
    c.report(first, 1)  # c: stopped by the scheduler at epoch 1 ...
    c.end(first)  # ... before any snapshot held it
    d.report(first, 1)  # d: an epoch logged, not yet in a snapshot
    # b: started, nothing reported; e: started, and the resumed searcher proposes another config in its place
    runs = {t.trial_id: first.find_run(t.trial_id) for t in (a, b, c, d, e)}
    assert runs["c0000000"].info.status == "FINISHED" and runs["b0000000"].info.status == "RUNNING"

    # The driver dies (no on_experiment_end); the resumed driver unpickles the callback and restores a only.
    second = pickle.loads(pickle.dumps(first))
    replays = {
        "b": _Trial("b1111111", _config(2e-3), tmp_path),
        "c": _Trial("c1111111", _config(3e-3), tmp_path),
        "d": _Trial("d1111111", _config(4e-3), tmp_path),
        "f": _Trial("f1111111", _config(6e-3), tmp_path),
    }
    second.on_step_begin(0, [a])
    for trial in (a, *replays.values()):
        second.on_trial_start(0, [], trial)
    ended = parse_ended((tmp_path / ENDED_FILE).read_text())
    assert set(ended) == {"c1111111"} and ended["c1111111"]["epoch"] == 1  # c's replay repeats c's end
    replays["c"].report(second, 1)  # what the trainable reports for it
    for trial in (a, replays["b"], replays["d"], replays["f"]):
        for epoch in (1, 2):
            trial.report(second, epoch)
    for trial in (a, *replays.values()):
        trial.end(second)
    final = [a, *replays.values()]
    second.on_experiment_end(final)

    kids = {k.data.tags["csl.trial_id"]: k for k in children(client, parent)}
    assert set(kids) == {t.trial_id for t in final}  # one child per trial of the final experiment
    assert all(k.info.status != "RUNNING" for k in kids.values())
    for lost in "bcd":
        kid = kids[f"{lost}1111111"]
        assert kid.info.run_id == runs[f"{lost}0000000"].info.run_id  # the replay continued the lost trial's run
        assert kid.data.tags[REPLAYS_TAG] == f"{lost}0000000" and kid.info.run_name == f"simclr·resnet50·last_vector·cosine·infonce·{lost}111"
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "ssl_loss")]
        assert steps == [1] if lost == "c" else steps == [1, 2], (lost, steps)
    assert kids["c1111111"].info.end_time == runs["c0000000"].info.end_time  # its end stands untouched
    assert kids["c1111111"].data.tags["csl.status"] == "stopped"
    assert kids["b1111111"].data.tags["csl.status"] == kids["d1111111"].data.tags["csl.status"] == "finished"
    assert kids["f1111111"].info.run_id not in {r.info.run_id for r in runs.values()}

    retired = client.get_run(runs["e0000000"].info.run_id)  # no replay proposed e's config: to MLflow's trash
    assert retired.info.lifecycle_stage == "deleted" and retired.info.status == "KILLED"
    assert retired.data.tags["csl.status"] == "interrupted" and "e0000000" in retired.data.tags[ORPHAN_TAG]


def test_an_interrupted_resume_keeps_lost_runs_for_the_next_one(tmp_path: Path, mlflow_server: str) -> None:
    import pickle

    from search.callback import ORPHAN_TAG, MlflowTrialCallback

    client, experiment_id, parent = _lost_trials_parent(mlflow_server, "csl-test-lost-twice")
    first = MlflowTrialCallback(mlflow_server, experiment_id, parent, metric="ssl_loss", max_epochs=2)
    a, b = _Trial("a0000000", _config(1e-3), tmp_path), _Trial("b0000000", _config(2e-3), tmp_path)
    first.on_step_begin(0, [])
    first.on_trial_start(0, [], a)
    first.on_trial_start(0, [], b)
    lost = first.find_run("b0000000").info.run_id

    second = pickle.loads(pickle.dumps(first))  # restores a only, then is interrupted (Ctrl-C) with a unfinished
    second.on_step_begin(0, [a])
    second.on_trial_start(0, [], a)
    second.on_experiment_end([a])
    run = client.get_run(lost)
    # marked interrupted (MLflow SCHEDULED), not retired: the search is not complete and a later resume may adopt it
    assert run.info.status == "SCHEDULED" and run.info.lifecycle_stage == "active" and ORPHAN_TAG not in run.data.tags

    third = pickle.loads(pickle.dumps(first))  # the next resume: b's config is proposed again and adopts its run
    replay = _Trial("b2222222", _config(2e-3), tmp_path)
    third.on_step_begin(0, [a])
    third.on_trial_start(0, [], a)
    third.on_trial_start(0, [], replay)
    assert client.get_run(lost).info.status == "RUNNING"
    for trial in (a, replay):
        trial.report(third, 2)
        trial.end(third)
    third.on_experiment_end([a, replay])
    kids = children(client, parent)
    assert {k.data.tags["csl.trial_id"] for k in kids} == {"a0000000", "b2222222"}
    assert {k.info.status for k in kids} == {"FINISHED"}


def test_resume_retires_a_run_left_running_for_a_trial_tune_never_held(tmp_path: Path, mlflow_server: str) -> None:
    """The real resume: a RUNNING child run whose trial no snapshot held and no replay proposes ends up in the trash."""
    from mlflow import MlflowClient

    from search.callback import ORPHAN_TAG
    from search.cli import main
    from search.tracking import CONFIG_TAG, config_fingerprint

    space = write_space(tmp_path, LOST_SPACE, "t_lost")
    folder = tmp_path / "runs" / "lost"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main([
            "run", str(space), "--searcher", "grid", "--scheduler", "fifo", "--storage", str(tmp_path / "runs"),
            "--name", "lost", "--mlflow-uri", mlflow_server, "--experiment", "csl-test-lost-resume", "--num-cpus", "2",
            "--quiet",
        ])  # fmt: skip
    assert code == 0
    state = json.loads((folder / "csl_search.json").read_text())
    client, parent = MlflowClient(mlflow_server), state["parent_run_id"]
    # What a driver killed after a trial's on_trial_start leaves when no snapshot reached storage with that trial.
    tags = {"mlflow.parentRunId": parent, "csl.trial_id": "lost0000", "csl.status": "running",
            CONFIG_TAG: config_fingerprint({"lr": 2.0e-3})}  # fmt: skip
    orphan = client.create_run(state["experiment_id"], run_name="csl_trial_lost0000", tags=tags).info.run_id
    client.log_metric(orphan, "ssl_loss", 5.0, step=1)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["resume", str(folder)])
    assert code == 0, out.getvalue()
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    kids = children(client, parent)
    assert len(rows) == 2 and {k.data.tags["csl.trial_id"] for k in kids} == {r["trial_id"] for r in rows}
    assert all(k.info.status != "RUNNING" for k in kids)
    run = client.get_run(orphan)
    assert run.info.lifecycle_stage == "deleted" and run.info.status == "KILLED"
    assert "lost0000" in run.data.tags[ORPHAN_TAG]
    assert client.get_run(parent).info.status == "FINISHED"
