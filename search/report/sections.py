"""The report's section of a searched stage (a plain search, or a study's search stage), and the pieces every
section ends with: the marginal effect of each aspect value and the early-stopping check.

A section returns its Markdown lines, the plots it drew and the lines it adds to the headline (what the command
prints), so the report can put the same findings in both places without computing them twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search import best
from search.report.mlflow_io import Stage
from search.report.plots import early_stopping_plot, marginal_plot
from search.report.stats import early_stopping_check, marginal_table
from search.report.tables import fmt, md_table
from search.space.schema import ASPECT_KEYS

RANKING_RULE = (
    "ranked by their best value (a trial's best epoch is the epoch whose value of the metric is best by the mode, the "
    "earliest of equal ones), equal best values by the earlier best epoch, then by trial id, trials without a finite "
    "value last"
)


@dataclass
class Section:
    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    verdict: Any = None  # a robustness stage's experiments.stats.Verdict
    ranked: pd.DataFrame | None = None
    cells: pd.DataFrame | None = None


def status_counts(runs: pd.DataFrame) -> str:
    """How the trials of a stage ended, e.g. "3 finished, 1 failed"."""
    if not len(runs):
        return "no trials"
    counts = runs["status"].value_counts().sort_index()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def varying(runs: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The ``keys`` that take more than one value over ``runs``."""
    return [k for k in dict.fromkeys(keys) if k in runs and runs[k].astype(str).nunique() > 1]


def early_stopping(stage: Stage, metric: str, out: Path, note: str) -> Section:
    """The grace-period check of a stage (``search.report.stats.early_stopping_check``) and its scatter plot."""
    section = Section()
    grace = stage.info.get("grace_period")
    if not grace:
        section.lines += ["", f"Early-stopping check: no grace period recorded for stage {stage.name}; skipped."]
        return section
    check = early_stopping_check(stage.history, int(grace))
    section.lines += ["", f"**Early-stopping check** ({note}): {check.text()}."]
    section.headline += ["", f"Early-stopping check, stage {stage.name}: {check.text()}."]
    plot = early_stopping_plot(check, path=out / f"{stage.name}_early_stopping.png",
                               title=f"Stage {stage.name}: does the grace-period ranking hold?", metric=metric)
    if plot:
        section.plots.append(plot)
        section.lines += ["", f"![early-stopping check]({plot.name})"]
    return section


def marginals(frame: pd.DataFrame, keys: Sequence[str], out: Path, prefix: str, title: str, metric: str,
              mode: str, value: str, n_resamples: int, seed: int) -> Section:
    """Per aspect value: the mean of column ``value`` over the runs that have it, with a bootstrap interval."""
    section = Section()
    keys = varying(frame[np.isfinite(frame[value].astype(float))], keys)
    if not keys:
        return section
    tables = {k: marginal_table(frame.assign(**{k: frame[k].astype(str)}), k, value=value, n_resamples=n_resamples,
                                seed=seed).sort_values("mean", ascending=mode == "min")
              for k in keys}
    section.lines += ["", f"### Marginal effect of each aspect value ({title})", "",
                      "Mean over every run with that value (all other aspects pooled), 95% bootstrap interval over "
                      "those runs. Marginals pool unequal company: read them as a summary, not as a controlled "
                      "comparison."]
    for key, table in tables.items():
        section.lines += ["", md_table(table.to_dict("records"), [(key, key), ("seeds", "runs"), ("mean", "mean"),
                                                                 ("ci_low|ci_high", "95% CI"), ("failed", "failed")])]
    plot = marginal_plot(tables, path=out / f"{prefix}_marginals.png",
                         title=f"Marginal effect of each aspect value — {title} (mean, 95% bootstrap CI)",
                         metric=metric)
    section.plots.append(plot)
    section.lines += ["", f"![marginal effects]({plot.name})"]
    return section


def close_stage(section: Section, stage: Stage, frame: pd.DataFrame, keys: Sequence[str], title: str,
                check_note: str, out: Path, metric: str, mode: str, value: str, n_resamples: int,
                seed: int) -> Section:
    """End a stage's section the same way for every kind of stage: marginal effects of column ``value``, then the
    early-stopping check (whose finding also goes into the headline); ``check_note`` says what it means here."""
    marg = marginals(frame, keys, out, stage.name, title, metric, mode, value, n_resamples, seed)
    es = early_stopping(stage, metric, out, check_note)
    section.lines += marg.lines + es.lines
    section.plots += marg.plots + es.plots
    section.headline += es.headline
    return section


