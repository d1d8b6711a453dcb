"""The entry point: read a space file, parse its YAML, check it against csl, return the :class:`Space`."""

from __future__ import annotations

from pathlib import Path

from search.space.checks import _Checker
from search.space.framework import _framework
from search.space.model import Space
from search.space.schema import SpaceError
from search.space.yaml_loader import _parse_yaml


def load_space(path: str | Path) -> Space:
    """Read and validate a space file (see the ``search.space`` docstring); every problem is one SpaceError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read the space file: {exc}", file=str(path)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpaceError(f"{path}: not UTF-8 text: {exc}", file=str(path)) from exc
    data = _parse_yaml(path, text)
    return _Checker(path, data, _framework()).space(raw, text)
