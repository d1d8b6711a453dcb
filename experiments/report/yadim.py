"""The rediscover study's last question: how does the combination it found compare with YADIM as published?

Kept apart from the generic sections because only the ``rediscover`` design carries ``yadim_published`` and the
variant labels this comparison needs.
"""

from __future__ import annotations

import numpy as np

from experiments.common import ASPECTS
from search.report.mlflow_io import Loaded, Stage
from search.report.sections import Section
from search.report.tables import ci, fmt, md_table


def winner_vs_yadim(loaded: Loaded, section: Section, stage: Stage) -> list[str]:
    """Lines setting the winner (or, without one, the point-estimate leader) aspect by aspect next to YADIM."""
    design = loaded.design
    published = design.get("yadim_published", {})
    labels = design.get("labels", {})
    verdict = section.verdict
    if verdict is None or not verdict.ranked:
        return []
    leader = verdict.winner or verdict.ranked[0]
    runs = stage.runs.assign(combination=stage.runs["variant"].astype(str).map(lambda v: labels.get(v, v)))
    mine = runs[runs["combination"] == leader]
    finite = mine[np.isfinite(mine["final"].astype(float))]
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
            means = finite.groupby(finite[aspect].astype(str))["final"].mean().sort_values(ascending=False)
            top = means.index[0]
            how = (f"highest mean final value of {len(means)} evaluated ({means.iloc[0]:.4f} over seeds and the other "
                   "condition)")
            evaluated = [str(v) for v in design.get("encoders" if aspect == "encoder" else "extractions", [])]
            if published.get(aspect) and evaluated and published[aspect] not in evaluated:
                how += f"; {published[aspect]} was not evaluated at this scale"
            chosen[aspect] = (top, how)
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
