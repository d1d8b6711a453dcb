"""The search's tables, read from the Ray experiment folder and written with pyarrow.

``results.parquet``: one row per trial: ``trial_id``, ``trial_name``, ``status`` (finished, stopped, failed,
diverged), ``error``, ``epochs`` run, ``planned_epochs``, ``wall_time_s``, where and how it ran
(``node_id``, ``node_ip``, ``hostname``, ``precision``: bf16 or float32), ``best_ssl_loss`` / ``best_knn_acc`` /
``best_probe_acc``, ``best_epoch`` (of the search metric), ``last_<metric>`` for every epoch metric,
``mlflow_run_id``, then every key of the trial's config (aspects and hyperparameters) under its flat name.

``history.parquet``: one row per trial per reported epoch: ``trial_id``, ``epoch``, the epoch metrics,
``diverged``, ``time_total_s``, ``timestamp``, ``node_id``.

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

from search.status import EPOCH_METRICS, NODE_KEYS, error_summary, planned_epochs, trial_status

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


BEST = {"ssl_loss": min, "knn_acc": max, "probe_acc": max}
HISTORY_COLUMNS = ("trial_id", "epoch", *EPOCH_METRICS, "diverged", "time_total_s", "timestamp", "node_id")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: Any) -> bool:
    number = _number(value)
    return number is not None and math.isfinite(number)


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
        row["node_id"] = node if isinstance(node, str) else None
        by_epoch[int(epoch)] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def collect(
    experiment_path: str,
    *,
    metric: str,
    max_epochs: int,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    statuses: Mapping[str, str] | None = None,
    storage_filesystem: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(trial rows, history rows) of the experiment in ``experiment_path`` (local folder or URI).

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
        }
        for name, pick in BEST.items():
            values = [r[name] for r in rows if _finite(r.get(name))]
            row[f"best_{name}"] = pick(values) if values else None
        scored = [r for r in rows if _finite(r.get(metric))]
        if scored:
            pick = BEST.get(metric, max)
            row["best_epoch"] = pick(scored, key=lambda r: r[metric])["epoch"]
            if f"best_{metric}" not in row:
                row[f"best_{metric}"] = pick(r[metric] for r in scored)
        else:
            row["best_epoch"] = None
            row.setdefault(f"best_{metric}", None)
        final = rows[-1] if rows else {}
        for name in EPOCH_METRICS:
            row[f"last_{name}"] = final.get(name)
        row["mlflow_run_id"] = None
        row.update((extra or {}).get(trial.trial_id, {}))
        for key, value in config.items():
            row.setdefault(key, value)
        trials.append(row)
    return trials, history


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


RESULT_COLUMNS = (
    "trial_id", "trial_name", "status", "error", "epochs", "planned_epochs", "wall_time_s", *NODE_KEYS,
    "best_ssl_loss", "best_knn_acc", "best_probe_acc", "best_epoch", *(f"last_{m}" for m in EPOCH_METRICS),
    "mlflow_run_id",
)  # fmt: skip


def write_tables(
    folder: str, trials: list[dict[str, Any]], history: list[dict[str, Any]], meta: Mapping[str, str]
) -> tuple[str, str]:
    """Write ``results.parquet`` and ``history.parquet`` into ``folder`` (local path or URI); return their paths."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(folder) if "://" in folder else (pafs.LocalFileSystem(), folder)
    fs.create_dir(base, recursive=True)
    results_path = f"{base.rstrip('/')}/results.parquet"
    history_path = f"{base.rstrip('/')}/history.parquet"
    pq.write_table(to_table(trials, RESULT_COLUMNS, meta), results_path, filesystem=fs)
    pq.write_table(to_table(history, HISTORY_COLUMNS, meta), history_path, filesystem=fs)
    return results_path, history_path


def ranked(trials: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first by their best value of the search metric; trials without one last."""
    key = f"best_{metric}"
    sign = -1.0 if mode == "max" else 1.0
    return sorted(trials, key=lambda r: (0, sign * r[key]) if _finite(r.get(key)) else (1, 0.0))


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
    rows = [{"rank": i + 1, **r} for i, r in enumerate(ranked(trials, metric, mode)[:top])]
    columns = ["rank", "trial_id", "status", f"best_{metric}", "best_epoch", "epochs", "wall_time_s", *shown]
    return format_table(rows, [c for c in dict.fromkeys(columns)])
