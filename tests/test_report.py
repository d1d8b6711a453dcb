"""One meaning of "best" across every command, and the report each search writes as it ends, on a real MLflow
server (``mlflow_server``), real Ray Tune and ``csl-search run`` in-process.

One search, ``scripted``: the whole ``csl-search run`` path (grid searcher, FIFO, MLflow callback, results tables,
report, parent run) with the trainer replaced by a function that reports fixed curves, because no real trainer can
be made to peak before its last epoch on demand. The curves make the best-epoch ranking and the last-epoch ranking
name different trials, and two trials tie on their best value: the final table, ``compare``, the report and the
parent's tag must all follow the one rule, checked against a plain transcription of it over MLflow's histories. The
same search's report must show its budget, grace period, scheduler and data, and the early-stopping check computed
(checked against scipy on MLflow's histories). The report of a search with the real trainer (ASHA) is checked on
``tests/test_search.py``'s main search, which is run anyway.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.conftest import local_ray
from tests.helpers import table_with, transcribed_best, transcribed_order

pytestmark = pytest.mark.slow

TOL = 6e-5  # the report prints 4 decimals
# lr picks the curve (knn_acc per epoch), similarity "dot" shifts it down by 0.05. Best epoch vs last: cosine
# "early" is best (0.5 at epoch 1) but ends lowest; cosine "late" ends highest (0.45) and so wins a last-epoch
# ranking; dot "early" reaches 0.45 too, at an earlier epoch than cosine "late", so it ranks above it; "never"
# diverges at once and has no value.
CURVES = {
    1.0e-3: [0.50, 0.30, 0.20],  # early
    4.0e-3: [0.10, 0.30, 0.45],  # late
    5.0e-3: [math.nan],  # never
}
SHIFT = {"cosine": 0.0, "dot": -0.05}
SCRIPTED_SPACE = """\
name: t_best
metric: knn_acc
mode: max
budget: {epochs: 3, grace_period: 1, reduction_factor: 2}
fixed: {method: simclr, data: cifar10-mini, train_limit: 64, test_limit: 32}
params:
  similarity: {choice: [cosine, dot]}
  lr: {choice: [1.0e-3, 4.0e-3, 5.0e-3]}
"""


def scripted_trial(config: dict[str, Any]) -> None:
    """A trainable that reports ``CURVES[lr]`` + ``SHIFT[similarity]`` as its knn_acc, one epoch at a time (NaN:
    diverged)."""
    from ray import tune

    for epoch, value in enumerate(CURVES[config["lr"]], start=1):
        value += SHIFT[config["similarity"]]
        diverged = not math.isfinite(value)
        result = {"epoch": epoch, "knn_acc": value, "ssl_loss": 4.0 - epoch, "probe_acc": value,
                  "images_per_s": 100.0, "epoch_time": 0.1, "diverged": int(diverged)}
        tune.report({**result, "error": "scripted divergence"} if diverged else result)
        if diverged:
            return


def csl_search(*args: str) -> tuple[int, str]:
    from search.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def run_space(folder: Path, text: str, name: str, uri: str) -> dict[str, Any]:
    import json

    from mlflow import MlflowClient

    space = folder / f"{name}.yaml"
    space.write_text(text)
    # A cold server's first answer can take longer than the 5 s csl-search allows itself on a loaded machine.
    MlflowClient(uri).search_experiments(max_results=1)
    code, out = csl_search("run", str(space), "--searcher", "grid", "--scheduler", "fifo", "--storage",
                           str(folder / "runs"), "--name", name, "--mlflow-uri", uri, "--experiment",
                           f"csl-test-{name}", "--quiet")
    assert code == 0, out
    path = folder / "runs" / name
    client = MlflowClient(uri)
    parent = client.get_run(json.loads((path / "csl_search.json").read_text())["parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {"out": out, "path": path, "client": client, "parent": parent, "kids": kids, "uri": uri}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, mlflow_server) -> dict[str, Any]:
    import search.run
    from ray import tune

    with local_ray(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(search.run, "_trainable",
                      lambda resources, *score: tune.with_resources(scripted_trial, dict(resources)))
        return run_space(tmp_path_factory.mktemp("scripted"), SCRIPTED_SPACE, "scripted", mlflow_server)


def histories(search: dict[str, Any], metric: str) -> dict[str, dict[int, float]]:
    """trial id -> {epoch: value} of ``metric``, as MLflow stores each child run's history."""
    client = search["client"]
    return {kid.data.tags["csl.trial_id"]: {m.step: m.value for m in client.get_metric_history(kid.info.run_id, metric)}
            for kid in search["kids"]}


