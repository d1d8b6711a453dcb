"""Live progress of a search on stderr: trials ended / running / pending of the total, epochs done of planned, the
best so far (``search.best``), elapsed time and an ETA, and a warning when MLflow stops answering.

On a terminal it is one line rewritten in place (``\\r``) every second; otherwise (a pipe, a CI log) a line every
``every_s`` seconds and at each trial's end. Trial ends are also printed as lines of their own in both cases.

``Progress`` is a Tune callback fed by the same events as ``search.callback.MlflowTrialCallback``; a small thread
redraws it, because a stuck MLflow call blocks Tune's loop (and with it every callback): the thread is what can
still say "MLflow not answering". ``CallWatch`` is how it knows: the MLflow callback's client is ``watched``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from ray.tune import Callback

from search import best
from search.status import planned_epochs, trial_status

log = logging.getLogger(__name__)

STALL_S = 10.0  # an MLflow call that takes longer than this is reported as "not answering"
TTY_REFRESH_S = 1.0
DEFAULT_EVERY_S = 30.0


class CallWatch:
    """When the MLflow client's call in progress began (None: idle), and the last error it raised."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy_since: float | None = None
        self.last_error: str | None = None
        self.error_at: float | None = None

    def begin(self) -> None:
        with self._lock:
            if self.busy_since is None:
                self.busy_since = time.monotonic()

    def end(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.busy_since = None
            if error is not None:
                text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                self.last_error, self.error_at = text[:200], time.monotonic()

    def trouble(self, now: float | None = None) -> str | None:
        """A warning to show, or None while MLflow answers."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.busy_since is not None and now - self.busy_since > STALL_S:
                return f"MLflow not answering for {now - self.busy_since:.0f} s (still trying)"
            if self.error_at is not None and now - self.error_at < 60:
                return f"MLflow error: {self.last_error}"
        return None


class _Watched:
    """An MlflowClient whose every method call is timed by a CallWatch (the client's API is unchanged)."""

    def __init__(self, client: Any, watch: CallWatch) -> None:
        self._client, self._watch = client, watch

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value
        watch = self._watch

        def call(*args: Any, **kwargs: Any) -> Any:
            watch.begin()
            try:
                result = value(*args, **kwargs)
            except Exception as exc:
                watch.end(exc)
                raise
            watch.end()
            return result

        return call


def watched(client: Any, watch: CallWatch) -> Any:
    return _Watched(client, watch)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Printer:
    """Writes progress to a stream: rewritten in place on a terminal, else as lines. Thread-safe."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self._lock = threading.RLock()
        self._live = ""  # the line shown in place (terminal only)

    def live(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self._live = text
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """A line that stays (a trial's end, a warning): above the live line on a terminal."""
        with self._lock:
            self.clear()
            self.stream.write(text + "\n")
            if self._live:
                self.stream.write(self._live)
            self.stream.flush()

    def clear(self) -> None:
        with self._lock:
            if self.tty and self._live:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def redraw(self) -> None:
        with self._lock:
            if self.tty and self._live:
                self.stream.write(self._live)
                self.stream.flush()

    def done(self) -> None:
        with self._lock:
            if self.tty and self._live:
                self.stream.write("\n")
                self.stream.flush()
            self._live = ""


class LineHandler(logging.Handler):
    """Log records (warnings of the search) as lines through the Printer, so they never garble the live line."""

    def __init__(self, printer: Printer, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.printer = printer
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.printer.line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Progress(Callback):
    """The search's progress line (module docstring). ``total``: trials the search plans (num_samples)."""

    def __init__(
        self, *, total: int, max_epochs: int, metric: str, mode: str, printer: Printer,
        watch: CallWatch | None = None, every_s: float = DEFAULT_EVERY_S, name: Callable[[Any], str] | None = None,
        on_end: Callable[[Any, str], None] | None = None,
    ) -> None:  # fmt: skip
        self.total, self.max_epochs, self.metric, self.mode = int(total), int(max_epochs), metric, mode
        self.printer, self.watch, self.every_s = printer, watch, float(every_s)
        self.name = name or (lambda trial: str(trial.trial_id))
        self.on_end = on_end  # called with (trial, status) when a trial ends: the MLflow run's link goes to the log
        self._lock = threading.RLock()
        self._trials: list[Any] = []
        self._ended: dict[str, str] = {}  # Ray trial id -> finished / stopped / failed / diverged
        self._epochs: dict[str, int] = {}  # Ray trial id -> last epoch reported
        self._best: dict[str, best.Best] = {}  # Ray trial id -> its best epoch so far (search.best)
        self._short: dict[str, str] = {}
        self._trained = 0  # epochs reported while this driver ran (the ETA's rate)
        self._started = time.monotonic()
        self._last_line = 0.0
        self._warned: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Tune pickles its callbacks with the experiment (csl-search never reads them back): the thread and lock stay.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ state

    def _see(self, trials: list) -> None:
        with self._lock:
            self._trials = list(trials)
            for trial in trials:
                if trial.trial_id in self._epochs or not trial.last_result:
                    continue
                # Restored by a resume: what it reported before this driver (its last result only).
                last = trial.last_result
                self._epochs[trial.trial_id] = int(last.get("epoch") or 0)
                if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self._ended:
                    planned = planned_epochs(trial.config, self.max_epochs)
                    self._ended[trial.trial_id] = trial_status(trial.status, last, planned)

    def counts(self) -> dict[str, int]:
        with self._lock:
            ended: dict[str, int] = {"finished": 0, "stopped": 0, "failed": 0, "diverged": 0}
            for status in self._ended.values():
                ended[status] = ended.get(status, 0) + 1
            running = sum(t.status == "RUNNING" and t.trial_id not in self._ended for t in self._trials)
            pending = max(self.total - sum(ended.values()) - running, 0)
            return {**ended, "running": running, "pending": pending}

    def epochs(self) -> tuple[int, int]:
        """(epochs done, epochs planned): an ended trial plans what it ran, a trial not yet proposed the budget."""
        with self._lock:
            done = sum(self._epochs.values())
            planned = 0
            for trial in self._trials:
                if trial.trial_id in self._ended:
                    planned += self._epochs.get(trial.trial_id, 0)
                else:
                    planned += planned_epochs(trial.config, self.max_epochs)
            planned += max(self.total - len(self._trials), 0) * self.max_epochs
            return done, max(planned, done)

    def leader(self) -> tuple[str, best.Best] | None:
        """The best trial so far by search.best's ranking, with its best epoch; None before any finite value."""
        with self._lock:
            found = [(tid, b) for tid, b in self._best.items() if b.found]
            if not found:
                return None
            return min(found, key=lambda item: best.rank_key(item[1], self.mode, item[0]))

    def text(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        c = self.counts()
        ended = c["finished"] + c["stopped"] + c["failed"] + c["diverged"]
        parts = [
            f"trials {ended}/{self.total} ended ({c['finished']} finished, {c['stopped']} stopped, "
            f"{c['failed'] + c['diverged']} failed), {c['running']} running, {c['pending']} pending"
        ]
        done, planned = self.epochs()
        parts.append(f"epochs {done}/{planned}")
        leader = self.leader()
        if leader is not None:
            trial_id, found = leader
            parts.append(f"best {self.metric} {found.value:.4g} ({self._short.get(trial_id, trial_id)}, "
                         f"epoch {found.epoch})")  # fmt: skip
        elapsed = now - self._started
        timing = f"{duration(elapsed)} elapsed"
        if self._trained and planned > done:
            timing += f", ETA {duration(elapsed / self._trained * (planned - done))}"
        parts.append(timing)
        trouble = self.watch.trouble(now) if self.watch is not None else None
        if trouble:
            parts.append(f"WARNING {trouble}")
        return " | ".join(parts)

    # ------------------------------------------------------------------ drawing

    def show(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.printer.tty or force or now - self._last_line >= self.every_s:
            self._last_line = now
            self.printer.live(("" if self.printer.tty else "progress: ") + self.text(now))

    def _tick(self) -> None:
        step = TTY_REFRESH_S if self.printer.tty else min(TTY_REFRESH_S, self.every_s)
        while not self._stop.wait(step):
            try:
                trouble = self.watch.trouble() if self.watch is not None else None
                if trouble and trouble != self._warned and not self.printer.tty:
                    self.show(force=True)  # a pipe shows the warning at once, not at the next period
                self._warned = trouble
                self.show()
            except Exception:  # noqa: BLE001 - progress must never stop a search
                log.debug("progress line failed", exc_info=True)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, name="csl-progress", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if self.printer.tty or time.monotonic() - self._last_line > 2:  # a pipe got its line at the last end
                self.show(force=True)
            self.printer.done()

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info: Any) -> None:
        self.start()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._see(trials)
        self.start()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._short[trial.trial_id] = self.name(trial)
        self._see(trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = result.get("epoch")
        if not isinstance(epoch, int):
            return
        with self._lock:
            self._see(trials)
            if epoch > self._epochs.get(trial.trial_id, 0):
                self._trained += epoch - self._epochs.get(trial.trial_id, 0)
                self._epochs[trial.trial_id] = epoch
            current = self._best.get(trial.trial_id, best.NONE)
            self._best[trial.trial_id] = best.update(current, epoch, result.get(self.metric), self.mode)

    def _ended_now(self, trial: Any, status: str) -> None:
        with self._lock:
            self._ended[trial.trial_id] = status
            self._short.setdefault(trial.trial_id, self.name(trial))
            epochs = self._epochs.get(trial.trial_id, int((trial.last_result or {}).get("epoch") or 0))
            planned = planned_epochs(trial.config, self.max_epochs)
            found = self._best.get(trial.trial_id, best.NONE)
        value = f", best {self.metric} {found.value:.4g} at epoch {found.epoch}" if found.found else ""
        self.printer.line(f"trial {self._short[trial.trial_id]} {status} after {epochs}/{planned} epochs{value}")
        if not self.printer.tty:
            self.show(force=True)
        if self.on_end is not None:
            try:
                self.on_end(trial, status)
            except Exception:  # noqa: BLE001
                log.debug("on_end failed", exc_info=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._see(trials)
        planned = planned_epochs(trial.config, self.max_epochs)
        self._ended_now(trial, trial_status("TERMINATED", trial.last_result or {}, planned))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._see(trials)
        self._ended_now(trial, "failed")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._see(trials)
        self.close()
