"""Validate the label-free selection metrics against labels: do RankMe, α-ReQ, alignment, uniformity (and the SSL
loss) pick the trials that kNN accuracy would pick?

One grid search with labels available (``csl-search run <generated space> --searcher grid --scheduler fifo``):
several method presets, each at a range of learning rates (the preset's own scaled by the scale's factors), so
that quality varies within each method as well as between them. Every trial reports the label-free metrics on
SSL training images held out of training, and kNN and the online linear probe on the labelled test split. The
report (``experiments.label_free_report``) gives, per label-free metric, Spearman's ρ with final kNN (and linear)
accuracy over all trials (across methods) and within each method (where RankMe's authors say it holds), with
bootstrap intervals, and the *selection regret* (best kNN minus the kNN of the trial the metric would pick, in
points), and a PNG scatter of each metric against kNN, one colour per method. The report is logged to the study
run in MLflow (``report/``), with the headline figures as metrics of that run.

Every trial trains the same budget (no early stopping): a metric is judged on the runs it would choose between.

    python -m experiments.label_free --scale smoke   # CPU, 1-3 minutes: the plumbing only
    python -m experiments.label_free --scale cpu     # 2 CPU cores, about 25 minutes: 24 trials, 3 methods
    python -m experiments.label_free --scale gpu     # one GPU (4 trials share it), hours: 40 trials
    python -m experiments.label_free --report runs/<study>   # the report again from a study folder

Scales (``SCALES``; all on 32x32 images, CIFAR-10's 10 classes, chance 0.10):

- ``smoke``: the embedded cifar10-mini (192 images, 32 held out, 64 test images), 1/16-wide ResNet-18, 1 epoch,
  simclr / byol / moco_v2 × 2 learning rates (6 trials). Accuracies are near chance: only the plumbing and the
  statistics run.
- ``cpu``: 1,400 CIFAR-10 training images of the shared Parquet copy (200 held out for the label-free metrics,
  1,200 trained on), 1,000 test images, 1/8-wide ResNet-18, batch 64, 3 epochs (57 steps), evaluated once at the
  end, simclr / byol / moco_v2 × 8 learning rates from 1/30 to 10 times the preset's (24 trials, two at a time on
  2 cores). Measured on 2 cores shared with three other jobs (load average 9-19): the search 1,449 s, a trial
  90 s (simclr), 100 s (moco_v2) and 135 s (byol, whose two 4096-wide heads and target make it the slowest) on
  average.
- ``gpu``: all of CIFAR-10 (50,000 / 10,000, 1,024 held out), quarter-width ResNet-18, the presets' batch sizes,
  30 epochs, simclr / byol / moco_v2 / amdim / yadim × 8 learning rates (40 trials, 4 per GPU at 0.25 GPU and 4
  CPUs each): 1.5 million training images per trial. Not run here (no GPU in this project's sessions so far);
  its time is an estimate, not a measurement.

Deviations from the presets, the same for every method (``FIXED``): one encoder (ResNet-18 at the scale's width;
the presets' ResNet-50 and wide ResNets cost 2-3x more and the study compares metrics, not encoders); no warm-up
(the presets' 10 warm-up epochs are longer than the cpu scale's whole run). Below the gpu scale: MoCo's queue
shortened (512 keys at the cpu scale: 4,096 would hold each of its 1,200 images three times, an image's own stale
keys among its negatives), one batch size for every method (64 at the cpu scale: more steps in a short run), and
kNN's k (50 at the cpu scale, 20 at smoke: the default 200 of a 1,200-image bank votes with a sixth of it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from csl.metrics import LABEL_FREE
from csl.presets import PRESETS
from experiments.common import STUDY_FILE, parser, shared_cifar10
from experiments.label_free_report import ACCURACIES, ALL, CANDIDATES, MEAN_WITHIN, Validation, write_report
from experiments.spaces import grid_space, write_space

STUDY = "label_free"
REPORT_FOLDER = "report"

# The same for every method: one encoder, no warm-up (see the module docstring).
FIXED = {"encoder": "resnet18", "warmup_epochs": 0, "device": "auto"}
# The smoke scale's heads and queue, as small as the framework's tests make them (tests/helpers.py).
SMALL_HEADS = {"width": 0.0625, "proj_dim": 16, "proj_hidden": 32, "pred_hidden": 32, "queue_size": 64}


@dataclass(frozen=True)
class ValidationScale:
    """Budgets of one scale. Carries what ``experiments.common.Study`` and ``experiments.spaces.grid_space`` read
    of a scale (name, description, fixed, epochs, grace_period, resources) and the study's own grid."""

    name: str
    description: str
    fixed: Mapping[str, Any]
    epochs: int
    methods: tuple[str, ...]
    lr_factors: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    grace_period: int = 1  # read by grid_space only (FIFO: no early stopping)
    data_fn: Any = field(default=None, compare=False)

    def trial_fixed(self) -> dict[str, Any]:
        fixed = {**FIXED, **self.fixed}
        if "data" not in fixed and self.data_fn is not None:
            fixed["data"] = self.data_fn()
        return fixed

    @property
    def trials(self) -> int:
        return len(self.methods) * len(self.lr_factors) * len(self.seeds)


