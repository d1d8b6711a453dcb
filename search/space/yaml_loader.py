"""Reading a space file's YAML: safe, strict about duplicate keys, and every syntax error a :class:`SpaceError`.

Plain PyYAML keeps the last of two equal keys and reads ``1e-4`` as a string; a search space must mean what its
author wrote, so here a duplicate key is an error, ``1e-4`` is a float, and a syntax error names line and column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from search.space.schema import SpaceError


class _Loader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys and reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        raise SpaceError(f"{path}: {where}invalid YAML: {problem or exc}", file=str(path)) from exc
