"""``csl-search report <experiment name | run id>``: read a study (or any search) back from MLflow and write a
Markdown report with tables and PNG plots, logged to the run as artifacts under ``report/``.

Everything comes from the tracking store, never from the Ray folders: the study run's ``study.json`` (the design:
which key is the combination, which are the conditions, the grace period, the refused cells), its stage runs
(tag ``csl.stage``), their trial runs (params under the flat config names, tag ``csl.status``) and each trial's
metric history. A run's score is its metric at its LAST epoch (the model the budget produced; the best epoch
would be chosen on the test set). Failed and diverged runs have no score and are counted as failed.

Given a plain search run (``csl-search run``, no study), the report ranks its trials and shows the marginal
effect of each design choice and the early-stopping check.

Python: ``write_report(tracking_uri, target, out_dir)``; command line: ``main(argv)`` (``python -m
experiments.report``), or ``csl-search report`` once search/cli.py forwards to ``add_arguments`` / ``run``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    MIN_SEEDS_FOR_WINNER,
    EarlyStoppingCheck,
    Verdict,
    cell_table,
    early_stopping_check,
    marginal_table,
    rank,
    robustness_table,
)

STUDY_TAG = "csl.study"
STAGE_TAG = "csl.stage"
SEARCH_TAG = "csl.search"
PARENT_TAG = "mlflow.parentRunId"
STATUS_TAG = "csl.status"
TRIAL_TAG = "csl.trial_id"
STUDY_FILE = "study.json"
ASPECTS = ("augment", "encoder", "extract", "similarity", "loss")
FAILED = ("failed", "diverged")
METRIC_LABELS = {
    "knn_acc": "kNN accuracy (fraction)",
    "probe_acc": "online linear-probe accuracy (fraction)",
    "loss": "SSL loss (nats)",
}
CONDITION_NAMES = {"encoder": "encoders", "extract": "extraction strategies", "encoder / extract":
                   "encoder × extraction pairs"}
SCORE_WHY = (
    "Ranked by the **worst case** over conditions: a robust design is one that stays good whatever the user picks, "
    "which is a statement about the minimum, not the average. The mean rewards a design that is excellent on one "
    "condition and poor on another; the spread alone rewards a design that is uniformly poor (chance everywhere "
    "has zero spread). Mean and spread are shown beside it."
)


class ReportError(LookupError):
    """The run or experiment asked for does not exist, or holds nothing to report."""


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


# ------------------------------------------------------------------------------------------------ reading MLflow


@dataclass
class Stage:
    name: str
    run: Any
    info: dict[str, Any]
    runs: pd.DataFrame  # one row per trial run
    history: pd.DataFrame  # trial, epoch, value


@dataclass
class Loaded:
    tracking_uri: str
    run: Any  # the study run, or the search run
    experiment_name: str
    design: dict[str, Any]
    stages: dict[str, Stage] = field(default_factory=dict)


def find_run(client: Any, target: str) -> Any:
    """A run by id, else the latest study run (or, without one, the latest search run) of an experiment by name."""
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        try:
            return client.get_run(target)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for a bad id
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise ReportError(f"'{target}' is neither a run id nor an experiment name "
                              f"({str(exc).splitlines()[0][:200]}); experiments: {', '.join(names)}") from None
    for tag in (STUDY_TAG, SEARCH_TAG):
        found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{tag}` LIKE '%'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    raise ReportError(f"experiment '{target}' holds no study or search run")


def _children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=50_000)


def _number(text: Any) -> Any:
    """An MLflow param (a string) as int / float where it is one."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def load_trials(client: Any, experiment_id: str, parent_id: str, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of the trial runs under ``parent_id``: params, status, epochs run, last-epoch value."""
    rows, history = [], []
    for run in _children(client, experiment_id, parent_id):
        run_id = run.info.run_id
        points: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, metric):
            if m.value is None or not math.isfinite(m.value):
                continue
            if m.step not in points or m.timestamp >= points[m.step][0]:
                points[m.step] = (m.timestamp, float(m.value))
        steps = sorted(points)
        history += [{"trial": run_id, "epoch": s, "value": points[s][1]} for s in steps]
        status = run.data.tags.get(STATUS_TAG, run.info.status.lower())
        value = points[steps[-1]][1] if steps and status not in FAILED else math.nan
        row = {"run_id": run_id, "trial_id": run.data.tags.get(TRIAL_TAG, run_id), "status": status,
               "epochs": steps[-1] if steps else 0, "value": value,
               "best": max((p[1] for p in points.values()), default=math.nan),
               "error": run.data.tags.get("csl.error", "")}
        for key, text in run.data.params.items():
            row.setdefault(key, _number(text))
        rows.append(row)
    runs = pd.DataFrame(rows)
    if len(runs):
        runs = runs.sort_values("trial_id").reset_index(drop=True)
    return runs, pd.DataFrame(history, columns=["trial", "epoch", "value"])


