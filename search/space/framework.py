"""What a space is checked against, read from csl when a space is loaded: registered names, options, presets.

Read at load time rather than import time so that a space sees every registered choice and the option types
come from the builders' own signatures: a new builder option is searchable (and type-checked) with no change here.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class _Framework:
    """What the space is checked against, read from csl at load time."""

    names: dict[str, list[str]]  # aspect -> registered names
    known: set[str]  # csl.config.known_options()
    defaults: dict[str, Any]  # csl.config.TRAINER_DEFAULTS
    presets: dict[str, dict[str, Any]] | None  # None while csl.presets does not exist
    types: dict[str, frozenset[type] | None]  # option -> accepted value types (None: unknown, unchecked)
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]] | None
    metrics: dict[str, str]  # csl.metrics.METRICS: what the trainer reports -> the mode in which it is better
    bounds: dict[str, tuple[int, int | None]]  # csl.config.OPTION_BOUNDS: numeric options' ranges


def _framework() -> _Framework:
    importlib.import_module("csl")  # csl/__init__ imports the aspect packages, which register every choice
    config = importlib.import_module("csl.config")
    registry = importlib.import_module("csl.registry")
    # csl.presets may not exist yet while the framework is being written: then ``method`` cannot be checked
    # (a space using it is rejected) and csl.config.resolve, which imports it, is not run. Once it exists both are.
    try:
        presets_module = importlib.import_module("csl.presets")
    except ModuleNotFoundError as exc:
        if exc.name != "csl.presets":
            raise
        presets = None
    else:
        presets = {name: dict(values) for name, values in presets_module.PRESETS.items()}
    aspects = registry.ASPECTS
    types: dict[str, frozenset[type] | None] = {
        key: _types_from_default(default, strict=True) for key, default in config.TRAINER_DEFAULTS.items()
    }
    builder_types: dict[str, list[frozenset[type] | None]] = {}
    for reg in aspects.values():
        for name in reg.names():
            params = inspect.signature(reg.get(name)).parameters
            for option in reg.options(name):
                param = params[option]
                found = _types_from_annotation(param.annotation)
                if found is None:
                    found = _types_from_default(param.default, strict=False)
                builder_types.setdefault(option, []).append(found)
    for option, found_list in builder_types.items():
        if option in types:
            continue
        if any(f is None for f in found_list):
            types[option] = None
        else:
            types[option] = frozenset().union(*found_list)  # type: ignore[arg-type]
    return _Framework(
        names={aspect: list(reg.names()) for aspect, reg in aspects.items()},
        known=set(config.known_options()),
        defaults=dict(config.TRAINER_DEFAULTS),
        presets=presets,
        types=types,
        resolve=config.resolve if presets is not None else None,
        metrics={name: m.mode for name, m in importlib.import_module("csl.metrics").METRICS.items()},
        bounds=dict(getattr(config, "OPTION_BOUNDS", {})),
    )


def _types_from_default(default: Any, *, strict: bool) -> frozenset[type] | None:
    if isinstance(default, bool):
        return frozenset({bool})
    if isinstance(default, int):
        return frozenset({int}) if strict else frozenset({int, float})
    if isinstance(default, float):
        return frozenset({int, float})
    if isinstance(default, str):
        return frozenset({str})
    return None  # None, empty or a structure: unchecked


_ANNOTATION_TYPES: dict[str, frozenset[type]] = {
    "int": frozenset({int}),
    "float": frozenset({int, float}),
    "bool": frozenset({bool}),
    "str": frozenset({str}),
    "None": frozenset({type(None)}),
}


def _types_from_annotation(annotation: Any) -> frozenset[type] | None:
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = re.fullmatch(r"(?:typing\.)?Optional\[(.*)\]", text.strip())
    parts = [optional.group(1), "None"] if optional else text.split("|")
    parts = [p.strip() for p in parts]
    if not all(p in _ANNOTATION_TYPES for p in parts):
        return None
    return frozenset().union(*(_ANNOTATION_TYPES[p] for p in parts))