CPU_FACTORS = tuple(float(f"{10 ** x:.3g}") for x in np.linspace(math.log10(1 / 30), 1.0, 8))

SCALES: dict[str, ValidationScale] = {
    "smoke": ValidationScale(
        name="smoke",
        description="CPU, 1-3 minutes: cifar10-mini (192 train, 32 of them held out / 64 test images), 1/16-wide "
                    "ResNet-18, 1 epoch, simclr / byol / moco_v2 × 2 learning rates",
        fixed={"data": "cifar10-mini", "train_limit": 192, "test_limit": 64, "label_free_samples": 32,
               "batch_size": 32, "device": "cpu", "knn_k": 20, **SMALL_HEADS},
        epochs=1, methods=("simclr", "byol", "moco_v2"), lr_factors=(0.1, 1.0),
    ),
    "cpu": ValidationScale(
        name="cpu",
        description="2 CPU cores, about 25 minutes: CIFAR-10 (1,400 train, 200 of them held out / 1,000 test images), "
                    "1/8-wide ResNet-18, batch 64, 3 epochs, simclr / byol / moco_v2 × 8 learning rates "
                    "(1/30 to 10 × the preset's)",
        fixed={"train_limit": 1400, "test_limit": 1000, "label_free_samples": 200, "width": 0.125,
               "batch_size": 64, "device": "cpu", "knn_k": 50, "queue_size": 512, "eval_every": 3},
        data_fn=shared_cifar10, epochs=3, methods=("simclr", "byol", "moco_v2"), lr_factors=CPU_FACTORS,
    ),
    "gpu": ValidationScale(
        name="gpu",
        description="one GPU, hours (an estimate): CIFAR-10 (50,000 train, 1,024 of them held out / 10,000 test), "
                    "quarter-width ResNet-18, 30 epochs, simclr / byol / moco_v2 / amdim / yadim × 8 learning "
                    "rates (1/30 to 10 × the preset's), 4 trials per GPU",
        fixed={"width": 0.25, "label_free_samples": 1024},
        data_fn=shared_cifar10, epochs=30, methods=("simclr", "byol", "moco_v2", "amdim", "yadim"),
        lr_factors=CPU_FACTORS, cpus_per_trial=4, gpus_per_trial=0.25,
    ),
}


# ------------------------------------------------------------------------------------------------ the space


def cell_name(method: str, lr: float) -> str:
    return f"{method} lr={lr:.3g}"


