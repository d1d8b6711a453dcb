"""How the command lines say what went wrong: one line per error (the traceback only with ``--debug``)."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An error's message in one line: its first, or for an error re-raised from a worker process (a DataLoader
    worker, a Ray task: the message holds that process's traceback) the exception line that ends it."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith(("Original Traceback", "Traceback")) for line in lines):
        return lines[-1]
    return lines[0]