def ranked_runs(runs: pd.DataFrame, mode: str) -> list[dict[str, Any]]:
    """The stage's runs (rows of ``Stage.runs``) in the order of the one ranking (``search.best``)."""

    def found(row: Mapping[str, Any]) -> best.Best:
        value, epoch = row.get("best"), row.get("best_epoch")
        return best.Best(int(epoch), float(value)) if best.finite(value) else best.NONE

    return best.ranked(runs.to_dict("records"), mode=mode, best=found, trial_id=lambda row: str(row["trial_id"]))


def budget_line(info: Mapping[str, Any]) -> str:
    """How a searched stage ran: scheduler (with its parameters), searcher, budget."""
    settings = info.get("scheduler_settings") or {}
    shown = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in settings.items()
                      if k not in ("time_attr", "max_t"))
    parts = [f"scheduler {info.get('scheduler', '?')}" + (f" ({shown})" if shown else ""),
             f"searcher {info.get('searcher', '?')}",
             f"budget {info.get('epochs', '?')} epochs per trial"]
    if info.get("num_samples") is not None:
        parts.append(f"{info['num_samples']} samples")
    grace = info.get("grace_period")
    parts.append(f"grace period {grace} epoch(s)" if grace else "grace period not recorded")
    if info.get("reduction_factor") is not None:
        parts.append(f"reduction factor {fmt(info['reduction_factor'])}")
    return ", ".join(parts)


def search_section(stage: Stage, design: Mapping[str, Any], out: Path, *, n_resamples: int, seed: int,
                   top: int = 15) -> Section:
    """A searched stage: trials ranked by their best value, the best trial, marginals, early-stopping check."""
    metric, mode = design.get("metric", "knn_acc"), design.get("mode", "max")
    section = Section()
    runs, info = stage.runs, stage.info
    section.lines += ["", f"{len(runs)} trials ({status_counts(runs)}); {budget_line(info)}"
                      + (f"; one encoder: {info['encoder']}" if info.get("encoder") else "") + "."]
    if not len(runs):
        return section
    shown = varying(runs, ["method", *ASPECT_KEYS, "variant", "lr", "temperature"])
    ordered = ranked_runs(runs, mode)
    rows = [{"rank": i + 1, **r} for i, r in enumerate(ordered[:top])]
    for row in rows:  # learning rates and temperatures span decades: significant digits, not decimals
        row["best_epoch"] = int(row["best_epoch"]) if best.finite(row["best_epoch"]) else None
        for key in ("lr", "temperature"):
            if isinstance(row.get(key), float) and math.isfinite(row[key]):
                row[key] = f"{row[key]:.3g}"
    section.lines += ["", f"Top {len(rows)} trials, {RANKING_RULE}; stopped trials show the value at the epoch the "
                      "scheduler stopped them as their last:", "",
                      md_table(rows, [("rank", "rank"), ("trial_id", "trial"), ("status", "status"),
                                      ("epochs", "epochs"), ("best_epoch", "best epoch"), ("best", f"{metric} (best)"),
                                      ("final", f"{metric} (last epoch)"), *[(k, k) for k in shown]])]
    leader = rows[0]
    if best.finite(leader.get("best")):
        line = (f"Best trial: **{leader['trial_id']}** (MLflow run `{leader['run_id']}`): {metric} "
                f"{fmt(leader['best'])} at epoch {leader['best_epoch']} of {leader['epochs']}.")
    else:
        line = f"Best trial: none (no trial reported a finite {metric})."
    section.lines += ["", line]
    section.headline += ["", line]
    if str(info.get("scheduler")) == "fifo":
        note = ("every trial ran the whole budget, so this is the ranking ASHA would have used at the grace period "
                "against the ranking at the end")
    else:
        note = ("trials that ran past the grace period, i.e. those the scheduler kept - a check biased towards "
                "agreement, since the pruned ones never show their final value")
    return close_stage(section, stage, runs, ["method", *ASPECT_KEYS], f"stage {stage.name}, each trial's best "
                       "value; the sampler chose which values ran how often", note, out, metric, mode, "best",
                       n_resamples, seed)