def cells(scale: ValidationScale) -> list[dict[str, Any]]:
    """The grid's cells: each method at its preset's learning rate times each factor (3 significant digits)."""
    return [{"name": cell_name(m, lr), "method": m, "lr": lr}
            for m in scale.methods
            for lr in (float(f"{PRESETS[m]['lr'] * f:.3g}") for f in scale.lr_factors)]


def write_study_space(scale: ValidationScale, folder: Path) -> Path:
    """The study's space: a neighbourhood whose base is the first cell and whose variants are the others, × seeds."""
    first, *rest = cells(scale)
    base = {k: v for k, v in first.items() if k != "name"}
    params = {"seed": {"choice": list(scale.seeds)}}
    description = (f"{len(scale.methods)} presets × {len(scale.lr_factors)} learning rates × {len(scale.seeds)} "
                   f"seeds, fixed budget (generated); the base is {first['name']}.")
    space = grid_space(f"{STUDY}-{scale.name}", description, scale, params,  # type: ignore[arg-type]
                       base=base, variants=rest, epochs=scale.epochs)
    header = (f"Generated by experiments.{STUDY} (scale {scale.name}): {description} Grid searcher, FIFO "
              "scheduler; every trial reports knn_acc, probe_acc and the label-free metrics.")
    return write_space(folder / "grid.yaml", space, header)


# ------------------------------------------------------------------------------------------------ the trials


def trial_table(rows: Sequence[Mapping[str, Any]], space: Any) -> pd.DataFrame:
    """One row per finished trial: its method, learning rate and seed (from its variant, through the space) and
    its final metrics. Trials that did not finish are left out (the report says how many)."""
    records = []
    for row in rows:
        if row.get("status") != "finished":
            continue
        config = space.trial_config({name: row.get(name) for name in space.dimensions})
        record = {"trial_id": row["trial_id"], "mlflow_run_id": row.get("mlflow_run_id"),
                  "method": config["method"], "lr": float(config["lr"]), "seed": int(config["seed"])}
        for name in (*ACCURACIES, *CANDIDATES):
            value = row.get(f"last_{name}")
            record[name] = float(value) if isinstance(value, (int, float)) else math.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def headline_metrics(result: Validation) -> dict[str, float]:
    """The figures logged as metrics of the study run: ρ with kNN (all, mean within) and regret, per metric."""
    out: dict[str, float] = {}
    for metric in CANDIDATES:
        for group, tag in ((ALL, "all"), (MEAN_WITHIN, "within")):
            estimate = result.rho.get((metric, "knn_acc", group))
            if estimate is not None and math.isfinite(estimate.value):
                out[f"rho_knn_{tag}_{metric}"] = estimate.value
        pick = result.regret.get((metric, ALL))
        if pick is not None and math.isfinite(pick[0].value):
            out[f"regret_knn_points_{metric}"] = pick[0].value
    out["regret_knn_points_random"] = result.random[ALL].value
    return out


# ------------------------------------------------------------------------------------------------ command line


def study_parser() -> Any:
    common = parser(STUDY, __doc__.split("\n\n")[0])
    # The robustness studies' options, with this study's scales in place of theirs.
    p = argparse.ArgumentParser(prog=common.prog, description=common.description, parents=[common], add_help=False,
                                conflict_handler="resolve")
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke", help="budget (default: smoke)")
    p.add_argument("--report", metavar="FOLDER", type=Path,
                   help="only write the report again from a study folder whose search ran (nothing is trained)")
    return p


def scale_from_args(args: Any) -> ValidationScale:
    """The scale with the command line's overrides (the options ``experiments.common.scale_from_args`` reads for
    the robustness studies, whose scales it looks up in its own table)."""
    scale = SCALES[args.scale]
    overrides = {
        "seeds": tuple(int(s) for s in args.seeds.split(",") if s.strip()) if args.seeds else None,
        "epochs": args.epochs or None,
        "fixed": {**scale.fixed, "data": args.data} if args.data else None,
        "cpus_per_trial": args.cpus_per_trial or None,
        "gpus_per_trial": args.gpus_per_trial,
    }
    changed = {key: value for key, value in overrides.items() if value is not None}
    if not changed:
        return scale
    shown = ", ".join(f"data {value['data']}" if key == "fixed" else f"{key} {value}" for key, value in changed.items())
    return replace(scale, description=f"{scale.description}; changed on the command line: {shown}", **changed)


