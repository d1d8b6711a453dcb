"""Ctrl-C and SIGTERM pause a search: it stops within seconds, keeps every trial resumable, and says how to go on.

Ray Tune 2.60 stops a run gracefully on SIGINT (and SIGUSR1): it ends its loop, snapshots the experiment with the
running trials as they are, stops their actors, and returns from ``Tuner.fit`` as if the search had ended: the
callbacks then see those trials TERMINATED. SIGTERM (what ``kill``, systemd and schedulers send) it does not catch.
So the search owns both signals while it runs (``TUNE_DISABLE_SIGINT_HANDLER=1`` keeps Tune off SIGINT): the first
one is remembered and, during ``fit``, handed to Tune's own graceful stop (its SIGUSR1 handler); anywhere else, and
at the second signal, it raises ``KeyboardInterrupt``. The callbacks read ``requested`` to record the trials that
were running as ``interrupted`` rather than ended, and the command exits with 130 and prints
``csl-search resume DIR`` (Tune's own hint, ``Tuner.restore(...)``, is not how a csl-search folder resumes: it is
filtered out of Tune's log).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # what a shell reports for a command ended by Ctrl-C


class _NoRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


class Interrupted(KeyboardInterrupt):
    """A search stopped by a signal before Tune ran or after it: ``experiment_path`` is where it can resume."""

    def __init__(self, experiment_path: str | None) -> None:
        super().__init__(experiment_path or "")
        self.experiment_path = experiment_path


class Interrupt:
    """The signals a search received; installed for the duration of ``catching()``, handed to Tune in ``fit()``."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._in_fit = False
        self._catching = False

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def signal_name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else ""

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if len(self.received) == 1 and self._in_fit and callable(tune_stop):
            tune_stop(signum, frame)  # Tune's graceful stop: ends its loop after the current step
            return
        raise KeyboardInterrupt

    @contextmanager
    def catching(self) -> Iterator[Interrupt]:
        """Own SIGINT and SIGTERM (main thread only: elsewhere signals cannot be caught and nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        tune_log, hint = logging.getLogger("ray.tune.tune"), _NoRestoreHint()
        tune_log.addFilter(hint)
        saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
        saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        self._catching = True
        try:
            yield self
        finally:
            self._catching = False
            tune_log.removeFilter(hint)
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if saved_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env

    def reclaim(self) -> None:
        """Own SIGINT and SIGTERM again: ``ray.init`` installs its own SIGTERM handler (``sys.exit``), which would
        end a search without recording its running trials as interrupted. Called after Ray starts and before fit."""
        if self._catching and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """Around ``Tuner.fit``: a first signal stops Tune gracefully instead of raising."""
        if self.requested:  # a signal came while the search was starting: do not start Tune at all
            raise KeyboardInterrupt
        # A handler that an earlier Tuner.fit of this process left behind would swallow the signal: until this
        # fit installs its own, a signal raises.
        usr1 = getattr(signal, "SIGUSR1", None)
        main = threading.current_thread() is threading.main_thread()
        if usr1 is not None and main:
            signal.signal(usr1, signal.SIG_DFL)
        self.reclaim()
        self._in_fit = True
        try:
            yield
        finally:
            self._in_fit = False
            if usr1 is not None and main:
                signal.signal(usr1, signal.SIG_DFL)
