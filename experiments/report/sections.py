"""The report's sections: the robustness ranking of a fixed-budget grid stage and the summary of a searched stage,
each with its tables, plots, marginal effects and early-stopping check.

A section returns its Markdown lines, the plots it drew and the lines it adds to the headline (what the study
command prints), so the report can put the same findings in both places without computing them twice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.common import ASPECTS
from experiments.report.mlflow_io import Stage
from experiments.report.plots import early_stopping_plot, heatmap, marginal_plot, robustness_bars
from experiments.report.tables import md_table, metric_label
from experiments.stats import Verdict, cell_table, early_stopping_check, marginal_table, rank, robustness_table

CONDITION_NAMES = {"encoder": "encoders", "extract": "extraction strategies", "encoder / extract":
                   "encoder × extraction pairs"}
SCORE_WHY = (
    "Ranked by the **worst case** over conditions: a robust design is one that stays good whatever the user picks, "
    "which is a statement about the minimum, not the average. The mean rewards a design that is excellent on one "
    "condition and poor on another; the spread alone rewards a design that is uniformly poor (chance everywhere "
    "has zero spread). Mean and spread are shown beside it."
)


@dataclass
class Section:
    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    ranked: pd.DataFrame | None = None
    cells: pd.DataFrame | None = None


def status_counts(runs: pd.DataFrame) -> str:
    """How the trials of a stage ended, e.g. "3 finished, 1 failed"."""
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


def _close_stage(section: Section, stage: Stage, frame: pd.DataFrame, keys: Sequence[str], title: str,
                 check_note: str, out: Path, metric: str, n_resamples: int, seed: int) -> Section:
    """End a stage's section the same way for both kinds of stage: marginal effects, then the early-stopping check
    (whose finding also goes into the headline); ``check_note`` says what the check means for this stage."""
    marg = _marginals(frame, keys, out, stage.name, title, metric, n_resamples, seed)
    es = _early_stopping(stage, metric, out, stage.name, check_note)
    section.lines += marg.lines + es.lines
    section.plots += marg.plots + es.plots
    section.headline += es.headline
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
    return _close_stage(section, stage, frame_all, [header, *conditions, *ASPECTS], f"stage {stage.name}",
                        "every run trained the full budget, so this is the ranking ASHA would have used at the "
                        "grace period against the ranking at the end", out, metric, n_resamples, seed)


def _product(lists: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
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
    section.lines += ["", f"{len(runs)} trials ({status_counts(runs)}); scheduler {info.get('scheduler', '?')}, "
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
    return _close_stage(section, stage, runs, [*ASPECTS, "method"],
                        f"stage {stage.name}, every trial at its last epoch; the sampler chose which values ran how "
                        "often", "trials that ran past the grace period, i.e. those the scheduler kept - a check "
                        "biased towards agreement, since the pruned ones never show their final value",
                        out, metric, n_resamples, seed)
