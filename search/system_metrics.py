"""MLflow system metrics (CPU, memory, disk, network; GPU through pynvml when it is installed) on every trial's run.

Where the monitor runs: in the trial's own worker process, not in the driver. The driver creates the trial's run
(``search.callback``) but may sit on another machine: psutil and NVML measure the machine they run on, so only a
monitor beside the training describes the trial's node (its GPU, its memory). The worker finds its run by the tags
the driver set (``csl.trial_id`` under the search's parent run), waiting a little for the driver to create it, and
logs ``system/*`` metrics with MLflow's own ``SystemMetricsMonitor``.

Sampling: a sample every second, a point every ``SAMPLES_PER_POINT`` samples (so a long trial's metric history stays
small), and what was sampled since the last point is logged when the trial ends, so that a trial of a few seconds
still gets one point. A tracking store the worker cannot reach (a SQLite file on another machine) costs a warning
in the trial's log, never the trial. ``csl-search run --no-system-metrics`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLING_S = 1.0
SAMPLES_PER_POINT = 10
FIND_RUN_S = 30.0  # how long a trial waits for the driver to create its run


def _monitor_class() -> Any:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class TrialMonitor(SystemMetricsMonitor):
        """MLflow's monitor, which on finish also logs the samples taken since its last point."""

        def finish(self) -> None:
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            self._process = None
            try:
                if any(monitor._metrics for monitor in self.monitors):
                    self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as exc:  # noqa: BLE001 - metrics of the machine are never worth a trial
                log.warning("system metrics of MLflow run %s not logged: %s", self._run_id, exc)

    return TrialMonitor


def find_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The id of the trial's run (made by the driver's callback when the trial starts), or None after a wait."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    query = f"tags.`csl.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    deadline = time.monotonic() + FIND_RUN_S
    while True:
        found = client.search_runs([experiment_id], filter_string=query, max_results=10)
        if found:
            return min(found, key=lambda run: run.info.start_time).info.run_id
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def start(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> Any | None:
    """A started monitor of this machine logging to the trial's run, or None (no run, no psutil, no store)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).is_file():
        # The driver's SQLite file is not on this node: opening it here would create an empty store.
        log.warning("trial %s: the tracking store %s is not on this node; no system metrics", trial_id, tracking_uri)
        return None
    try:
        run_id = find_run(tracking_uri, experiment_id, parent_run_id, trial_id)
        if run_id is None:
            log.warning("trial %s: no MLflow run after %.0f s; no system metrics", trial_id, FIND_RUN_S)
            return None
        monitor = _monitor_class()(run_id, sampling_interval=SAMPLING_S, samples_before_logging=SAMPLES_PER_POINT,
                                   resume_logging=True, tracking_uri=tracking_uri)  # fmt: skip
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - psutil missing, store unreachable: the trial trains anyway
        log.warning("trial %s: no system metrics (%s: %s)", trial_id, type(exc).__name__, exc)
        return None


def monitored(trainable: Callable[[Any], Any], *, tracking_uri: str, experiment_id: str,
              parent_run_id: str) -> Callable[[Any], Any]:  # fmt: skip
    """``trainable`` with a system-metrics monitor around each trial; it keeps the trainable's name, which
    names the trials' folders (``search.run.trial_dirname``, which resume depends on)."""

    @functools.wraps(trainable)
    def with_system_metrics(config: Any) -> Any:
        from ray import tune

        monitor = start(tracking_uri, experiment_id, parent_run_id, tune.get_context().get_trial_id())
        try:
            return trainable(config)
        finally:
            if monitor is not None:
                monitor.finish()

    return with_system_metrics