def printed_table(text: str, after: str) -> list[list[str]]:
    """The rows (as words) of the fixed-width table that follows the line starting with ``after``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after)) + 3  # its header, then dashes
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


# ------------------------------------------------------------------------------------------------ one best


def test_every_command_names_the_same_best_trial(scripted: dict[str, Any], tmp_path: Path) -> None:
    curves = histories(scripted, "knn_acc")
    expected = transcribed_order(curves, "max")
    last = {t: h[max(h)] for t, h in curves.items() if h and math.isfinite(h[max(h)])}
    by_last = sorted(last, key=lambda t: -last[t])
    assert by_last[0] != expected[0], "the curves must make best and last epochs disagree"
    values = [transcribed_best(h, "max") for h in curves.values()]
    assert len({v for _, v in filter(None, values)}) < len(list(filter(None, values))), "and two best values tie"
    first = expected[0]
    assert min(curves[first]) < max(curves[first]) and curves[first][1] == 0.5  # peaks before its last epoch

    # the table the search printed
    assert [row[1] for row in printed_table(scripted["out"], "ranked by best knn_acc (max):")] == expected
    # results.parquet
    rows = {r["trial_id"]: r for r in pq.read_table(scripted["path"] / "results.parquet").to_pylist()}
    for trial, history in curves.items():
        found = [(e, v) for e, v in history.items() if math.isfinite(v)]
        if found:
            epoch = min(e for e, v in found if v == max(v for _, v in found))
            assert (rows[trial]["best_epoch"], rows[trial]["best_knn_acc"]) == (epoch, history[epoch])
            assert rows[trial]["last_knn_acc"] == history[max(history)]
        else:
            assert rows[trial]["best_epoch"] is None and rows[trial]["status"] == "diverged"
    # the parent run
    parent = scripted["client"].get_run(scripted["parent"].info.run_id)
    assert parent.data.tags["csl.best_trial"] == first and parent.data.tags["csl.best_epoch"] == "1"
    assert parent.data.metrics["best_knn_acc"] == 0.5 and parent.data.metrics["best_epoch"] == 1
    assert parent.data.tags["csl.best_run_id"] == rows[first]["mlflow_run_id"]
    # csl-search compare
    code, out = csl_search("compare", "--mlflow-uri", scripted["uri"], "--parent-run", parent.info.run_id)
    assert code == 0
    assert [row[1] for row in printed_table(out, "top 6 configurations:")] == expected
    # the report the search wrote as it ended, logged to the parent, and the same report written again
    written = (scripted["path"] / "report" / "report.md").read_text()
    logged = {Path(a.path).name for a in scripted["client"].list_artifacts(parent.info.run_id, "report")}
    assert "report.md" in logged
    code, _ = csl_search("report", parent.info.run_id, "--mlflow-uri", scripted["uri"], "--out", str(tmp_path),
                         "--no-log", "--resamples", "500")
    assert code == 0
    for report in (written, (tmp_path / "report.md").read_text()):
        assert [r["trial"] for r in table_with(report, "rank", "trial")] == expected
        assert f"Best trial: **{first}**" in report and "at epoch 1 of 3" in report


# ------------------------------------------------------------------------------------------------ the report


def test_a_plain_search_reports_its_budget_and_early_stopping_check(scripted: dict[str, Any]) -> None:
    from scipy.stats import spearmanr

    client, parent = scripted["client"], scripted["parent"]
    params = parent.data.params
    assert {k: params[k] for k in ("budget.epochs", "budget.grace_period", "budget.num_samples", "scheduler")} == {
        "budget.epochs": "3", "budget.grace_period": "1", "budget.num_samples": "6", "scheduler": "fifo"}
    assert (params["data"], params["train_limit"], params["test_limit"]) == ("cifar10-mini", "64", "32")
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["cifar10-mini"]
    assert f"report:  {scripted['path'] / 'report' / 'report.md'}" in scripted["out"]
    report = (scripted["path"] / "report" / "report.md").read_text()
    assert "scheduler fifo" in report and "budget 3 epochs per trial" in report and "6 samples" in report
    assert "grace period 1 epoch(s)" in report and "data: cifar10-mini (train_limit 64, test_limit 32)" in report
    curves = {t: {e: v for e, v in h.items() if math.isfinite(v)} for t, h in histories(scripted, "knn_acc").items()}
    past = [h for h in curves.values() if h and max(h) > 1]  # the trials that ran past the grace period
    assert len(past) == 4
    rho = spearmanr([h[1] for h in past], [h[max(h)] for h in past]).statistic
    match = re.search(r"rho = (-?[0-9.]+) over (\d+) trials", report)
    assert match and int(match.group(2)) == 4 and float(match.group(1)) == pytest.approx(rho, abs=6e-4)
    # the marginal effect of each similarity, over the trials' best values, with its interval
    best = {kid.data.params["similarity"]: [] for kid in scripted["kids"]}
    for kid in scripted["kids"]:
        history = curves[kid.data.tags["csl.trial_id"]]
        if history:
            best[kid.data.params["similarity"]].append(max(history.values()))
    shown = {r["similarity"]: r for r in table_with(report, "similarity", "runs", "mean", "95% CI")}
    for value, values in best.items():
        assert (int(shown[value]["runs"]), int(shown[value]["failed"])) == (2, 1)
        assert float(shown[value]["mean"]) == pytest.approx(sum(values) / 2, abs=TOL)
        low, high = (float(x) for x in shown[value]["95% CI"].strip("[]").split(", "))
        assert min(values) - TOL <= low <= high <= max(values) + TOL
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "search_marginals.png", "search_early_stopping.png"} <= logged


def test_results_parquet_carries_the_resolved_config(scripted: dict[str, Any]) -> None:
    from csl.metrics import EPOCH_METRICS

    table = pq.read_table(scripted["path"] / "results.parquet")
    names = table.column_names
    assert names[:3] == ["trial_id", "trial_name", "status"]
    assert names[names.index("mlflow_run_id") + 1:][:2] == ["similarity", "lr"]  # the searched keys, then the rest
    rest = names[names.index("lr") + 1:]
    assert rest == sorted(rest) and not set(names) & set(EPOCH_METRICS)
    row = table.to_pylist()[0]
    kid = next(k for k in scripted["kids"] if k.data.tags["csl.trial_id"] == row["trial_id"])
    for key, text in kid.data.params.items():  # every param MLflow holds is a column, with the same value
        column = "config.epochs" if key == "epochs" else key
        assert column in names, key
        if not text.startswith("["):  # a list is JSON in MLflow, its repr in the table
            assert str(row[column]) == text, key
    assert row["config.epochs"] == 3 == row["planned_epochs"] and row["augment"] == "simclr"


def test_a_report_that_cannot_be_written_never_fails_the_search(scripted: dict[str, Any], tmp_path: Path) -> None:
    from search.report.build import WARNING_TAG, end_of_search_report

    blocked = tmp_path / "a-file"
    blocked.write_text("the report folder cannot be made under a file")
    run_id = scripted["parent"].info.run_id
    assert end_of_search_report(scripted["uri"], run_id, str(blocked)) is None
    warning = scripted["client"].get_run(run_id).data.tags[WARNING_TAG]
    assert warning.startswith("the report of this search was not written: ") and "a-file" in warning
    code, _ = csl_search("report", "no-such-run-or-experiment", "--mlflow-uri", scripted["uri"], "--no-log")
    assert code == 2
