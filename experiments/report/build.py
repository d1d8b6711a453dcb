"""Assembling a study's report.md: the setup lines, the sections the design's kind calls for, the method notes;
then the CSV tables beside it and, with ``write_study_report``, the whole folder logged to the study run under
``report/``. ``write_study_report`` is the study plugin of ``csl-search report`` (``search.report.plugins``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.common import STUDY_TAG
from experiments.report.sections import robustness_section
from experiments.report.study import load_study
from experiments.report.yadim import winner_vs_yadim
from experiments.stats import MIN_SEEDS_FOR_WINNER, Verdict
from search.report.build import ReportResult, method_notes, mlflow_line
from search.report.mlflow_io import Loaded, default_out
from search.report.sections import Section, search_section, status_counts
from search.report.stats import DEFAULT_RESAMPLES
from search.report.tables import md_table, metric_label


@dataclass
class StudyReport(ReportResult):
    """A study's report, with the robustness ranking of its main stage where it has one."""

    verdict: Verdict | None = None
    ranked: pd.DataFrame | None = None
    cells: pd.DataFrame | None = None


def _setup_lines(loaded: Loaded) -> list[str]:
    design = loaded.design
    run = loaded.run
    lines = [f"# {design.get('title', run.info.run_name)}", "",
             f"- study: `{design.get('study', run.info.run_name)}`, scale **{design.get('scale', '?')}**"
             + (f" ({design['scale_description']})" if design.get("scale_description") else ""),
             mlflow_line(loaded),
             f"- metric: {metric_label(design.get('metric', 'knn_acc'))} (kNN with "
             f"k={(design.get('fixed') or {}).get('knn_k', 200)} on the frozen encoder's pooled vector, test split): "
             "a robustness stage scores each run at its last epoch, a search stage ranks trials by their best epoch"]
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


def build_report(loaded: Loaded, out: Path, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> StudyReport:
    """Write report.md (and ranking.csv / cells.csv where a robustness stage ranked) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    design = loaded.design
    kind = design.get("kind")
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
                      "(b), each with its own learning rate and temperature, chosen by their value at the last epoch "
                      "(the quantity stage (b) scores), trials that ran the whole budget before those the scheduler "
                      "stopped:", "",
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
        raise ValueError(f"study run {loaded.run.info.run_id}: unknown design kind {kind!r}; known: robustness, "
                         "rediscover")
    if main is not None:
        plots += main.plots
        headline = headline[:1] + main.headline + headline[1:]
    lines += ["", "## Method notes", "", *method_notes(n_resamples, seed),
              "- Robustness scores: intervals over seeds, stratified by condition. A winner is declared only where "
              "its interval lies entirely above the runner-up's and every cell of both has at least "
              f"{MIN_SEEDS_FOR_WINNER} seeds (a percentile bootstrap over 2 seeds spans just the 2 observed values); "
              "otherwise the report says tied, or names only the point-estimate leader.",
              "- A run's value in a robustness stage is its metric at its last epoch (the model the fixed budget "
              "produced, the same epoch for every run), not its best epoch, which would be picked on the evaluation "
              "split.",
              "- The worst case is a minimum of noisy means, so it is biased low, and its bootstrap distribution "
              "sits at or below the observed value: its interval often ends at the point estimate. The bias is "
              "comparable between combinations scored over the same number of conditions with similar seed noise.",
              "- Failed or diverged runs have no value; a combination missing a condition it could take is ranked "
              "after the complete ones and cannot win. Refused combinations are not applicable, not failures."]
    markdown = "\n".join(lines) + "\n"
    path = out / "report.md"
    path.write_text(markdown)
    for name, table in (("ranking.csv", main.ranked if main else None), ("cells.csv", main.cells if main else None)):
        if table is not None:
            table.to_csv(out / name, index=False)
    return StudyReport(path, markdown, "\n".join(headline), plots, loaded.run.info.run_id,
                       main.verdict if main else None, main.ranked if main else None, main.cells if main else None)


def write_study_report(tracking_uri: str, run_id: str, out_dir: str | Path | None = None, *,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, log_to_mlflow: bool = True) -> StudyReport:
    """Read the study run ``run_id`` back from MLflow, write report.md + plots into ``out_dir`` (default: the study
    folder's ``report``) and log them to the run under ``report/``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    loaded = load_study(client, tracking_uri, client.get_run(run_id))
    out = Path(out_dir) if out_dir is not None else default_out(loaded.run, ("csl.study_folder",))
    result = build_report(loaded, out, n_resamples=n_resamples, seed=seed)
    if log_to_mlflow:
        client.log_artifacts(run_id, str(out), "report")
    return result


REPORTERS = {STUDY_TAG: write_study_report}
"""The study plugin, also declared as an entry point (``pyproject.toml``) for ``csl-search report``."""
