"""The error style of ``csl-search`` and the studies: one line ``PROG: error: ...``, an exit code, and the traceback
only with ``--debug``.

Exit codes: 2 bad input (a space file, an option, a storage folder that cannot be written: nothing was started),
1 could not run (a tracking store that does not answer, a folder that cannot be resumed as it is, a failure of
Ray), 130 interrupted (Ctrl-C, SIGTERM: the search can be resumed).
"""

from __future__ import annotations

import sys

from csl.errors import one_line
from search.interrupt import EXIT_CODE as EXIT_INTERRUPTED


class UsageError(ValueError):
    """Bad input on the command line, said in one line."""


class ResumeError(RuntimeError):
    """A search that cannot be resumed as it is; the message names the file, the problem and what to do."""


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected error, None for an unexpected one."""
    from search.space import SpaceError
    from search.storage import StorageError
    from search.tracking import TrackingUnavailable

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    # A CompareError exists only once search.compare is loaded (importing it here would import Ray)
    compare = sys.modules.get("search.compare")
    if compare is not None and isinstance(exc, compare.CompareError):
        return 2
    if isinstance(exc, (SpaceError, StorageError, UsageError)):
        return 2
    if isinstance(exc, (TrackingUnavailable, ResumeError)):
        return 1
    if isinstance(exc, ValueError):  # e.g. pbt over a space without continuous dimensions, a trial too big
        return 2
    return None


def report(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; return its exit code (1 for an unexpected error)."""
    code = exit_code(exc)
    if isinstance(exc, KeyboardInterrupt):
        path = getattr(exc, "experiment_path", None)
        message = f"interrupted; continue with: csl-search resume {path}" if path else "interrupted"
    elif code is None:
        message = f"{type(exc).__name__}: {one_line(exc)} (--debug shows where)"
    else:
        message = one_line(exc)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code if code is not None else 1
