"""How a trial ended, in the words the search uses everywhere (MLflow tags, results.parquet, the ranking).

    finished     ran every planned epoch
    stopped      ended without error before its last planned epoch: the scheduler stopped it (ASHA, HyperBand)
    failed       raised, and kept raising through its retries (``FailureConfig(max_failures)``); or its config
                 cannot train (a ``ValueError`` while the run is built: reported once with ``failed=1``, never
                 retried, as the same config fails the same way every time)
    diverged     its loss became NaN/inf or exploded past ``diverge_factor`` (``csl.train.Diverged``): reported
                 once with ``diverged=1``, never retried
    interrupted  the search stopped (Ctrl-C, SIGTERM) before the trial ended: ``csl-search resume`` continues it
                 from its last checkpoint

A trial read back before it ended (pending, running, paused when its search stopped) is ``interrupted``. The
MLflow run status follows: FINISHED, FINISHED, FAILED, FAILED, SCHEDULED (waiting to run again). A stopped trial is
FINISHED, not KILLED: early stopping is the scheduler doing its job, and MLflow's UI draws KILLED runs with the red
cross of a failure; ``csl.status=stopped`` tells it from a finished one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csl.metrics import EPOCH_METRICS  # noqa: F401 - re-exported: the one table of the trainer's metrics

INTERRUPTED = "interrupted"
ENDED = ("finished", "stopped", "diverged")  # a trial in one of these never trains again (failed ones may retry)
FINAL = (*ENDED, "failed")
RUN_STATUS = {
    "finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "diverged": "FAILED", INTERRUPTED: "SCHEDULED",
}  # fmt: skip
# Where and how a trial ran, in every report and as csl.<key> tags: a cluster can mix GPUs with CPUs that have or
# lack bf16 units, and a result read without its precision could not be compared.
NODE_KEYS = ("node_id", "node_ip", "hostname", "precision")
MAX_TAG = 4000  # characters kept of an error message (MLflow tags hold 8,000; the full text goes to error.txt)


def trial_status(ray_status: str, last_result: Mapping[str, Any], planned_epochs: int) -> str:
    """finished / stopped / failed / diverged for an ended trial, else interrupted.

    The driver tells "stopped early by the scheduler" from "finished" by the epochs run: a trial that ended
    without error before its planned last epoch was stopped.
    """
    if last_result.get("diverged"):
        return "diverged"
    if ray_status == "ERROR" or last_result.get("failed"):
        return "failed"
    if ray_status == "TERMINATED":
        epoch = int(last_result.get("epoch") or 0)
        return "finished" if epoch >= planned_epochs else "stopped"
    return INTERRUPTED


def planned_epochs(config: Mapping[str, Any], default: int) -> int:
    value = config.get("epochs")
    return int(value) if isinstance(value, (int, float)) and value else int(default)


def _trial_error(trial: Any) -> str:
    """The text of a trial's last failure (never its pickled exception: the experiment folder is only read).

    While the search runs, Tune writes it into the driver's staging folder (``trial.local_path``) and copies it
    to storage later; read back from an experiment folder, only storage has it. Try both.
    """
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            return Path(path).read_text()
    except OSError:
        pass
    try:
        return str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - a missing or unreadable error file: no text
        return ""


def error_summary(trial: Any) -> tuple[str, str]:
    """(one-line reason, full text) of a failed trial's last error: the exception line that ends its traceback.

    A trial whose config cannot train reported its reason itself (``failed=1``, ``error``).
    """
    last = getattr(trial, "last_result", None) or {}
    if last.get("failed") and last.get("error"):
        return str(last["error"]).splitlines()[0][:MAX_TAG], str(last["error"])
    full = _trial_error(trial)
    lines = [line.strip() for line in full.strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason[:MAX_TAG], full
