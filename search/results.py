"""The search's tables, read from the Ray experiment folder and written with pyarrow.

``results.parquet``: one row per trial, its columns in this order:

1. what happened: ``trial_id``, ``trial_name``, ``status`` (finished, stopped, failed, diverged), ``error``,
   ``epochs`` run, ``planned_epochs``, ``wall_time_s``, where and how it ran (``node_id``, ``node_ip``,
   ``hostname``, ``precision``: bf16 or float32);
2. ``best_epoch``: the trial's best epoch by the search metric and mode (``search.best``), then ``best_<m>`` for
   every epoch metric ``m``: its value at that epoch (so ``best_<search metric>`` is the trial's best value), then
   ``last_<m>``: its value at the trial's last epoch;
3. ``mlflow_run_id`` (and ``variant`` for a neighbourhood space);
4. the searched keys, in the space's order (aspects, then its other dimensions);
5. every other option of the resolved config (``search.tracking.resolved_config``: the trial's config filled from
   its preset and the trainer defaults, the values its MLflow params hold), sorted by name. An option whose name
   is taken by a column above or by a metric is written as ``config.<name>``: today only ``config.epochs``
   (the planned length, which ``planned_epochs`` also holds; ``epochs`` is what it ran).

``history.parquet``: one row per trial per reported epoch: ``trial_id``, ``epoch``, the epoch metrics,
``diverged``, ``time_total_s``, ``timestamp``, ``epoch_node_id`` (where that epoch ran). The two tables share one
column name only, ``trial_id``, which joins them.

Both carry ``csl.metric`` / ``csl.mode`` / ``csl.space`` in their schema metadata and need nothing but pyarrow
to read. An epoch reported twice (a trial resumed from an older checkpoint) keeps its latest row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

from search import best
from search.status import EPOCH_METRICS, NODE_KEYS, error_summary, planned_epochs, trial_status
from search.tracking import resolved_config

STATUS_FILE = "trial_status.json"


class FinalStatus(Callback):
    """Writes every trial's live status into the experiment folder when the experiment ends.

    Tune's snapshot of a trial is only rewritten when the trial is marked for it, and a trial stopped while it
    is PAUSED (HyperBand's successive halving) is not: the experiment state on disk still says PAUSED for a
    trial that Tune terminated. ``collect`` prefers this file. A search stopped by a signal writes none (and
    removes an older one): Tune's cleanup marks its running trials TERMINATED, its last snapshot holds them as they
    were (``search.interrupt``).
    """

    def __init__(self, interrupt: Any = None) -> None:
        self.interrupt = interrupt  # search.interrupt.Interrupt

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not trials:
            return
        storage = trials[0].storage
        path = f"{storage.experiment_fs_path}/{STATUS_FILE}"
        if self.interrupt is not None and self.interrupt.requested:
            try:
                storage.storage_filesystem.delete_file(path)
            except (FileNotFoundError, OSError):
                pass
            return
        with storage.storage_filesystem.open_output_stream(path) as f:
            f.write(json.dumps({t.trial_id: t.status for t in trials}).encode())


# ``epoch_node_id``: where that epoch ran (a trial can move between nodes); not ``node_id``, results.parquet's
# column of where the trial ran last, so that the two tables join on ``trial_id`` with no other shared name.
HISTORY_COLUMNS = ("trial_id", "epoch", *EPOCH_METRICS, "diverged", "time_total_s", "timestamp", "epoch_node_id")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _history_rows(trial_id: str, frame: Any) -> list[dict[str, Any]]:
    """Rows of one trial's result file (a pandas DataFrame), one per epoch, the latest report of an epoch kept."""
    if frame is None or len(frame) == 0 or "epoch" not in frame.columns:
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in frame.to_dict("records"):
        epoch = _number(record.get("epoch"))
        if epoch is None or math.isnan(epoch):
            continue
        row: dict[str, Any] = {"trial_id": trial_id, "epoch": int(epoch)}
        for key in (*EPOCH_METRICS, "time_total_s"):
            row[key] = _number(record.get(key))
        row["diverged"] = int(_number(record.get("diverged")) or 0)
        row["timestamp"] = int(_number(record.get("timestamp")) or 0)
        node = record.get("node_id")
        row["epoch_node_id"] = node if isinstance(node, str) else None
        by_epoch[int(epoch)] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def collect(
    experiment_path: str,
    *,
    max_epochs: int,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    statuses: Mapping[str, str] | None = None,
    storage_filesystem: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(trial rows, history rows) of the experiment in ``experiment_path`` (local folder or URI).

    The rows have no ``best_*`` / ``last_*`` columns yet: ``score`` adds them once the history is complete.
    ``extra``: more columns per Ray trial id (the MLflow run id, the variant), put before the config's keys.
    ``statuses``: Ray status per trial id as the driver last saw it (``FinalStatus``), over the snapshot's.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=storage_filesystem)
    frames = analysis.trial_dataframes
    trials, history = [], []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        config = dict(trial.config or {})
        planned = planned_epochs(config, max_epochs)
        status = trial_status((statuses or {}).get(trial.trial_id, trial.status), last, planned)
        rows = _history_rows(trial.trial_id, frames.get(trial.trial_id))
        history.extend(rows)
        error = None
        if status == "failed":
            error = error_summary(trial)[0]
        elif status == "diverged":
            error = str(last.get("error") or "loss became NaN/inf")
        row: dict[str, Any] = {
            "trial_id": trial.trial_id,
            "trial_name": str(trial),
            "status": status,
            "error": error,
            "epochs": max((r["epoch"] for r in rows), default=int(_number(last.get("epoch")) or 0)),
            "planned_epochs": planned,
            "wall_time_s": _number(last.get("time_total_s")),
            **{key: last.get(key) if isinstance(last.get(key), str) else None for key in NODE_KEYS},
            "mlflow_run_id": None,
        }
        row.update((extra or {}).get(trial.trial_id, {}))
        for key, value in sorted(resolved_config(config).items()):
            row[config_column(key)] = value
        trials.append(row)
    return trials, history


def config_column(option: str) -> str:
    """The results.parquet column of a config option: its flat name, unless a trial column or a metric has it."""
    return f"config.{option}" if option in TRIAL_COLUMNS or option in EPOCH_METRICS else option


def score(trials: list[dict[str, Any]], history: list[dict[str, Any]], *, metric: str, mode: str) -> None:
    """Add ``best_epoch``, ``best_<m>`` and ``last_<m>`` to every trial row from its (complete) history."""
    per_trial: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(history, key=lambda r: r["epoch"]):
        per_trial.setdefault(row["trial_id"], []).append(row)
    for trial in trials:
        rows = per_trial.get(trial["trial_id"], [])
        found = best.best_of(((r["epoch"], r.get(metric)) for r in rows), mode)
        at_best = next((r for r in rows if r["epoch"] == found.epoch), {})
        final = rows[-1] if rows else {}
        trial["best_epoch"] = found.epoch
        for name in EPOCH_METRICS:
            trial[f"best_{name}"] = at_best.get(name)
            trial[f"last_{name}"] = final.get(name)


def trial_best(row: Mapping[str, Any], metric: str) -> best.Best:
    """A scored trial row's best epoch and value (``score``)."""
    value = row.get(f"best_{metric}")
    return best.Best(row.get("best_epoch"), float(value)) if best.finite(value) else best.NONE


def _column(values: Sequence[Any]) -> pa.Array:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.int64())
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    if not present:
        return pa.array(values, type=pa.string())
    return pa.array([None if v is None else v if isinstance(v, str) else repr(v) for v in values], type=pa.string())


def to_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] = (), meta: Mapping[str, str] | None = None):
    """A pyarrow table with the given columns first, then every other key in first-seen order."""
    rows = list(rows)
    names = list(columns)
    for row in rows:
        names.extend(k for k in row if k not in names)
    arrays = [_column([row.get(name) for row in rows]) for name in names]
    schema_meta = {k.encode(): str(v).encode() for k, v in (meta or {}).items()}
    return pa.Table.from_arrays(arrays, names=names).replace_schema_metadata(schema_meta or None)


