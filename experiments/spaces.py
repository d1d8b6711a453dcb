"""The generated space files of the studies: a grid over method × condition × seed written as a ``csl-search``
space, with the combinations the model cannot build probed before launch and kept out by ``forbid`` constraints.

Probing before launch matters: a refused combination would otherwise fail as a trial and be counted as a failure
of the method, when it is a combination that does not exist (the report lists it as not applicable instead).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from experiments.common import ASPECTS, Scale


def write_space(path: Path, space: Mapping[str, Any], header: str = "") -> Path:
    """Write a generated space file (a comment header, then the YAML) and check it loads."""
    from search.space import load_space

    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.strip().splitlines())
    body = yaml.safe_dump(_plain(space), sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    path.write_text(comment + body, encoding="utf-8")
    load_space(path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def image_size_of(data: str) -> int:
    return 96 if str(data).startswith("stl10") else 32


def probe(config: Mapping[str, Any]) -> str | None:
    """Build the model of ``config`` at 1/16 width; the reason it is refused (``CombinationError``), else None.

    Which combinations can train is a matter of structure (feature maps, patch grids, score bounds), not of
    width, so the tiny build answers for every scale in well under a second.
    """
    from csl.config import resolve
    from csl.model import CombinationError, build_model

    resolved = resolve({**config, "width": 1 / 16})
    try:
        build_model(resolved, image_size=image_size_of(resolved["data"]), mean=(0.5, 0.5, 0.5),
                    std=(0.25, 0.25, 0.25))
    except CombinationError as exc:
        return str(exc)
    return None


def refusals(space_path: Path, cell_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Every cell (the values of ``cell_keys``: the grid without its seeds) of a grid space that
    ``csl.model.build_model`` refuses, with the effective aspects (for a constraint) and the reason."""
    from search.space import load_space

    space = load_space(space_path)
    seen: set[str] = set()
    refused = []
    for params in space.grid():
        cell = {k: space.variant_of(params) if k == "variant" else params.get(k) for k in cell_keys}
        key = json.dumps(cell, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        config = space.trial_config(params)
        reason = probe(config)
        if reason is not None:
            effective = space.effective(params)
            match = {k: effective.get(k) for k in ("method", *ASPECTS)}
            refused.append({"cell": cell, "match": match, "reason": reason})
    return refused


def refusal_constraints(refused: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``forbid`` constraints that keep the refused cells out of the grid (matched on method + the five aspects)."""
    return [{"forbid": dict(r["match"]), "reason": f"refused by csl.model.build_model: {r['reason']}"} for r in refused]


def grid_space(name: str, description: str, scale: Scale, params: Mapping[str, Any], *,
               constraints: Sequence[Mapping[str, Any]] = (), fixed: Mapping[str, Any] | None = None,
               base: Mapping[str, Any] | None = None, variants: Sequence[Mapping[str, Any]] | None = None,
               epochs: int | None = None) -> dict[str, Any]:
    """A space for a grid run at ``scale``: no early stopping (FIFO); the grace period is only for the check."""
    epochs = epochs or scale.epochs
    space: dict[str, Any] = {
        "name": name, "description": description, "metric": "knn_acc", "mode": "max",
        "budget": {"epochs": epochs, "grace_period": min(scale.grace_period, epochs)},
        "fixed": dict(fixed if fixed is not None else scale.trial_fixed()),
    }
    if base:
        space["base"] = dict(base)
    if variants:
        space["variants"] = [dict(v) for v in variants]
    space["params"] = dict(params)
    if constraints:
        space["constraints"] = [dict(c) for c in constraints]
    return space


def write_grid_space(path: Path, header: str, cell_keys: Sequence[str],
                     make_space: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Write ``make_space(())`` to ``path``, probe each cell (the values of ``cell_keys``), and where any is refused
    write ``make_space(constraints)`` over it, so the grid never launches a trial that cannot build.

    Returns the refused cells (with the reason) for the design's ``not_applicable``.
    """
    write_space(path, make_space(()), header)
    refused = refusals(path, cell_keys)
    if refused:
        write_space(path, make_space(refusal_constraints(refused)), header)
    return refused
