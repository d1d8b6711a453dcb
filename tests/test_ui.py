"""What a user sees: the terminal while a search runs, and MLflow 3's UI afterwards.

One search (three trials, ASHA, ``python -m search run`` with its output to pipes, against the MLflow server) is
shared by every test: the progress lines and what stays off the terminal, the run names and statuses, the names
of metrics, params and columns, the system metrics, and (where chromium is installed) the real UI rendered
headless. Set ``CSL_SCREENSHOTS=DIR`` to keep the screenshots (docs/screenshots/ holds the committed ones).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, search_env
from tests.helpers import transcribed_order

DESCRIPTION = "UI test: two triplet trials and an InfoNCE one that ASHA stops at epoch 1."

# Launched in this order, two at a time: the two triplet trials report an SSL loss of about 0.8 at epoch 1, the
# InfoNCE trial about 4, so at the one rung (reduction factor 4) it is stopped for sure (as in test_search.py).
UI_SPACE = f"""\
name: t_ui
description: "{DESCRIPTION}"
metric: ssl_loss
mode: min
budget: {{epochs: 2, grace_period: 1, reduction_factor: 4}}
fixed:
  encoder: resnet18
  width: 0.0625
  proj_dim: 16
  proj_hidden: 32
  batch_size: 32
  train_limit: 128
  test_limit: 64
  seed: 0
  device: cpu
base: {{method: simclr, loss: triplet, similarity: cosine, optimizer: adam, lr: 1.0e-3, data: cifar10-mini}}
variants:
  - {{name: lr3, lr: 3.0e-3}}
  - {{name: infonce, loss: infonce}}
