"""Rediscover YADIM without a human in the loop: search the whole design space, then keep what is robust.

Stage (a): an early-stopped search (ASHA + Optuna TPE) over the five-aspect space of ``spaces/paper.yaml`` (every
augmentation, extraction, similarity and loss, plus the learning rate and temperature) on ONE encoder.

Stage (b): the top-K distinct combinations of stage (a) (distinct augmentation × similarity × loss, each with its
learning rate and temperature), plus the six method presets as controls, re-evaluated at a fixed budget (FIFO, no
early stopping) on every encoder × extraction of the scale, with several seeds. Pairs the model cannot build are
refused before launch and reported as not applicable.

The report ranks the combinations by their worst case over encoder × extraction (with mean and spread beside it
and bootstrap intervals over seeds), declares a winner only when its interval separates from the runner-up's,
and sets the winning combination aspect by aspect next to YADIM's published choices.

    python -m experiments.rediscover_yadim --scale smoke
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from experiments.common import METHODS, REPO, YADIM_PUBLISHED, parser, run_study, scale_from_args
from experiments.spaces import grid_space, write_grid_space, write_space

STUDY = "rediscover_yadim"
PAPER_SPACE = REPO / "spaces" / "paper.yaml"
CONDITION_KEYS = ("encoder", "extract", "seed")
COMBINATION_KEYS = ("augment", "similarity", "loss")


def stage_a_space(scale: Any, source: Mapping[str, Any]) -> dict[str, Any]:
    """spaces/paper.yaml on the scale's data and sizes, with the encoder fixed to the scale's search encoder."""
    params = dict(source["params"])
    params.pop("encoder", None)
    fixed = {**dict(source.get("fixed") or {}), **scale.trial_fixed(), "encoder": scale.search_encoder}
    fixed = {k: v for k, v in fixed.items() if k not in params}
    space = {
        "name": f"{STUDY}-a-{scale.name}",
        "description": f"{source.get('description', 'paper.yaml')} Encoder fixed to {scale.search_encoder}.",
        "metric": source.get("metric", "knn_acc"), "mode": source.get("mode", "max"),
        "budget": {"epochs": scale.search_epochs, "grace_period": min(scale.grace_period, scale.search_epochs),
                   "reduction_factor": scale.reduction_factor, "num_samples": scale.search_samples},
        "fixed": fixed,
        "params": params,
    }
    if source.get("constraints"):
        space["constraints"] = list(source["constraints"])
    return space


def top_combinations(rows: Sequence[Mapping[str, Any]], space: Any, k: int, metric: str = "knn_acc"
                     ) -> list[dict[str, Any]]:
    """The top ``k`` trials of stage (a) with distinct augment × similarity × loss, by their value at the last epoch.

    Stage (b) scores every run at its last epoch (``experiments.stats``), so stage (a) picks by the same quantity,
    not by a trial's best epoch (``search.best``, which ranks stage (a)'s own table): trials that ran the whole
    budget come first, by their final-epoch metric; trials the scheduler stopped come after them (by their last
    value), only to fill up when fewer than ``k`` finished.
    """
    def score(row: Mapping[str, Any]) -> float:
        value = row.get(f"last_{metric}")
        return float(value) if isinstance(value, (int, float)) and value == value else float("-inf")

    usable = [r for r in rows if r.get("status") in ("finished", "stopped") and score(r) > float("-inf")]
    usable.sort(key=lambda r: (r.get("status") != "finished", -score(r), str(r.get("trial_id"))))
    chosen, seen = [], set()
    for row in usable:
        key = tuple(row.get(c) for c in COMBINATION_KEYS)
        if key in seen:
            continue
        seen.add(key)
        config = {**space.fixed, **{name: row.get(name) for name in space.dimensions}}
        chosen.append({"trial_id": row.get("trial_id"), "mlflow_run_id": row.get("mlflow_run_id"),
                       "status": row.get("status"), "value": score(row), "epochs": row.get("epochs"),
                       "config": config})
        if len(chosen) == k:
            break
    return chosen


def stage_b_variants(found: Sequence[Mapping[str, Any]], fixed: Mapping[str, Any]) -> tuple[list, dict, dict]:
    """(variants, labels, descriptions) of stage (b): base = yadim, the five other presets, found1..foundK."""
    variants: list[dict[str, Any]] = [{"name": m, "method": m} for m in METHODS if m != "yadim"]
    labels = {"base": "yadim", **{m: m for m in METHODS if m != "yadim"}}
    descriptions = {labels[v]: "preset" for v in labels}
    for i, item in enumerate(found, start=1):
        name = f"found{i}"
        keep = {k: v for k, v in item["config"].items()
                if k not in fixed and k not in (*CONDITION_KEYS, "epochs", "method") and v is not None}
        variants.append({"name": name, "method": None, **keep})
        labels[name] = name
        shown = ", ".join(f"{k}={_short(v)}" for k, v in keep.items())
        descriptions[name] = f"stage (a) trial {item['trial_id']} ({item['status']}, {item['value']:.4f}): {shown}"
    return variants, labels, descriptions


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_stage_a(scale: Any, source: Mapping[str, Any], folder: Path) -> Path:
    return write_space(folder / "a.yaml", stage_a_space(scale, source),
                       f"Generated by experiments.{STUDY} (scale {scale.name}), stage (a): spaces/paper.yaml "
                       f"with the encoder fixed to {scale.search_encoder}; ASHA + Optuna.")


def write_stage_b(scale: Any, found: Sequence[Mapping[str, Any]], folder: Path
                  ) -> tuple[Path, list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Stage (b)'s space file (refused cells excluded), the refused cells, the variants' labels and descriptions."""
    fixed = scale.trial_fixed()
    variants, labels, descriptions = stage_b_variants(found, fixed)
    params = {"encoder": {"choice": list(scale.encoders)}, "extract": {"choice": list(scale.extractions)},
              "seed": {"choice": list(scale.seeds)}}
    description = "Top combinations of stage (a) and the six presets × encoders × extractions × seeds."
    header = (f"Generated by experiments.{STUDY} (scale {scale.name}), stage (b): {len(variants) + 1} "
              f"combinations × {len(scale.encoders)} encoders × {len(scale.extractions)} extractions × "
              f"{len(scale.seeds)} seeds, minus refused cells; grid searcher, FIFO scheduler.")
    path = folder / "b.yaml"
    kwargs = {"base": {"method": "yadim"}, "variants": variants, "fixed": fixed}
    refused = write_grid_space(path, header, ["variant", "encoder", "extract"], lambda constraints: grid_space(
        f"{STUDY}-b-{scale.name}", description, scale, params, constraints=constraints, **kwargs))
    return path, refused, labels, descriptions


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(STUDY, __doc__.split("\n\n")[0]).parse_args(argv)
    scale = scale_from_args(args)
    source = yaml.safe_load(PAPER_SPACE.read_text())
    design = {
        "kind": "rediscover",
        "title": "Rediscovering YADIM: search, then rank by robustness",
        "metric": "knn_acc", "mode": "max",
        "stages": {
            "a": {"role": "search", "scheduler": "asha", "searcher": "optuna", "encoder": scale.search_encoder,
                  "epochs": scale.search_epochs, "grace_period": min(scale.grace_period, scale.search_epochs),
                  "reduction_factor": scale.reduction_factor, "num_samples": scale.search_samples,
                  "space": str(PAPER_SPACE.relative_to(REPO))},
            "b": {"role": "robustness", "combination": "variant", "conditions": ["encoder", "extract"],
                  "scheduler": "fifo", "epochs": scale.epochs, "grace_period": scale.grace_period},
        },
        "top_k": scale.top_k, "encoders": list(scale.encoders), "extractions": list(scale.extractions),
        "seeds": list(scale.seeds), "yadim_published": YADIM_PUBLISHED, "fixed": scale.trial_fixed(),
    }

    def body(study):
        from search.space import load_space

        path_a = write_stage_a(scale, source, study.folder)
        outcome_a = study.run_stage("a", path_a, scheduler="asha", searcher="optuna",
                                    num_samples=scale.search_samples)
        found = top_combinations(outcome_a.trials, load_space(path_a), scale.top_k, outcome_a.metric)
        if not found:
            raise RuntimeError("stage (a) produced no trial with a value; nothing to re-evaluate")
        path_b, refused, labels, descriptions = write_stage_b(scale, found, study.folder)
        study.design.update(
            found=[dict(f) for f in found], labels=labels, descriptions=descriptions,
            not_applicable=[{"cell": {**r["cell"], "variant": labels.get(r["cell"]["variant"], r["cell"]["variant"])},
                             "reason": r["reason"]} for r in refused],
        )
        study.save_design()
        study.run_stage("b", path_b, scheduler="fifo", searcher="grid")

    return run_study(STUDY, args, scale, design, body)


if __name__ == "__main__":
    sys.exit(main())