TRIAL_COLUMNS = (
    "trial_id", "trial_name", "status", "error", "epochs", "planned_epochs", "wall_time_s", *NODE_KEYS,
    "best_epoch", *(f"best_{m}" for m in EPOCH_METRICS), *(f"last_{m}" for m in EPOCH_METRICS),
    "mlflow_run_id",
)  # fmt: skip


def result_columns(trials: Sequence[Mapping[str, Any]], searched: Sequence[str] = ()) -> list[str]:
    """results.parquet's column order (module docstring): trial columns, searched keys, the other options."""
    present = {key for row in trials for key in row}
    head = [*TRIAL_COLUMNS, *(["variant"] if "variant" in present else [])]
    searched = [config_column(k) for k in searched if config_column(k) in present and config_column(k) not in head]
    return [*head, *dict.fromkeys(searched), *sorted(present - set(head) - set(searched))]


def write_tables(
    folder: str, trials: list[dict[str, Any]], history: list[dict[str, Any]], meta: Mapping[str, str],
    searched: Sequence[str] = (),
) -> tuple[str, str]:
    """Write ``results.parquet`` and ``history.parquet`` into ``folder`` (local path or URI); return their paths.

    ``searched``: the space's searched keys, the first config columns.
    """
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(folder) if "://" in folder else (pafs.LocalFileSystem(), folder)
    fs.create_dir(base, recursive=True)
    results_path = f"{base.rstrip('/')}/results.parquet"
    history_path = f"{base.rstrip('/')}/history.parquet"
    pq.write_table(to_table(trials, result_columns(trials, searched), meta), results_path, filesystem=fs)
    pq.write_table(to_table(history, HISTORY_COLUMNS, meta), history_path, filesystem=fs)
    return results_path, history_path


def ranked(trials: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Scored trial rows in the order of the one ranking (``search.best``)."""
    return best.ranked(trials, mode=mode, best=lambda r: trial_best(r, metric), trial_id=lambda r: str(r["trial_id"]))


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> best.BestTrial | None:
    """The first of the ranking, when it has a best value."""
    for row in ranked(trials, metric, mode)[:1]:
        found = trial_best(row, metric)
        if found.found:
            return best.BestTrial(metric, str(row["trial_id"]), row.get("mlflow_run_id"), int(found.epoch), found.value)
    return None


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)


def ranking_text(trials: list[dict[str, Any]], *, metric: str, mode: str, shown: Sequence[str], top: int = 20) -> str:
    """The table a search prints: its trials in the order of the ranking, best first."""
    rows = [{"rank": i + 1, **r} for i, r in enumerate(ranked(trials, metric, mode)[:top])]
    columns = ["rank", "trial_id", "status", f"best_{metric}", "best_epoch", f"last_{metric}", "epochs",
               "wall_time_s", *(config_column(k) for k in shown)]
    return format_table(rows, [c for c in dict.fromkeys(columns)])