def _study_design(client: Any, run: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="csl-report-") as folder:
        try:
            path = client.download_artifacts(run.info.run_id, STUDY_FILE, folder)
        except Exception as exc:  # noqa: BLE001
            raise ReportError(f"study run {run.info.run_id} has no {STUDY_FILE}: {exc}") from None
        return json.loads(Path(path).read_text())


def load(tracking_uri: str, target: str) -> Loaded:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = find_run(client, target)
    experiment_id = run.info.experiment_id
    experiment_name = client.get_experiment(experiment_id).name
    tags = run.data.tags
    if STUDY_TAG in tags:
        design = _study_design(client, run)
        loaded = Loaded(tracking_uri, run, experiment_name, design)
        metric = design.get("metric", "knn_acc")
        for child in _children(client, experiment_id, run.info.run_id):
            stage = child.data.tags.get(STAGE_TAG)
            if stage is None:
                continue
            runs, history = load_trials(client, experiment_id, child.info.run_id, metric)
            loaded.stages[stage] = Stage(stage, child, dict(design.get("stages", {}).get(stage, {})), runs, history)
        if not loaded.stages:
            raise ReportError(f"study run {run.info.run_id} has no stage runs (did its searches start?)")
        return loaded
    if SEARCH_TAG not in tags:
        raise ReportError(f"run {run.info.run_id} is neither a study run ({STUDY_TAG}) nor a search ({SEARCH_TAG})")
    metric = tags.get("csl.metric", "knn_acc")
    params = run.data.params
    design = {"kind": "search", "title": f"Search {run.info.run_name}", "metric": metric,
              "mode": tags.get("csl.mode", "max"), "stages": {"search": {
                  "role": "search", "scheduler": params.get("scheduler", "?"), "searcher": params.get("searcher", "?"),
                  "grace_period": None, "epochs": _number(params.get("max_epochs", "0"))}}}
    runs, history = load_trials(client, experiment_id, run.info.run_id, metric)
    loaded = Loaded(tracking_uri, run, experiment_name, design)
    loaded.stages["search"] = Stage("search", run, design["stages"]["search"], runs, history)
    return loaded


# ------------------------------------------------------------------------------------------------ formatting


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value).replace("|", "\\|") or "—"