"""


@pytest.fixture(scope="module")
def ui_search(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("ui")
    space = folder / "t_ui.yaml"
    space.write_text(UI_SPACE)
    out = subprocess.run(
        [sys.executable, "-m", "search", "run", str(space), "--searcher", "grid", "--storage", str(folder / "runs"),
         "--name", "ui", "--mlflow-uri", mlflow_server, "--experiment", "csl-test-ui", "--num-cpus", "2",
         "--progress-every", "2"],
        cwd=REPO, env=search_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    path = folder / "runs" / "ui"
    state = json.loads((path / "csl_search.json").read_text())
    client = MlflowClient(mlflow_server)
    kids = client.search_runs([state["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")  # fmt: skip
    return {"out": out.stdout, "err": out.stderr, "path": path, "state": state, "client": client, "kids": kids,
            "uri": mlflow_server}  # fmt: skip


def _history(path: Path) -> dict[str, dict[int, float]]:
    rows = pq.read_table(path / "history.parquet").to_pylist()
    histories: dict[str, dict[int, float]] = {}
    for row in rows:
        histories.setdefault(row["trial_id"], {})[row["epoch"]] = row["ssl_loss"]
    return histories


def test_progress_lines_on_a_pipe_count_trials_and_show_the_best(ui_search: dict[str, Any]) -> None:
    err = ui_search["err"]
    assert "\r" not in err  # not a terminal: lines, never rewritten in place
    lines = [line for line in err.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 4, err  # every 2 s, and at each of the three trial ends
    assert re.match(r"progress: trials 0/3 ended \(0 finished, 0 stopped, 0 failed\), \d running, \d pending", lines[0])
    final = lines[-1]
    assert "trials 3/3 ended (2 finished, 1 stopped, 0 failed), 0 running, 0 pending" in final, final
    results = pq.read_table(ui_search["path"] / "results.parquet").to_pylist()
    epochs = sum(row["epochs"] for row in results)
    assert epochs == 2 + 2 + 1 and f"epochs {epochs}/{epochs}" in final
    histories = _history(ui_search["path"])
    leader = transcribed_order(histories, "min")[0]
    value = min(v for v in histories[leader].values())
    epoch = min(e for e, v in histories[leader].items() if v == value)
    assert re.search(rf"best ssl_loss {value:.4g} \([^)]*·{leader[:4]}, epoch {epoch}\)", final), final
    ends = [line for line in err.splitlines() if line.startswith("trial ")]
    assert len(ends) == 3 and sum(" stopped after 1/2 epochs" in line for line in ends) == 1, ends
    done = [int(re.search(r"trials (\d)/3 ended", line).group(1)) for line in lines]
    assert done == sorted(done)  # counts only grow


def test_terminal_has_no_checkpoint_or_view_run_lines_the_log_file_has(ui_search: dict[str, Any]) -> None:
    terminal = ui_search["out"] + ui_search["err"]
    assert "Checkpoint successfully created" not in terminal
    assert "View run" not in terminal and "View experiment" not in terminal
    assert "Current best trial" not in terminal and "╭" not in terminal  # no Ray boxes without -v
    log = (ui_search["path"] / "search.log").read_text()
    assert log.count("Checkpoint successfully created") == 5  # one per epoch: 2 + 2 + 1
    assert log.count("MLflow run http") == 3
    assert f"log:     {ui_search['path'] / 'search.log'}" in ui_search["out"]


def test_the_printed_link_opens_the_runs_view(ui_search: dict[str, Any]) -> None:
    experiment_id = ui_search["state"]["experiment_id"]
    link = f"{ui_search['uri']}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert f"open it: {link}" in ui_search["out"]


def test_runs_are_named_by_their_aspects_and_stopped_ones_are_finished(ui_search: dict[str, Any]) -> None:
    kids = ui_search["kids"]
    assert len(kids) == 3
    by_variant = {kid.data.params["variant"]: kid for kid in kids}
    for variant, loss in (("base", "triplet"), ("lr3", "triplet"), ("infonce", "infonce")):
        kid = by_variant[variant]
        trial_id = kid.data.tags["csl.trial_id"]
        # simclr's preset (augment simclr, extract last_vector), the space's encoder, similarity and loss
        assert kid.info.run_name == f"simclr·resnet18·last_vector·cosine·{loss}·{trial_id[:4]}"
        assert kid.data.tags["csl.trial_name"] == f"csl_trial_{trial_id}"  # Tune's name, as its folder has it
    stopped = by_variant["infonce"]
    assert stopped.data.tags["csl.status"] == "stopped" and stopped.info.status == "FINISHED"
    assert {by_variant[v].data.tags["csl.status"] for v in ("base", "lr3")} == {"finished"}
    experiment = ui_search["client"].get_experiment(ui_search["state"]["experiment_id"])
    assert experiment.tags["mlflow.note.content"] == DESCRIPTION


def test_no_metric_shares_a_name_with_a_param_or_a_column(ui_search: dict[str, Any]) -> None:
    client, state = ui_search["client"], ui_search["state"]
    runs = [*ui_search["kids"], client.get_run(state["parent_run_id"])]
    for run in runs:
        clash = set(run.data.params) & set(run.data.metrics)
        assert not clash, (run.info.run_name, clash)
    results = set(pq.read_schema(ui_search["path"] / "results.parquet").names)
    history = set(pq.read_schema(ui_search["path"] / "history.parquet").names)
    assert results & history == {"trial_id"}  # the join key, nothing else
    metrics = set().union(*(run.data.metrics for run in ui_search["kids"]))
    assert not metrics & results  # a metric and a results.parquet column never share a name


def test_system_metrics_are_logged_on_trial_runs(ui_search: dict[str, Any]) -> None:
    import psutil

    client = ui_search["client"]
    total_mb = psutil.virtual_memory().total / 1e6
    for kid in ui_search["kids"]:
        if kid.data.tags["csl.status"] != "finished":
            continue
        history = client.get_metric_history(kid.info.run_id, "system/cpu_utilization_percentage")
        assert history and all(0 <= m.value <= 100 for m in history)
        memory = client.get_metric_history(kid.info.run_id, "system/system_memory_usage_megabytes")
        assert memory and all(0 < m.value <= total_mb * 1.01 for m in memory)


def test_printer_rewrites_one_line_on_a_terminal() -> None:
    from search.progress import Printer

    stream = io.StringIO()
    printer = Printer(stream, tty=True)
    printer.live("a")
    printer.live("b")
    printer.line("trial x ended")
    printer.done()
    assert stream.getvalue() == "\r\033[Ka\r\033[Kb\r\033[Ktrial x ended\nb\n"


def test_a_stuck_mlflow_call_is_a_warning_in_the_progress_line() -> None:
    from search.progress import STALL_S, CallWatch, Printer, Progress

    watch = CallWatch()
    progress = Progress(total=2, max_epochs=1, metric="knn_acc", mode="max", printer=Printer(io.StringIO()),
                        watch=watch)  # fmt: skip
    watch.begin()
    assert "WARNING" not in progress.text()
    assert "MLflow not answering" in progress.text(now=watch.busy_since + STALL_S + 5)
    watch.end(RuntimeError("API request to http://127.0.0.1:1/api failed"))
    assert "MLflow error: API request" in progress.text()


# ------------------------------------------------------------------------------------------------ the real UI


def _chromium(url: str, *args: str) -> str:
    out = subprocess.run(
        [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--window-size=1600,900", "--virtual-time-budget=20000", *args, url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    return out.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_mlflow_ui_shows_runs_a_child_run_and_the_compare_view(ui_search: dict[str, Any], tmp_path: Path) -> None:
    state, kids, uri = ui_search["state"], ui_search["kids"], ui_search["uri"]
    keep = Path(os.environ["CSL_SCREENSHOTS"]) if os.environ.get("CSL_SCREENSHOTS") else tmp_path
    keep.mkdir(parents=True, exist_ok=True)
    experiment_id = state["experiment_id"]
    runs = f"{uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    child = next(k for k in kids if k.data.tags["csl.status"] == "stopped")
    child_page = f"{uri}/#/experiments/{experiment_id}/runs/{child.info.run_id}?workflowType=machine_learning"
    ids = json.dumps([k.info.run_id for k in kids])
    compare = f"{uri}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([experiment_id]))}"

    dom = _chromium(runs, "--dump-dom")
    assert "ui" in dom and "Model training" in dom  # the parent run "ui" in the runs table, not the Traces landing
    assert "No data available" not in dom and DESCRIPTION in dom
    dom = _chromium(child_page, "--dump-dom")
    assert child.info.run_name in dom and "csl.status" in dom and "stopped" in dom
    dom = _chromium(compare, "--dump-dom")
    assert all(k.info.run_name in dom for k in kids)
    for name, url in (("runs-view", runs), ("child-run", child_page), ("compare-view", compare)):
        _chromium(url, f"--screenshot={keep / (name + '.png')}")
        assert (keep / f"{name}.png").stat().st_size > 10_000
