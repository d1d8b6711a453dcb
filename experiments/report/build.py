"""Assembling report.md: the setup lines, the sections the design's kind calls for, the method notes; then the
CSV tables beside it and, with ``write_report``, the whole folder logged to the run under ``report/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.report.mlflow_io import Loaded, default_out, load
from experiments.report.sections import Section, robustness_section, search_section, status_counts
from experiments.report.tables import md_table, metric_label
from experiments.report.yadim import winner_vs_yadim
from experiments.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, MIN_SEEDS_FOR_WINNER, Verdict


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
    """Write report.md (and ranking.csv / cells.csv where a robustness stage ranked) into ``out``."""
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
        lines += [f"- stage `{stage.name}`: {len(stage.runs)} runs ({status_counts(stage.runs)}), "
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
                      "", f"{len(stage.runs)} runs ({status_counts(stage.runs)}), {stage.info.get('epochs')} epochs "
                      "each, no early stopping. Presets keep their own augmentation, similarity, loss and "
                      "hyperparameters; encoder and extraction are the conditions."]
            main = robustness_section(stage, design, out, n_resamples=n_resamples, seed=seed, labels=labels,
                                      combination_header="combination")
            lines += main.lines
            yadim = winner_vs_yadim(loaded, main, stage)
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
