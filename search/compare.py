"""Read a search back from MLflow and say which design choices mattered.

``compare(tracking_uri, experiment=..., parent_run=...)`` finds the search's parent run (by id, or the latest
one of an experiment), its child runs (one per trial, read by ``search.report.mlflow_io``), each trial's best epoch
and value of the search metric (``search.best``, the one meaning of best), and prints:

- the top configurations in the order of the one ranking (rank, trial, status, best value, best epoch, epochs,
  the searched values);
- for each aspect and each other searched dimension, the mean and spread (std) of the best metric per value,
  with counts: the marginal effect of each design choice. Trials without a value (failed, diverged before one
  was reported) count under ``failed``, not in the mean.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from csl.metrics import METRICS
from search import best
from search.report.mlflow_io import TrialRecord, latest_run, trial_records
from search.results import format_table
from search.space.schema import ASPECT_KEYS
from search.tracking import SEARCH_TAG


class CompareError(LookupError):
    """The experiment or run asked for does not exist, or holds no search."""


@dataclass
class Comparison:
    parent_run_id: str
    parent_name: str
    metric: str
    mode: str
    searched: list[str]
    trials: list[TrialRecord] = field(default_factory=list)

    def ranked(self) -> list[TrialRecord]:
        return best.ranked(self.trials, mode=self.mode, best=lambda t: t.best, trial_id=lambda t: t.trial_id)

    def factors(self) -> list[str]:
        """Aspects and searched dimensions that took more than one value in this search."""
        keys = list(dict.fromkeys([*ASPECT_KEYS, *self.searched]))
        return [k for k in keys if len({t.params.get(k) for t in self.trials}) > 1]

    def marginals(self, key: str) -> list[dict[str, Any]]:
        """One row per value of ``key`` (per range, for a numeric key with more than ``BINS`` values)."""
        groups: dict[str, list[TrialRecord]] = {}
        label = _binner([t.params.get(key) for t in self.trials])
        for trial in self.trials:
            groups.setdefault(label(trial.params.get(key)), []).append(trial)
        rows = []
        for value, members in groups.items():
            scores = [float(t.best.value) for t in members if t.best.found]
            rows.append(
                {
                    key: value,
                    "n": len(scores),
                    "mean": statistics.fmean(scores) if scores else None,
                    "std": statistics.stdev(scores) if len(scores) > 1 else None,
                    "best": best.best_of(enumerate(scores), self.mode).value,
                    "failed": sum(not t.best.found for t in members),
                    "finished": sum(t.status == "finished" for t in members),
                }
            )
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted(rows, key=lambda r: (r["mean"] is None, sign * r["mean"] if r["mean"] is not None else 0.0))

    def text(self, top: int = 10) -> str:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        lines = [
            f"search {self.parent_name} (parent run {self.parent_run_id}): {len(self.trials)} trials "
            f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})",
            f"metric: best {self.metric} over each trial's epochs ({self.mode}; ties: the earlier best epoch)",
            "",
            f"top {min(top, len(self.trials))} configurations:",
        ]
        shown = [k for k in dict.fromkeys([*ASPECT_KEYS, *self.searched])]
        rows = [
            {"rank": i + 1, "trial_id": t.trial_id, "status": t.status, self.metric: t.best.value,
             "best_epoch": t.best.epoch, "epochs": t.epochs, **{k: _short(t.params.get(k)) for k in shown}}
            for i, t in enumerate(self.ranked()[:top])
        ]  # fmt: skip
        lines.append(format_table(rows, ["rank", "trial_id", "status", self.metric, "best_epoch", "epochs", *shown]))
        for key in self.factors():
            lines += ["", f"{key}: {self.metric} per value (mean, spread over trials)"]
            lines.append(format_table(self.marginals(key), [key, "n", "mean", "std", "best", "failed", "finished"]))
        if not self.factors():
            lines += ["", "no aspect or searched dimension took more than one value"]
        return "\n".join(lines)


BINS = 3  # a numeric dimension with more distinct values than this is split into this many ranges


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _short(text: Any) -> Any:
    """A param as MLflow stores it (a string), numbers shortened to 4 significant digits."""
    value = _number(text)
    if value is None or not isinstance(text, str) or "." not in text and "e" not in text.lower():
        return text
    return f"{value:.4g}"


def _binner(values: list[Any]):
    """Label values as themselves, or, for many distinct numbers, by the range (of ``BINS`` equal-count ones)."""
    numbers = sorted({v for v in (_number(x) for x in values) if v is not None})
    if len(numbers) <= BINS or len(numbers) < len({x for x in values if x is not None}):
        return lambda value: "-" if value is None else str(value)
    edges = [numbers[round(i * (len(numbers) - 1) / BINS)] for i in range(BINS + 1)]

    def label(value: Any) -> str:
        number = _number(value)
        if number is None:
            return "-" if value is None else str(value)
        for low, high in zip(edges, edges[1:]):
            if number <= high:
                return f"{low:.3g}..{high:.3g}"
        return f"{edges[-2]:.3g}..{edges[-1]:.3g}"

    return label


def load(
    tracking_uri: str, *, experiment: str | None = None, parent_run: str | None = None, metric: str | None = None
) -> Comparison:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if parent_run:
        try:
            parent = client.get_run(parent_run)
        except Exception as exc:  # noqa: BLE001
            raise CompareError(f"no run {parent_run} in {tracking_uri}: {str(exc).splitlines()[0]}") from None
        experiment_id = parent.info.experiment_id
    elif experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise CompareError(f"no experiment '{experiment}' in {tracking_uri}; experiments: {', '.join(names)}")
        experiment_id = found.experiment_id
        parent = latest_run(client, experiment_id, [SEARCH_TAG])
        if parent is None:
            raise CompareError(f"experiment '{experiment}' holds no csl-search run")
    else:
        raise CompareError("give --experiment NAME or --parent-run ID")
    tags = parent.data.tags
    searched_metric = tags.get("csl.metric") or "knn_acc"
    metric = metric or searched_metric
    if metric == searched_metric:
        mode = tags.get("csl.mode") or "max"
    elif metric in METRICS:  # another metric than the search's: compared in its own direction
        mode = METRICS[metric].mode
    else:
        raise CompareError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    comparison = Comparison(
        parent_run_id=parent.info.run_id, parent_name=parent.info.run_name, metric=metric, mode=mode, searched=[]
    )
    for record in trial_records(client, experiment_id, parent.info.run_id, metric, mode):
        searched = [k for k in record.tags.get("csl.searched", "").split(",") if k]
        comparison.searched = list(dict.fromkeys([*comparison.searched, *searched]))
        comparison.trials.append(record)
    return comparison