def report_study(folder: Path, design: Mapping[str, Any], *, n_resamples: int, seed: int
                 ) -> tuple[Path, Validation, pd.DataFrame]:
    """Read a study folder (its ``grid.yaml`` and the search's ``grid/results.parquet``) and write its report."""
    from search.space import load_space

    rows = pd.read_parquet(folder / "grid" / "results.parquet").to_dict("records")
    trials = trial_table(rows, load_space(folder / "grid.yaml"))
    if len(trials) < 2:
        raise RuntimeError(f"{len(trials)} of {len(rows)} trials finished in {folder}; nothing to validate")
    report, result = write_report(trials, {**design, "unfinished": len(rows) - len(trials)}, folder / REPORT_FOLDER,
                                  n_resamples=n_resamples, seed=seed)
    trials.to_csv(folder / REPORT_FOLDER / "trials.csv", index=False)
    return report, result, trials


def main(argv: Sequence[str] | None = None) -> int:
    import time

    from experiments.common import Study

    cli = study_parser()
    args = cli.parse_args(argv)
    if args.report is not None:
        needed = (STUDY_FILE, "grid.yaml", "grid/results.parquet")
        missing = [name for name in needed if not (args.report / name).exists()]
        if missing:  # one line, as csl-search's errors
            print(f"{cli.prog}: error: --report {args.report}: no {', '.join(missing)} there; name a folder this "
                  "study wrote (runs/<study run name>) whose search has run", file=sys.stderr)
            return 2
        design = json.loads((args.report / STUDY_FILE).read_text(encoding="utf-8"))
        report, _, _ = report_study(args.report, design, n_resamples=args.resamples, seed=args.seed)
        print(report.read_text(encoding="utf-8"))
        print(f"report: {report}")
        return 0
    scale = scale_from_args(args)
    fixed = scale.trial_fixed()
    design = {
        "kind": "label_free_validation",
        "title": "Label-free metrics validated against labels",
        "metric": "knn_acc", "mode": "max", "label_free": list(LABEL_FREE), "candidates": list(CANDIDATES),
        "methods": list(scale.methods), "lr_factors": list(scale.lr_factors), "seeds": list(scale.seeds),
        "trials": scale.trials,
        "epochs": scale.epochs, "label_free_samples": fixed.get("label_free_samples"), "fixed": fixed,
        "stages": {"grid": {"role": "label_free_validation", "scheduler": "fifo", "searcher": "grid",
                            "epochs": scale.epochs}},
    }
    study = Study.start(STUDY, args, scale, design)  # type: ignore[arg-type]
    started = time.time()
    try:
        study.run_stage("grid", write_study_space(scale, study.folder), scheduler="fifo", searcher="grid")
        report, result, _ = report_study(study.folder, study.design, n_resamples=args.resamples, seed=args.seed)
        client = study.client
        client.log_artifacts(study.run_id, str(study.folder / REPORT_FOLDER), REPORT_FOLDER)
        for name, value in {**headline_metrics(result), "study_wall_time_s": time.time() - started}.items():
            client.log_metric(study.run_id, name, value)
    except BaseException as exc:
        study.client.set_tag(study.run_id, "csl.error", f"{type(exc).__name__}: {exc}"[:4000])
        study.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    study.finish("FINISHED")
    print(report.read_text(encoding="utf-8"))
    print(f"report: {report}")
    print(f"MLflow: experiment '{study.experiment}', study run {study.run_id} ({study.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
