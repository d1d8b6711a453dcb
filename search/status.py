"""How a trial ended, in the words the search uses everywhere (MLflow tags, results.parquet, the ranking).

    finished   ran every planned epoch
    stopped    ended without error before its last planned epoch: the scheduler stopped it (ASHA, HyperBand)
    failed     raised, and kept raising through its retries (``FailureConfig(max_failures)``)
    diverged   its loss became NaN/inf (``csl.train.Diverged``): reported once with ``diverged=1``, never retried

Anything else is Ray's own status in lower case (pending, running, paused: an unfinished trial of an interrupted
search). The MLflow run status follows: FINISHED, KILLED, FAILED, FAILED.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csl.metrics import EPOCH_METRICS  # noqa: F401 - re-exported: the one table of the trainer's metrics

ENDED = ("finished", "stopped", "diverged")  # a trial in one of these never trains again (failed ones may retry)
FINAL = (*ENDED, "failed")
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED", "diverged": "FAILED"}
# Where and how a trial ran, in every report and as csl.<key> tags: a cluster can mix GPUs with CPUs that have or
# lack bf16 units, and a result read without its precision could not be compared.
NODE_KEYS = ("node_id", "node_ip", "hostname", "precision")
MAX_TAG = 4000  # characters kept of an error message (MLflow tags hold 8,000; the full text goes to error.txt)


def trial_status(ray_status: str, last_result: Mapping[str, Any], planned_epochs: int) -> str:
    """finished / stopped / failed / diverged for an ended trial, else Ray's status in lower case.

    The driver tells "stopped early by the scheduler" from "finished" by the epochs run: a trial that ended
    without error before its planned last epoch was stopped.
    """
    if last_result.get("diverged"):
        return "diverged"
    if ray_status == "ERROR":
        return "failed"
    if ray_status == "TERMINATED":
        epoch = int(last_result.get("epoch") or 0)
        return "finished" if epoch >= planned_epochs else "stopped"
    return ray_status.lower()


def planned_epochs(config: Mapping[str, Any], default: int) -> int:
    value = config.get("epochs")
    return int(value) if isinstance(value, (int, float)) and value else int(default)


def _trial_error(trial: Any) -> tuple[Any, str]:
    """(the pickled exception or None, the error text) of a trial's last failure.

    While the search runs, Tune writes them into the driver's staging folder (``trial.local_path``) and copies
    them to storage later; read back from an experiment folder, only storage has them. Try both.
    """
    import ray.cloudpickle as cloudpickle

    exc, text = None, ""
    local = ((getattr(trial, "pickled_error_file", None), "pickle"), (getattr(trial, "error_file", None), "text"))
    for path, kind in local:
        try:
            if path and os.path.exists(path):
                if kind == "pickle":
                    with open(path, "rb") as f:
                        exc = cloudpickle.load(f)
                else:
                    text = Path(path).read_text()
        except Exception:  # noqa: BLE001
            pass
    try:
        exc = exc if exc is not None else trial.get_pickled_error()
    except Exception:  # noqa: BLE001
        pass
    try:
        text = text or trial.get_error() or ""
    except Exception:  # noqa: BLE001
        pass
    return exc, str(text)


def error_summary(trial: Any) -> tuple[str, str]:
    """(one-line reason, full text) of a failed trial's last error."""
    exc, full = _trial_error(trial)
    reason = ""
    if exc is not None:
        cause = getattr(exc, "cause", None) or exc
        reason = f"{type(cause).__name__}: {cause}".strip()
    if not reason or reason.startswith("RayTaskError"):
        lines = [line.strip() for line in full.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "unknown error"
    return reason.splitlines()[0][:MAX_TAG], full
