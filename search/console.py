"""What a running search prints on the terminal, and what goes to its log file instead.

The terminal gets the progress line (``search.progress``), the search's warnings and the trials' own output (a
traceback, a warning of the trainer). The search's log file (``search.log`` in the experiment folder) gets the
rest: every log record of the search, Ray and MLflow at INFO, the trials' "Checkpoint successfully created" lines
(Ray Train logs one per epoch in the trial's worker and Ray forwards it to the driver) and the link to each
trial's MLflow run as it ends. MLflow's own "🏃 View run ... at" lines, printed to stdout whenever a run on a
tracking server ends, are turned off for the search (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``); the links the
log file holds open the runs view that MLflow 3's UI hides behind its GenAI landing page (``runs_url``).

Ray's forwarded worker output is filtered where the driver prints it: Ray's handler named ``ray_print_logs`` on
its stdstream dispatcher is swapped, for the search, for one that sends the noise to the log file and the rest to
Ray's own printer. Ray's own "Current best trial" line (``-v``) ranks trials by their last result, not by
``search.best``'s definition, so it is not printed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from search.progress import LineHandler, Printer

LOG_FILE = "search.log"
# Forwarded worker lines that go to the log file only: Ray Train's per-epoch checkpoint line, MLflow's links, and the
# INFO lines of the system-metrics monitor each trial starts (search.system_metrics).
NOISE = re.compile(r"Checkpoint successfully created at|View run .* at: |View experiment at: |"
                   r"INFO mlflow\.system_metrics|"
                   # Ray Train's progress in a trial of several workers (search.train_trial); its placement group
                   # cleaner asks the State API, which a local instance without the dashboard does not serve
                   r"Reporting training result \d|Setting up process group for|Started training worker group|"
                   r"^- \(ip=\S+, pid=\d+\) world_rank=|Requesting resources: |Attempting to start training "
                   r"worker group|Failed to query Ray Train Controller actor state|class name: 'PreemptionWatcher' and ID")
LOGGERS = ("search", "ray", "mlflow")
SUPPRESS_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
# MLflow's download bar, drawn when a trial's best model is read back to be logged (search.models)
QUIET_ENV = {SUPPRESS_URLS: "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
_RAY_HANDLER = "ray_print_logs"


def _swap_worker_printer(log_file: logging.Logger, printer: Printer) -> Any:
    """Replace Ray's printer of forwarded worker output; returns what to put back (None: nothing swapped)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: leave its output as it is
        return None
    original = [pair for pair in dispatcher.handlers if pair[0] == _RAY_HANDLER]
    if not original:
        return None
    ray_print = original[0][1]

    def filtered(data: dict[str, Any]) -> None:
        lines = list(data.get("lines") or [])
        keep = [line for line in lines if not NOISE.search(line)]
        for line in lines:
            if NOISE.search(line):
                log_file.info("(%s pid=%s) %s", data.get("actor_name") or data.get("task_name") or "worker",
                              data.get("pid"), line)  # fmt: skip
        if keep:
            printer.clear()
            ray_print({**data, "lines": keep})
            printer.redraw()

    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_RAY_HANDLER, filtered)
    return dispatcher, original[0]


@contextmanager
def routed(log_path: str | Path, printer: Printer, *, ray_verbose: int = 0) -> Iterator[logging.Logger]:
    """While a search runs: its log file set up, its warnings through ``printer``, the noise off the terminal.

    Yields the logger whose records go to the log file only (``csl.search_log``).
    """
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = LineHandler(printer)
    file_only = logging.getLogger("csl.search_log")
    file_only.propagate = False
    file_only.setLevel(logging.INFO)
    file_only.addHandler(to_file)
    saved_levels = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved_levels[name] = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(to_file)
    search_log = logging.getLogger("search")
    search_log.addHandler(to_terminal)
    saved_env = {key: os.environ.get(key) for key in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    swapped = _swap_worker_printer(file_only, printer)
    best_line = _hide_ray_best_line() if ray_verbose else _hide_ray_banner(file_only)
    ray_terminal = [h for h in logging.getLogger("ray").handlers if h is not to_file]
    ray_levels = [h.level for h in ray_terminal]
    for handler in ray_terminal:  # Ray's INFO lines ("Wrote the latest version of all result files ...") to the file
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield file_only
    finally:
        for handler, level in zip(ray_terminal, ray_levels):
            handler.setLevel(level)
        if best_line is not None:
            best_line()
        if swapped is not None:
            dispatcher, pair = swapped
            dispatcher.remove_handler(_RAY_HANDLER)
            dispatcher.add_handler(*pair)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        search_log.removeHandler(to_terminal)
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(to_file)
            logging.getLogger(name).setLevel(saved_levels[name])
        file_only.removeHandler(to_file)
        to_file.close()


def _hide_ray_banner(file_only: logging.Logger) -> Any:
    """Without ``-v``: Ray's box "Configuration for experiment" and its "View detailed results here" lines, which
    it prints at every verbosity, go to the log file; returns the function that puts them back."""
    try:
        from ray.tune.experimental.output import TuneReporterBase, TuneTerminalReporter
    except ImportError:
        return None
    saved = {cls: cls.__dict__["experiment_started"] for cls in (TuneReporterBase, TuneTerminalReporter)
             if "experiment_started" in cls.__dict__}  # fmt: skip

    def to_log(self: Any, experiment_name: str, experiment_path: str, *args: Any, **kwargs: Any) -> None:
        file_only.info("Ray Tune experiment %s: results in %s", experiment_name, experiment_path)

    for cls in saved:
        cls.experiment_started = to_log

    def restore() -> None:
        for cls, method in saved.items():
            cls.experiment_started = method

    return restore


def _hide_ray_best_line() -> Any:
    """Ray's status table without its "Current best trial" line; returns the function that puts it back."""
    try:
        from ray.tune.experimental import output
    except ImportError:
        return None
    original = output._current_best_trial
    output._current_best_trial = lambda trials, metric, mode: (None, None)

    def restore() -> None:
        output._current_best_trial = original

    return restore