def ci(low: Any, high: Any) -> str:
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return "—"
    return f"[{float(low):.4f}, {float(high):.4f}]"


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` = (key, header). A key ``a|b`` renders the interval [a, b]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _ in columns:
            if "|" in key:
                low, high = key.split("|")
                cells.append(ci(row.get(low), row.get(high)))
            else:
                cells.append(fmt(row.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(table: pd.DataFrame, *, rows: str, cols: str, path: Path, title: str, metric: str,
            not_applicable: set[tuple[str, str]] = frozenset(), row_order: Sequence[str] | None = None,
            row_label: str | None = None) -> Path:
    """Mean value per (row, col) cell, annotated; not-applicable cells grey with "n/a", missing ones "—"."""
    plt = _pyplot()
    pivot = table.pivot_table(index=rows, columns=cols, values="mean", aggfunc="first")
    if row_order is not None:
        pivot = pivot.reindex([r for r in row_order if r in pivot.index])
    data = pivot.to_numpy(dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(2.2 + 1.25 * n_cols, 1.4 + 0.55 * n_rows))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    for i, row in enumerate(pivot.index):
        for j, col in enumerate(pivot.columns):
            value = data[i, j]
            if (str(row), str(col)) in not_applicable:
                text, colour = "n/a", "black"
            elif not math.isfinite(value):
                text, colour = "—", "black"
            else:
                text = f"{value:.3f}"
                colour = "white" if (value - vmin) / (vmax - vmin) < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(n_cols), labels=[str(c) for c in pivot.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_rows), labels=[str(r) for r in pivot.index])
    ax.set_xlabel(cols)
    ax.set_ylabel(row_label or rows)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(metric_label(metric))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robustness_bars(ranked: pd.DataFrame, *, path: Path, title: str, metric: str,
                    row_label: str = "combination") -> Path:
    """Mean and worst case per combination (ranked order), with their bootstrap intervals as error bars."""
    plt = _pyplot()
    names = [str(n) for n in ranked["combination"]]
    x = np.arange(len(names))
    width = 0.38
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(names), 4.2))
    for offset, score, colour in ((-width / 2, "mean", "#4c72b0"), (width / 2, "worst", "#dd8452")):
        values = ranked[score].to_numpy(dtype=float)
        low = ranked[f"{score}_low"].to_numpy(dtype=float)
        high = ranked[f"{score}_high"].to_numpy(dtype=float)
        errors = np.vstack([np.where(np.isfinite(low), values - low, 0.0), np.where(np.isfinite(high), high - values,
                                                                                   0.0)])
        bars = ax.bar(x + offset, np.nan_to_num(values), width, yerr=np.clip(errors, 0, None), capsize=3,
                      color=colour, label=f"{score} over conditions")
        for bar, value in zip(bars, values, strict=True):
            if math.isfinite(value):
                ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90,
                            color="white")
    ax.set_xticks(x, labels=names, rotation=30, ha="right")
    ax.set_ylabel(metric_label(metric))
    ax.set_xlabel(f"{row_label} (ranked by worst case)")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def marginal_plot(marginals: Mapping[str, pd.DataFrame], *, path: Path, title: str, metric: str) -> Path:
    """One panel per aspect: mean value of each of its values over every run that has it, with 95% intervals."""
    plt = _pyplot()
    keys = list(marginals)
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(4.5, 4.2 * n_cols), 3.8 * n_rows + 0.6), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        table = marginals[key].sort_values("mean", ascending=False)
        x = np.arange(len(table))
        means = table["mean"].to_numpy(dtype=float)
        low, high = table["ci_low"].to_numpy(dtype=float), table["ci_high"].to_numpy(dtype=float)
        errors = np.vstack([np.where(np.isfinite(low), means - low, 0), np.where(np.isfinite(high), high - means, 0)])
        ax.errorbar(x, means, yerr=np.clip(errors, 0, None), fmt="o", capsize=4, color="#4c72b0")
        for xi, (value, n) in enumerate(zip(means, table["seeds"], strict=True)):
            if math.isfinite(value):
                ax.annotate(f"{value:.3f}\nn={n}", (xi, value), xytext=(6, 0), textcoords="offset points",
                            fontsize=7, va="center")
        ax.set_xticks(x, labels=[str(v) for v in table[key]], rotation=35, ha="right")
        ax.set_xlim(-0.5, len(table) - 0.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(f"{key} value")
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel(metric_label(metric))
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def early_stopping_plot(check: EarlyStoppingCheck, *, path: Path, title: str, metric: str) -> Path | None:
    if check.trials < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.scatter(check.pairs["at_grace"], check.pairs["final"], color="#4c72b0")
    rho = "undefined" if not math.isfinite(check.rho) else f"{check.rho:.2f}"
    ax.set_title(f"{title}\nSpearman rho = {rho} over {check.trials} trials", fontsize=10)
    ax.set_xlabel(f"{metric_label(metric)} at epoch {check.grace_period} (grace period)")
    ax.set_ylabel(f"{metric_label(metric)} at the last epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class Section:
    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    ranked: pd.DataFrame | None = None
    cells: pd.DataFrame | None = None


def _status_counts(runs: pd.DataFrame) -> str:
    if not len(runs):
        return "no trials"
    counts = runs["status"].value_counts().sort_index()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _varying(runs: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    return [k for k in dict.fromkeys(keys) if k in runs and runs[k].astype(str).nunique() > 1]


def _early_stopping(stage: Stage, metric: str, out: Path, prefix: str, note: str) -> Section:
    section = Section()
    grace = stage.info.get("grace_period")
    if not grace:
        section.lines += ["", f"Early-stopping check: no grace period recorded for stage {stage.name}; skipped."]
        return section
    check = early_stopping_check(stage.history, int(grace))
    section.lines += ["", f"**Early-stopping check** ({note}): {check.text()}."]
    section.headline += ["", f"Early-stopping check, stage {stage.name}: {check.text()}."]
    plot = early_stopping_plot(check, path=out / f"{prefix}_early_stopping.png",
                               title=f"Stage {stage.name}: does the grace-period ranking hold?", metric=metric)
    if plot:
        section.plots.append(plot)
        section.lines += ["", f"![early-stopping check]({plot.name})"]
    return section


def _marginals(frame: pd.DataFrame, keys: Sequence[str], out: Path, prefix: str, title: str, metric: str,
               n_resamples: int, seed: int) -> Section:
    section = Section()
    keys = _varying(frame[np.isfinite(frame["value"].astype(float))], keys)
    if not keys:
        return section
    tables = {k: marginal_table(frame.assign(**{k: frame[k].astype(str)}), k, n_resamples=n_resamples, seed=seed)
              for k in keys}
    section.lines += ["", f"### Marginal effect of each aspect value ({title})", "",
                      "Mean over every run with that value (all other aspects pooled), 95% bootstrap interval over "
                      "those runs. Marginals pool unequal company: read them as a summary, not as a controlled "
                      "comparison."]
    for key, table in tables.items():
        rows = table.sort_values("mean", ascending=False).to_dict("records")
        section.lines += ["", md_table(rows, [(key, key), ("seeds", "runs"), ("mean", "mean"),
                                              ("ci_low|ci_high", "95% CI"), ("failed", "failed")])]
    plot = marginal_plot(tables, path=out / f"{prefix}_marginals.png",
                         title=f"Marginal effect of each aspect value — {title} (mean, 95% bootstrap CI)",
                         metric=metric)
    section.plots.append(plot)
    section.lines += ["", f"![marginal effects]({plot.name})"]
    return section


def robustness_section(stage: Stage, design: Mapping[str, Any], out: Path, *, n_resamples: int, seed: int,
                       labels: Mapping[str, str] | None = None, combination_header: str | None = None) -> Section:
    """Ranking by robustness over the stage's conditions, cells, heatmaps, bars, marginals, early-stopping check."""
    metric = design.get("metric", "knn_acc")
    key = stage.info["combination"]
    conditions = list(stage.info["conditions"])
    header = combination_header or key
    section = Section()
    runs = stage.runs.copy()
    if not len(runs):
        section.lines += ["", "No trial runs."]
        return section
    runs["combination"] = runs[key].astype(str).map(lambda v: (labels or {}).get(v, v))
    for c in conditions:
        runs[c] = runs[c].astype(str)
    frame = runs[["combination", *conditions, "seed", "value", "status"]]
    # Cells that cannot train (refused before launch) are not applicable: neither expected nor missing.
    refused = [item for item in design.get("not_applicable", [])]
    values = {c: sorted(runs[c].unique()) for c in conditions}
    every = [" / ".join(p) for p in _product([values[c] for c in conditions])]
    applicable: dict[str, list[str]] = {}
    na_pairs: set[tuple[str, str]] = set()
    for name in sorted(runs["combination"].unique()):
        blocked = set()
        for item in refused:
            cell = item["cell"]
            if str((labels or {}).get(str(cell.get(key)), cell.get(key))) != name:
                continue
            blocked.add(" / ".join(str(cell.get(c)) for c in conditions))
            for c in conditions:
                na_pairs.add((name, str(cell.get(c))))
        applicable[name] = [c for c in every if c not in blocked]
    table = robustness_table(frame, combination="combination", condition=conditions, applicable=applicable,
                             n_resamples=n_resamples, seed=seed)
    ranked, verdict = rank(table, score="worst")
    section.verdict, section.ranked = verdict, ranked
    cond_name = CONDITION_NAMES.get(" / ".join(conditions), " × ".join(conditions))
    rows = ranked.to_dict("records")
    ranking = md_table(rows, [
        ("rank", "rank"), ("combination", header), ("worst", "worst"), ("worst_low|worst_high", "worst 95% CI"),
        ("mean", "mean"), ("mean_low|mean_high", "mean 95% CI"), ("spread", "spread"),
        ("spread_low|spread_high", "spread 95% CI"), ("conditions", "conditions"), ("min_seeds", "min seeds"),
        ("failed", "failed runs"), ("missing", "missing"),
    ])
    section.headline += [f"Robustness over {cond_name} ({metric_label(metric)} at the last epoch; worst / mean / "
                         "spread over conditions of the per-condition mean over seeds; 95% bootstrap CIs over seeds):",
                         "", ranking, "", verdict.text()]
    section.lines += ["", f"### Ranking by robustness over {cond_name}", "", SCORE_WHY, "", ranking, "",
                      f"**Verdict:** {verdict.text()}."]
    fewer = [(n, len(a)) for n, a in applicable.items() if len(a) < len(every)]
    if fewer:
        note = ("Not every combination can take every condition: " + "; ".join(
            f"{n} is scored over its {k} applicable of {len(every)}" for n, k in fewer)
            + " (see *Not applicable*). A worst case over fewer conditions is a minimum over fewer values, so it "
            "is biased upwards relative to the others: read those rows with that in mind.")
        section.lines += ["", note]
        section.headline += [note]
    # cells
    cells = cell_table(frame, by=["combination", *conditions], n_resamples=n_resamples, seed=seed)
    section.cells = cells
    cell_rows = cells.to_dict("records")
    columns = [("combination", header), *[(c, c) for c in conditions], ("seeds", "seeds"), ("mean", "mean"),
               ("ci_low|ci_high", "95% CI"), ("std", "std"), ("failed", "failed")]
    section.lines += ["", f"### Cells: {header} × {' × '.join(conditions)}", "",
                      "Mean over seeds of the last-epoch value; 95% percentile-bootstrap interval over seeds "
                      f"({n_resamples} resamples). With 2-3 seeds a bootstrap interval is coarse (it spans the "
                      "observed values): more seeds, not more resamples, narrow it.", "", md_table(cell_rows, columns)]
    if refused:
        section.lines += ["", "### Not applicable (refused before launch by `csl.model.build_model`)", ""]
        na_rows = [{**{k: str(v) for k, v in item["cell"].items()}, "reason": item["reason"]} for item in refused]
        cell_keys = list(refused[0]["cell"])
        section.lines.append(md_table(na_rows, [*[(k, k) for k in cell_keys], ("reason", "reason")]))
    order = list(ranked["combination"])
    for c in conditions:
        per = cell_table(frame, by=["combination", c], n_resamples=200, seed=seed)
        pooled = [x for x in conditions if x != c]
        note = f" (pooled over {', '.join(pooled)} and seeds)" if pooled else " (mean over seeds)"
        na = {pair for pair in na_pairs if not pooled or _fully_refused(pair, c, refused, key, labels, values, pooled)}
        plot = heatmap(per, rows="combination", cols=c, path=out / f"{stage.name}_heatmap_{c}.png",
                       title=f"{header} × {c}: {metric_label(metric)} at the last epoch{note}", metric=metric,
                       not_applicable=na, row_order=order, row_label=header)
        section.plots.append(plot)
        section.lines += ["", f"![{header} × {c} heatmap]({plot.name})"]
    plot = robustness_bars(ranked, path=out / f"{stage.name}_robustness.png", metric=metric, row_label=header,
                           title=f"Robustness over {cond_name}: mean and worst case (95% bootstrap CI over seeds)")
    section.plots.append(plot)
    section.lines += ["", f"![robustness bars]({plot.name})"]
    frame_all = runs.assign(**{header: runs["combination"]})
    marg = _marginals(frame_all, [header, *conditions, *ASPECTS], out, stage.name,
                      f"stage {stage.name}", metric, n_resamples, seed)
    es = _early_stopping(stage, metric, out, stage.name,
                         "every run trained the full budget, so this is the ranking ASHA would have used at the "
                         "grace period against the ranking at the end")
    section.lines += marg.lines + es.lines
    section.plots += marg.plots + es.plots
    section.headline += es.headline
    return section


def _product(lists: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    import itertools

    return list(itertools.product(*lists))


def _fully_refused(pair: tuple[str, str], condition: str, refused: Sequence[Mapping[str, Any]], key: str,
                   labels: Mapping[str, str] | None, values: Mapping[str, Sequence[str]], pooled: Sequence[str]
                   ) -> bool:
    """Whether (combination, value of ``condition``) is refused for every value of the pooled conditions."""
    name, value = pair
    blocked = {tuple(str(item["cell"].get(p)) for p in pooled) for item in refused
               if str((labels or {}).get(str(item["cell"].get(key)), item["cell"].get(key))) == name
               and str(item["cell"].get(condition)) == value}
    return len(blocked) >= len(_product([values[p] for p in pooled]))


def search_section(stage: Stage, design: Mapping[str, Any], out: Path, *, n_resamples: int, seed: int,
                   top: int = 15) -> Section:
    """A searched stage: trials ranked by their last value, marginals, early-stopping check on the survivors."""
    metric = design.get("metric", "knn_acc")
    section = Section()
    runs = stage.runs
    info = stage.info
    section.lines += ["", f"{len(runs)} trials ({_status_counts(runs)}); scheduler {info.get('scheduler', '?')}, "
                      f"searcher {info.get('searcher', '?')}, budget {info.get('epochs', '?')} epochs, grace period "
                      f"{info.get('grace_period', '?')}" + (f", one encoder: {info['encoder']}" if info.get("encoder")
                                                           else "") + "."]
    if not len(runs):
        return section
    shown = _varying(runs, [*ASPECTS, "method", "variant", "lr", "temperature"])
    ordered = runs.assign(_done=runs["status"].ne("finished"),
                          _key=-runs["value"].astype(float).fillna(-np.inf)).sort_values(["_done", "_key", "trial_id"])
    rows = [{"rank": i + 1, **r} for i, r in enumerate(ordered.head(top).to_dict("records"))]
    for row in rows:  # learning rates and temperatures span decades: significant digits, not decimals
        for key in ("lr", "temperature"):
            if isinstance(row.get(key), float) and math.isfinite(row[key]):
                row[key] = f"{row[key]:.3g}"
    section.lines += ["", f"Top {len(rows)} trials (finished first, then by the last-epoch value; stopped trials "
                      "show the value at the epoch the scheduler stopped them):", "",
                      md_table(rows, [("rank", "rank"), ("trial_id", "trial"), ("status", "status"),
                                      ("epochs", "epochs"), ("value", f"{metric} (last epoch)"),
                                      *[(k, k) for k in shown]])]
    marg = _marginals(runs, [*ASPECTS, "method"], out, stage.name,
                      f"stage {stage.name}, every trial at its last epoch; the sampler chose which values ran how "
                      "often", metric, n_resamples, seed)
    es = _early_stopping(stage, metric, out, stage.name,
                         "trials that ran past the grace period, i.e. those the scheduler kept - a check biased "
                         "towards agreement, since the pruned ones never show their final value")
    section.lines += marg.lines + es.lines
    section.plots += marg.plots + es.plots
    section.headline += es.headline
    return section


# ------------------------------------------------------------------------------------------------ the report


@dataclass
class ReportResult:
    path: Path
    markdown: str
    headline: str
    plots: list[Path]
    verdict: Verdict | None
    ranked: pd.DataFrame | None
    cells: pd.DataFrame | None
    run_id: str


def _winner_vs_yadim(loaded: Loaded, section: Section, stage: Stage) -> list[str]:
    design = loaded.design
    published = design.get("yadim_published", {})
    labels = design.get("labels", {})
    verdict = section.verdict
    if verdict is None or not verdict.ranked:
        return []
    leader = verdict.winner or verdict.ranked[0]
    runs = stage.runs.assign(combination=stage.runs["variant"].astype(str).map(lambda v: labels.get(v, v)))
    mine = runs[runs["combination"] == leader]
    finite = mine[np.isfinite(mine["value"].astype(float))]
    lines = ["", "## The rediscovered combination next to YADIM", ""]
    if verdict.winner:
        lines.append(f"Winner by worst case over encoder × extraction: **{leader}** ({verdict.reason}).")
    else:
        lines.append(f"No winner can be declared: {', '.join(verdict.tied)} are tied ({verdict.reason}). The table "
                     f"shows the point-estimate leader, **{leader}**, which is NOT established as better than the "
                     "others tied with it.")
    chosen: dict[str, tuple[str, str]] = {}
    for aspect in ("augment", "similarity", "loss"):
        values = mine[aspect].astype(str).unique() if aspect in mine else []
        chosen[aspect] = (", ".join(values) or "?", "its own (fixed for the combination)")
    for aspect in ("encoder", "extract"):
        if len(finite) and aspect in finite:
            means = finite.groupby(finite[aspect].astype(str))["value"].mean().sort_values(ascending=False)
            best = means.index[0]
            how = f"best of {len(means)} evaluated (mean {means.iloc[0]:.4f} over seeds and the other condition)"
            evaluated = [str(v) for v in design.get("encoders" if aspect == "encoder" else "extractions", [])]
            if published.get(aspect) and evaluated and published[aspect] not in evaluated:
                how += f"; {published[aspect]} was not evaluated at this scale"
            chosen[aspect] = (best, how)
        else:
            chosen[aspect] = ("?", "no finished run")
    rows = []
    agree, differ = [], []
    for aspect in ASPECTS:
        value, how = chosen[aspect]
        same = value == published.get(aspect)
        (agree if same else differ).append(aspect)
        rows.append({"aspect": aspect, "found": value, "yadim": published.get(aspect, "?"),
                     "agree": "yes" if same else "no", "how": how})
    lines += ["", md_table(rows, [("aspect", "aspect"), ("found", f"{leader}"), ("yadim", "YADIM (published)"),
                                  ("agree", "agree"), ("how", "how the value was chosen")]), ""]
    lines.append(f"Agrees with YADIM on {len(agree)} of 5 aspects ({', '.join(agree) or 'none'}); differs on "
                 f"{', '.join(differ) or 'none'}. YADIM's published augmentation combines the AMDIM and CPC pipelines, "
                 "its similarity is a plain dot product and its loss NCE (amdim_nce here).")
    ranked = section.ranked
    if ranked is not None and "yadim" in set(ranked["combination"]):
        row = ranked.set_index("combination").loc["yadim"]
        lines.append(f"The YADIM preset itself (a control) ranks {int(row['rank'])} of {len(ranked)} here: worst "
                     f"{fmt(row['worst'])} {ci(row['worst_low'], row['worst_high'])}, mean {fmt(row['mean'])}.")
    return lines


def _setup_lines(loaded: Loaded) -> list[str]:
    design = loaded.design
    run = loaded.run
    lines = [f"# {design.get('title', run.info.run_name)}", "",
             f"- study: `{design.get('study', run.info.run_name)}`, scale **{design.get('scale', '?')}**"
             + (f" ({design['scale_description']})" if design.get("scale_description") else ""),
             f"- MLflow: experiment `{loaded.experiment_name}`, run `{run.info.run_id}` ({run.info.run_name}), "
             f"store `{loaded.tracking_uri}`",
             f"- metric: {metric_label(design.get('metric', 'knn_acc'))} at each run's last epoch (kNN with "
             f"k={(design.get('fixed') or {}).get('knn_k', 200)} on the frozen encoder's pooled vector, test split)"]
    for key, label in (("methods", "methods"), ("encoders", "encoders"), ("extractions", "extractions"),
                       ("encoder", "encoder"), ("seeds", "seeds"), ("top_k", "top-K from stage (a)")):
        if key in design:
            value = design[key]
            lines.append(f"- {label}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    if design.get("fixed"):
        lines.append("- fixed in every trial: " + ", ".join(f"{k}={v}" for k, v in design["fixed"].items()))
    if design.get("command"):
        lines.append(f"- command: `{design['command']}`")
    return lines


def build_report(loaded: Loaded, out: Path, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> ReportResult:
    out.mkdir(parents=True, exist_ok=True)
    design = loaded.design
    kind = design.get("kind", "search")
    lines = _setup_lines(loaded)
    headline: list[str] = [f"{design.get('title', loaded.run.info.run_name)} — scale {design.get('scale', '?')}"]
    plots: list[Path] = []
    main: Section | None = None
    if kind == "robustness":
        stage = next(iter(loaded.stages.values()))
        info = stage.info
        lines += [f"- stage `{stage.name}`: {len(stage.runs)} runs ({_status_counts(stage.runs)}), "
                  f"{info.get('epochs')} epochs each, scheduler {info.get('scheduler')} (no early stopping)",
                  "", "## Result"]
        main = robustness_section(stage, design, out, n_resamples=n_resamples, seed=seed)
        lines += main.lines
    elif kind == "rediscover":
        labels = design.get("labels", {})
        if "a" in loaded.stages:
            lines += ["", "## Stage (a): early-stopped search over the whole space on one encoder"]
            sec = search_section(loaded.stages["a"], design, out, n_resamples=n_resamples, seed=seed)
            lines += sec.lines
            plots += sec.plots
            headline += sec.headline
        found = design.get("found", [])
        if found:
            lines += ["", f"Top {len(found)} distinct combinations (augment × similarity × loss) carried to stage "
                      "(b), each with its own learning rate and temperature:", "",
                      md_table([{"name": f"found{i}", "what": design.get("descriptions", {}).get(f"found{i}", "")}
                                for i in range(1, len(found) + 1)], [("name", "name"), ("what", "configuration")])]
        if "b" in loaded.stages:
            stage = loaded.stages["b"]
            lines += ["", "## Stage (b): the top combinations and the six presets across encoders and extractions",
                      "", f"{len(stage.runs)} runs ({_status_counts(stage.runs)}), {stage.info.get('epochs')} epochs "
                      "each, no early stopping. Presets keep their own augmentation, similarity, loss and "
                      "hyperparameters; encoder and extraction are the conditions."]
            main = robustness_section(stage, design, out, n_resamples=n_resamples, seed=seed, labels=labels,
                                      combination_header="combination")
            lines += main.lines
            yadim = _winner_vs_yadim(loaded, main, stage)
            lines += yadim
            headline += ["", *yadim[3:]]
    else:
        stage = next(iter(loaded.stages.values()))
        lines += ["", "## Trials"]
        sec = search_section(stage, design, out, n_resamples=n_resamples, seed=seed)
        lines += sec.lines
        plots += sec.plots
        headline += sec.headline
    if main is not None:
        plots += main.plots
        headline = headline[:1] + main.headline + headline[1:]
    lines += ["", "## Method notes", "",
              f"- Intervals: percentile bootstrap over seeds ({n_resamples} resamples, RNG seed {seed}, "
              f"{int(DEFAULT_CONFIDENCE * 100)}%), stratified by condition for the robustness scores. A winner is "
              "declared only where its interval lies entirely above the runner-up's and every cell of both has at "
              f"least {MIN_SEEDS_FOR_WINNER} seeds (a percentile bootstrap over 2 seeds spans just the 2 observed "
              "values); otherwise the report says tied, or names only the point-estimate leader.",
              "- The worst case is a minimum of noisy means, so it is biased low, and its bootstrap distribution "
              "sits at or below the observed value: its interval often ends at the point estimate. The bias is "
              "comparable between combinations scored over the same number of conditions with similar seed noise.",
              "- Failed or diverged runs have no value; a combination missing a condition it could take is ranked "
              "after the complete ones and cannot win. Refused combinations are not applicable, not failures.",
              "- Early-stopping check: Spearman rank correlation (average ranks for ties) between each trial's metric "
              "at the grace period and at its last epoch; below 0.5 the report warns that ASHA may prune slow "
              "starters."]
    markdown = "\n".join(lines) + "\n"
    path = out / "report.md"
    path.write_text(markdown)
    for name, table in (("ranking.csv", main.ranked if main else None), ("cells.csv", main.cells if main else None)):
        if table is not None:
            table.to_csv(out / name, index=False)
    return ReportResult(path, markdown, "\n".join(headline), plots, main.verdict if main else None,
                        main.ranked if main else None, main.cells if main else None, loaded.run.info.run_id)


def default_out(loaded: Loaded) -> Path:
    folder = loaded.run.data.tags.get("csl.study_folder") or loaded.run.data.tags.get(SEARCH_TAG)
    if folder and "://" not in folder and Path(folder).is_dir():
        return Path(folder) / "report"
    return Path("reports") / loaded.run.info.run_name


def write_report(tracking_uri: str, target: str, out_dir: str | Path | None = None, *,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, log_to_mlflow: bool = True) -> ReportResult:
    """Read ``target`` (run id or experiment name) back from MLflow, write report.md + plots into ``out_dir``
    and log them to the run under ``report/``."""
    loaded = load(tracking_uri, target)
    out = Path(out_dir) if out_dir is not None else default_out(loaded)
    result = build_report(loaded, out, n_resamples=n_resamples, seed=seed)
    if log_to_mlflow:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).log_artifacts(loaded.run.info.run_id, str(out), "report")
    return result


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("target", help="experiment name (its latest study or search) or a study/search run id")
    parser.add_argument("--mlflow-uri", help="tracking server or store (default: sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--storage", default="runs", help="where the default store lives (default: runs)")
    parser.add_argument("--out", help="folder for report.md and the plots (default: <study folder>/report)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default: 0)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the MLflow run")
    return parser


def run(args: argparse.Namespace) -> int:
    from search.tracking import TrackingUnavailable, check_reachable, local_tracking_uri

    uri = args.mlflow_uri or local_tracking_uri(args.storage)
    try:
        check_reachable(uri)
        result = write_report(uri, args.target, args.out, n_resamples=args.resamples, seed=args.seed,
                              log_to_mlflow=not args.no_log)
    except TrackingUnavailable as exc:
        print(f"csl-search: error: {exc}", file=sys.stderr)
        return 1
    except ReportError as exc:
        print(f"csl-search: error: {exc}", file=sys.stderr)
        return 2
    print(result.headline)
    print(f"\nreport: {result.path}" + ("" if args.no_log else f" (logged to run {result.run_id} under report/)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csl-search report", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
