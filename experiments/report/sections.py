"""The robustness section of a study's report: the ranking of a fixed-budget grid stage by robustness over its
conditions, its cells, heatmaps and bars, then (``search.report.sections.close_stage``) the marginal effects and
the early-stopping check every section ends with.

Every value here is a run's ``final`` value, its metric at its last epoch: the model the fixed budget produced,
the same epoch for every run (a run's best epoch would be chosen on the evaluation split). It is never called
"best", which is a search's word (``search.best``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.common import ASPECTS
from experiments.report.plots import heatmap, robustness_bars
from experiments.stats import rank, robustness_table
from search.report.mlflow_io import Stage
from search.report.sections import Section, close_stage
from search.report.stats import cell_table
from search.report.tables import md_table, metric_label

CONDITION_NAMES = {"encoder": "encoders", "extract": "extraction strategies", "encoder / extract":
                   "encoder × extraction pairs"}
SCORE_WHY = (
    "Ranked by the **worst case** over conditions: a robust design is one that stays good whatever the user picks, "
    "which is a statement about the minimum, not the average. The mean rewards a design that is excellent on one "
    "condition and poor on another; the spread alone rewards a design that is uniformly poor (chance everywhere "
    "has zero spread). Mean and spread are shown beside it."
)


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
    frame = runs[["combination", *conditions, "seed", "final", "status"]]
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
    table = robustness_table(frame, combination="combination", condition=conditions, value="final",
                             applicable=applicable, n_resamples=n_resamples, seed=seed)
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
    cells = cell_table(frame, by=["combination", *conditions], value="final", n_resamples=n_resamples, seed=seed)
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
        per = cell_table(frame, by=["combination", c], value="final", n_resamples=200, seed=seed)
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
    return close_stage(section, stage, frame_all, [header, *conditions, *ASPECTS], f"stage {stage.name}, each "
                       "run's value at its last epoch", "every run trained the full budget, so this is the ranking "
                       "ASHA would have used at the grace period against the ranking at the end", out, metric,
                       design.get("mode", "max"), "final", n_resamples, seed)


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
