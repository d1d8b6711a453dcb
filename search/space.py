"""Search spaces over the five CSL aspects, declared as data in ``spaces/*.yaml``.

A space file says what a search varies, what it keeps fixed, what it optimises and on what budget. It is
validated completely by :func:`load_space` before anything runs: every mistake is one :class:`SpaceError` whose
message names the file, the key, the bad value and the allowed values.

Schema (top-level keys; anything else is an error)
--------------------------------------------------
``name``         str, defaults to the file's stem.
``description``  str, optional.
``metric``       str, required: the metric the search optimises (as the trainer reports it, e.g. ``knn_acc``).
``mode``         required: ``max`` or ``min``.
``budget``       required mapping:
                 ``epochs`` (positive int, required: every trial trains this long; never put ``epochs``
                 in ``fixed``/``params``), ``grace_period`` (positive int <= epochs, default 1) and
                 ``reduction_factor`` (number > 1, default 2) for ASHA, optional ``num_samples`` (positive
                 int: trials to draw), ``max_concurrent_trials`` (positive int), ``time_budget_s`` (number > 0).
``fixed``        mapping key -> single value, passed through to every trial (dataset, limits, widths ...).
``params``       mapping key -> either a bare value (fixed, same as putting it in ``fixed``) or ONE distribution:
                   ``{choice: [a, b, ...]}``      categorical (values: null, bool, int, float or str)
                   ``{uniform: [low, high]}``     float, low < high
                   ``{loguniform: [low, high]}``  float, 0 < low < high
                   ``{int: [low, high]}``         int, both bounds ints, low < high, inclusive
                 The aspect keys (``augment encoder extract similarity loss``) and ``method`` take only
                 ``choice`` or a bare name; names must be registered (``csl.registry``) / presets
                 (``csl.presets.PRESETS``).
``constraints``  list; each item is one of
                   ``{when: {k: v|[v..]}, require: {k: v|[v..]}, reason: str}``  when every ``when`` key matches,
                                                                     every ``require`` key must be in its list
                   ``{forbid: {k: v|[v..], ...}, reason: str}``   a config matching every key is not allowed
                                                                     (``when`` may be added: it joins the match)
                 ``when`` is optional for ``require`` (omitted: always). ``reason`` is optional but is what
                 :meth:`Space.violation` returns, so write one. Constraints may name any known option
                 except continuous dimensions (they see only categorical values).
``base``/``variants``  a *neighbourhood* instead of (or besides) a product: ``base`` is a partial config (e.g.
                 ``{method: yadim}``), ``variants`` a non-empty list of partial configs, each put on top of the
                 base (optional ``name:`` key, else ``key=value,...``). The space then has a categorical
                 dimension ``variant`` whose values are ``base`` (the base itself, always first) and every
                 variant's name: one aspect at a time is ``variants: [{augment: amdim}, {encoder: resnet50}]``.
                 A variant may override base keys, never ``fixed`` keys or ``params`` dimensions.

Constraint matching sees the config as it will train: trainer defaults, then the ``method`` preset, then the
config's own (non-null) values, so ``{when: {loss: byol}}`` fires for ``method: byol`` too.

Validation at load (each a :class:`SpaceError`): YAML syntax (with line and column) and duplicate keys; unknown
top-level / budget / constraint keys; unknown option keys (not in ``csl.config.known_options()``); unregistered
aspect names and unknown presets anywhere (fixed, choices, base, variants, constraints); distribution shapes and
types; values whose type does not fit the option (``batch_size: "64"``); constraints on unknown or continuous
keys; contradictory constraints (no combination of the categorical grid is allowed); choice values or variants
that the constraints exclude in every combination; configs naming neither a method nor every aspect; finally
``csl.config.resolve`` on allowed configs. A constraint that can never fire is fine.

Public API: :func:`load_space` -> :class:`Space` with ``violation``, ``sample``, ``grid``, ``suggest``,
``trial_config`` (and ``aspects``, ``label``, ``variant_of``). ``sample``/``grid``/``suggest`` return flat configs
(``fixed`` plus the dimensions' values, a variant expanded into its keys); ``trial_config`` adds ``epochs``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import itertools
import math
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pragma: no cover
    import optuna

ASPECT_KEYS: tuple[str, ...] = ("augment", "encoder", "extract", "similarity", "loss")
DESIGN_KEYS: tuple[str, ...] = ("method", *ASPECT_KEYS)
DISTRIBUTIONS: tuple[str, ...] = ("choice", "uniform", "loguniform", "int")
TOP_LEVEL_KEYS: tuple[str, ...] = (
    "name", "description", "metric", "mode", "budget", "fixed", "params", "constraints", "base", "variants",
)
BUDGET_KEYS: tuple[str, ...] = (
    "epochs", "grace_period", "reduction_factor", "num_samples", "max_concurrent_trials", "time_budget_s",
)
BUDGET_DEFAULTS: dict[str, Any] = {"grace_period": 1, "reduction_factor": 2}
CONSTRAINT_KEYS: tuple[str, ...] = ("when", "require", "forbid", "reason")
MODES: tuple[str, ...] = ("max", "min")
VARIANT = "variant"
"""Name of the categorical dimension of a ``base``/``variants`` space."""
BASE = "base"
"""The variant that is the base itself."""
MAX_GRID = 200_000
"""Largest categorical grid that load_space enumerates to check the constraints."""
SAMPLE_TRIES = 10_000

_SCALARS = (type(None), bool, int, float, str)


class SpaceError(ValueError):
    """A space file that cannot be searched. The message names the file, the key, the bad value, what is allowed.

    The parts are also attributes (``file``, ``key``, ``value``, ``allowed``) where they apply.
    """

    def __init__(
        self, message: str, *, file: str | None = None, key: str | None = None, value: Any = None, allowed: Any = None
    ) -> None:
        super().__init__(message)
        self.file, self.key, self.value, self.allowed = file, key, value, allowed


# --------------------------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Dimension:
    """One searched key. ``values`` for ``choice``; ``low``/``high`` (inclusive) for the others."""

    name: str
    kind: str  # "choice" | "uniform" | "loguniform" | "int"
    values: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def categorical(self) -> bool:
        return self.kind == "choice"

    def midpoint(self) -> Any:
        """The value ``grid()`` uses: uniform mean, loguniform geometric mean, int floor mean, first choice."""
        if self.kind == "choice":
            assert self.values is not None
            return self.values[0]
        assert self.low is not None and self.high is not None
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "loguniform":
            return math.sqrt(self.low * self.high)
        return (int(self.low) + int(self.high)) // 2

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            assert self.values is not None
            return rng.choice(self.values)
        assert self.low is not None and self.high is not None
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.randint(int(self.low), int(self.high))

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            assert self.values is not None
            return trial.suggest_categorical(self.name, list(self.values))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.kind == "loguniform")


@dataclass(frozen=True)
class Constraint:
    """``when`` (all match) ⇒ every ``require`` key in its values; or: ``when`` ∧ all ``forbid`` keys match ⇒ bad.

    Each mapping is key -> tuple of values; a key absent from the config matches ``None``.
    """

    reason: str
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    require: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    forbid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return set(self.when) | set(self.require) | set(self.forbid)

    def violated_by(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` (as it will train: see ``Space.effective``) breaks this constraint."""
        if not all(_matches(config.get(k), vs) for k, vs in self.when.items()):
            return False
        if self.forbid:
            return all(_matches(config.get(k), vs) for k, vs in self.forbid.items())
        return any(not _matches(config.get(k), vs) for k, vs in self.require.items())


def _matches(value: Any, values: tuple[Any, ...]) -> bool:
    return any(_same(value, v) for v in values)


@dataclass
class Space:
    """A validated search space (see the module docstring for the file schema).

    ``fixed`` holds everything constant before a variant is applied: ``fixed``, the bare values of ``params`` and
    ``base``. ``dimensions`` holds the searched keys in file order, preceded by ``variant`` for a neighbourhood
    space. ``variants`` maps each variant name (``base`` first) to the keys it sets on top of ``fixed``.
    """

    path: Path
    name: str
    content_hash: str  # sha256 of the file bytes
    text: str  # the file content
    metric: str
    mode: str  # "max" | "min"
    budget: dict[str, Any]
    fixed: dict[str, Any]
    dimensions: dict[str, Dimension]
    constraints: list[Constraint]
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    defaults: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ queries

    def aspects(self) -> list[str]:
        """Searched design keys, in the order method, augment, encoder, extract, similarity, loss.

        A key is searched when it is a ``choice`` dimension or some variant sets it.
        """
        searched = {k for k, d in self.dimensions.items() if d.categorical}
        for overrides in self.variants.values():
            searched |= set(overrides)
        return [k for k in DESIGN_KEYS if k in searched]

    def categorical(self) -> list[Dimension]:
        return [d for d in self.dimensions.values() if d.categorical]

    def effective(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config as it will train: trainer defaults, then its method's preset, then its non-null values."""
        config = self._expand(config)
        out = dict(self.defaults)
        method = config.get("method")
        if method is not None and method in self.presets:
            out.update(self.presets[method])
        out.update({k: v for k, v in config.items() if v is not None})
        return out

    def violation(self, config: Mapping[str, Any]) -> str | None:
        """The reason of the first constraint ``config`` violates, else None.

        ``config`` may be a full config or just dimension values (``fixed`` fills the rest; ``variant`` expands).
        """
        effective = self.effective(config)
        for constraint in self.constraints:
            if constraint.violated_by(effective):
                return constraint.reason
        return None

    # ------------------------------------------------------------------ drawing configs

    def sample(self, rng: random.Random | None = None, tries: int = SAMPLE_TRIES) -> dict[str, Any]:
        """One allowed config (``fixed`` + a draw of every dimension), by rejection sampling.

        Raises SpaceError when ``tries`` draws were all rejected.
        """
        rng = rng if rng is not None else random.Random()
        reason = None
        for _ in range(tries):
            config = self._expand({name: dim.draw(rng) for name, dim in self.dimensions.items()})
            reason = self.violation(config)
            if reason is None:
                return config
        raise SpaceError(
            f"{self.path}: constraints: no allowed config in {tries} draws; the last violated {reason!r}; "
            "allowed: constraints that some combination satisfies",
            file=str(self.path), key="constraints", value=reason,
        )

    def grid(self) -> list[dict[str, Any]]:
        """Every allowed combination of the categorical dimensions, exactly once, in a stable order.

        Order: ``itertools.product`` over the categorical dimensions in file order (``variant`` first), values in
        listed order. Non-categorical dimensions take their midpoint: ``uniform`` the mean, ``loguniform`` the
        geometric mean, ``int`` the floor of the mean.
        """
        return [config for _, config, reason in self._combinations() if reason is None]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run: suggest every dimension on an optuna trial; returns ``fixed`` + the suggestions.

        ``choice`` -> ``suggest_categorical``, ``uniform``/``loguniform`` -> ``suggest_float(log=...)``, ``int`` ->
        ``suggest_int``; a neighbourhood's ``variant`` is a categorical over variant names, returned expanded.
        The caller checks :meth:`violation` (e.g. prunes or tells the study the trial failed).
        """
        return self._expand({name: dim.suggest(trial) for name, dim in self.dimensions.items()})

    def trial_config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The flat config a trial trains with: ``fixed`` ∪ ``params`` ∪ ``{"epochs": budget["epochs"]}``.

        ``params`` may hold ``variant`` (a variant name), which is replaced by that variant's keys.
        """
        config = self._expand(params)
        config["epochs"] = self.budget["epochs"]
        return config

    # ------------------------------------------------------------------ naming

    def variant_of(self, config: Mapping[str, Any]) -> str | None:
        """The variant a config belongs to (None for a space without variants or a config of none of them)."""
        if not self.variants:
            return None
        if VARIANT in config:
            return str(config[VARIANT])
        touched = set(self.base).union(*self.variants.values())
        for name, overrides in self.variants.items():
            expected = {k: self.fixed.get(k) for k in touched} | overrides
            if all(config.get(k) == v for k, v in expected.items()):
                return name
        return None

    def label(self, config: Mapping[str, Any]) -> str:
        """A short name for a config, e.g. ``augment=amdim loss=triplet`` or ``encoder=resnet50`` (its variant)."""
        parts = []
        variant = self.variant_of(config)
        if variant is not None:
            parts.append(variant)
        parts += [f"{d.name}={config.get(d.name)}" for d in self.categorical() if d.name != VARIANT]
        return " ".join(parts) or self.name

    # ------------------------------------------------------------------ internals

    def _expand(self, params: Mapping[str, Any]) -> dict[str, Any]:
        config = dict(self.fixed)
        if VARIANT in params:
            name = params[VARIANT]
            if name not in self.variants:
                raise SpaceError(
                    f"{self.path}: {VARIANT}: unknown variant {name!r}; allowed: {_listing(self.variants)}",
                    file=str(self.path), key=VARIANT, value=name, allowed=list(self.variants),
                )
            config.update(self.variants[name])
        config.update({k: v for k, v in params.items() if k != VARIANT})
        return config

    def _grid_size(self) -> int:
        return math.prod(len(d.values or ()) for d in self.categorical())

    def _combinations(self) -> Iterator[tuple[dict[str, Any], dict[str, Any], str | None]]:
        """Every combination of the categorical grid: (its categorical values, its config, its violation or None).

        Non-categorical dimensions sit at their midpoint.
        """
        dims = list(self.dimensions.values())
        cats = [d for d in dims if d.categorical]
        for combo in itertools.product(*(d.values or () for d in cats)):
            chosen = dict(zip((d.name for d in cats), combo, strict=True))
            params = {d.name: chosen[d.name] if d.categorical else d.midpoint() for d in dims}
            config = self._expand(params)
            yield chosen, config, self.violation(config)


# --------------------------------------------------------------------------------------------------- YAML


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


# --------------------------------------------------------------------------------------------------- framework


@dataclass
class _Framework:
    """What the space is checked against, read from csl at load time."""

    names: dict[str, list[str]]  # aspect -> registered names
    known: set[str]  # csl.config.known_options()
    defaults: dict[str, Any]  # csl.config.TRAINER_DEFAULTS
    presets: dict[str, dict[str, Any]] | None  # None while csl.presets does not exist
    types: dict[str, frozenset[type] | None]  # option -> accepted value types (None: unknown, unchecked)
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]] | None


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


def _type_ok(value: Any, types: frozenset[type] | None) -> bool:
    if types is None or value is None:
        return True
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types
    if isinstance(value, float):
        return float in types
    if isinstance(value, str):
        return str in types
    return False


def _describe_types(types: frozenset[type]) -> str:
    words = []
    if bool in types:
        words.append("a bool")
    if float in types:
        words.append("a number")
    elif int in types:
        words.append("an int")
    if str in types:
        words.append("a string")
    if type(None) in types:
        words.append("null")
    return " or ".join(words) or "a value of another type"


def _listing(values: Any) -> str:
    return ", ".join(str(v) for v in values) or "(none)"


# --------------------------------------------------------------------------------------------------- checking


class _Checker:
    def __init__(self, path: Path, data: Any, fw: _Framework) -> None:
        self.path, self.data, self.fw = path, data, fw

    # -- errors

    def error(self, key: str, problem: str, value: Any, allowed: Any, hint: str = "") -> SpaceError:
        """``FILE: KEY: PROBLEM VALUE[ HINT]; allowed: ALLOWED``."""
        allowed_text = allowed if isinstance(allowed, str) else _listing(allowed)
        return SpaceError(
            f"{self.path}: {key}: {problem} {value!r}{hint}; allowed: {allowed_text}",
            file=str(self.path), key=key, value=value, allowed=allowed,
        )

    def unknown_key(self, where: str, key: Any, allowed: Any) -> SpaceError:
        allowed = sorted(allowed)
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return self.error(f"{where}.{key}" if where else str(key), "unknown key", key, allowed, hint)

    # -- generic checks

    def mapping(self, key: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, "expected a mapping, got", value, "a mapping of key: value")
        for k in value:
            if not isinstance(k, str):
                raise self.error(key, "keys must be strings, got", k, "strings")
        return dict(value)

    def option_key(self, where: str, key: str, value: Any = None) -> None:
        if key == "epochs":
            raise self.error(f"{where}.epochs", "a trial's length is budget.epochs, never set here; got", value,
                             "budget: {epochs: N}")
        if key not in self.fw.known:
            raise self.unknown_key(where, key, self.fw.known - {"epochs"})

    def option_value(self, key: str, option: str, value: Any) -> None:
        """Check one concrete value of an option: registered name, known preset, fitting type."""
        if option in ASPECT_KEYS:
            names = self.fw.names.get(option, [])
            if not isinstance(value, str) or value not in names:
                raise self.error(key, f"unknown {option}", value, names or "(nothing is registered for this aspect)")
        elif option == "method":
            if value is None:
                return
            if self.fw.presets is None:
                raise self.error(key, "cannot check method (csl.presets does not exist yet)", value, "a preset name")
            if not isinstance(value, str) or value not in self.fw.presets:
                raise self.error(key, "unknown method", value, sorted(self.fw.presets))
        elif not isinstance(value, _SCALARS) and not isinstance(value, list):
            raise self.error(key, "expected a single value, got", value, "null, bool, number, string or list")
        else:
            types = self.fw.types.get(option)
            if not _type_ok(value, types):
                assert types is not None
                raise self.error(key, f"{option} takes {_describe_types(types)}, not", value, _describe_types(types))

    def bare_value(self, key: str, option: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            raise self.error(key, "expected a single value, got", value, "a single value (distributions go in params)")
        if isinstance(value, list) and option in DESIGN_KEYS:
            raise self.error(key, f"a list is not a choice; write {{choice: [...]}} for {option}:", value,
                             "a single name or {choice: [...]}")
        self.option_value(key, option, value)
        return value

    # -- sections

    def top_level(self) -> dict[str, Any]:
        if not isinstance(self.data, Mapping):
            raise self.error("(top level)", "expected a mapping of the space's sections, got", self.data,
                             TOP_LEVEL_KEYS)
        for key in self.data:
            if key not in TOP_LEVEL_KEYS:
                raise self.unknown_key("", key, TOP_LEVEL_KEYS)
        for key in ("metric", "mode", "budget"):
            if key not in self.data:
                raise self.error(key, "missing required key", key, "a value for it")
        return dict(self.data)

    def text_field(self, key: str, value: Any, *, required: bool) -> str:
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.error(key, "expected a non-empty string, got" if required else "expected a string, got",
                             value, "a string")
        return value

    def budget(self, value: Any) -> dict[str, Any]:
        budget = self.mapping("budget", value)
        for key in budget:
            if key not in BUDGET_KEYS:
                raise self.unknown_key("budget", key, BUDGET_KEYS)
        if "epochs" not in budget:
            raise self.error("budget.epochs", "missing required key", "epochs", "a positive int")
        for key, default in BUDGET_DEFAULTS.items():
            budget.setdefault(key, default)
        for key in ("epochs", "grace_period", "num_samples", "max_concurrent_trials"):
            if key in budget and not (_is_int(budget[key]) and budget[key] > 0):
                raise self.error(f"budget.{key}", "expected a positive int, got", budget[key], "a positive int")
        if budget["grace_period"] > budget["epochs"]:
            raise self.error("budget.grace_period", "grace_period exceeds epochs:", budget["grace_period"],
                             f"an int from 1 to epochs ({budget['epochs']})")
        if not (_is_number(budget["reduction_factor"]) and budget["reduction_factor"] > 1):
            raise self.error("budget.reduction_factor", "expected a number > 1, got", budget["reduction_factor"],
                             "a number > 1")
        if "time_budget_s" in budget and not (_is_number(budget["time_budget_s"]) and budget["time_budget_s"] > 0):
            raise self.error("budget.time_budget_s", "expected a positive number, got", budget["time_budget_s"],
                             "a positive number")
        return budget

    def distribution(self, key: str, option: str, spec: Mapping[str, Any]) -> Dimension:
        if len(spec) != 1:
            raise self.error(key, "a distribution has exactly one keyword, got", dict(spec),
                             f"one of {_listing(DISTRIBUTIONS)}")
        ((kind, args),) = spec.items()
        if kind not in DISTRIBUTIONS:
            raise self.error(f"{key}.{kind}", "unknown distribution", kind, DISTRIBUTIONS)
        where = f"{key}.{kind}"
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise self.error(where, "expected a non-empty list of values, got", args, "[value, value, ...]")
            for i, v in enumerate(args):
                if not isinstance(v, _SCALARS):
                    raise self.error(f"{where}[{i}]", "choice values are single values, got", v,
                                     "null, bool, number or string")
                if any(_same(v, w) for w in args[:i]):
                    raise self.error(f"{where}[{i}]", "duplicate choice", v, "each value once")
                self.option_value(f"{where}[{i}]", option, v)
            return Dimension(option, "choice", values=tuple(args))
        if option in DESIGN_KEYS:
            raise self.error(where, f"{option} is categorical; it cannot take", kind, "choice (or a bare name)")
        if not isinstance(args, list) or len(args) != 2:
            raise self.error(where, "expected [low, high], got", args, "[low, high]")
        low, high = args
        check = _is_int if kind == "int" else _is_number
        wanted = "ints" if kind == "int" else "numbers"
        for bound in (low, high):
            if not check(bound):
                raise self.error(where, f"bounds must be {wanted}, got", bound, f"[low, high] with {wanted}")
        if low >= high:
            raise self.error(where, "low must be below high, got", [low, high], "[low, high] with low < high")
        if kind == "loguniform" and low <= 0:
            raise self.error(where, "loguniform needs low > 0, got", low, "0 < low < high")
        types = self.fw.types.get(option)
        produced = int if kind == "int" else float
        if types is not None and produced not in types:
            raise self.error(where, f"{option} takes {_describe_types(types)}; it cannot take a {kind} draw:", args,
                             "choice" + (", int" if int in types else ""))
        return Dimension(option, kind, low=low, high=high)

    def condition(self, where: str, value: Any, dims: Mapping[str, Dimension]) -> dict[str, tuple[Any, ...]]:
        cond = self.mapping(where, value)
        if not cond:
            raise self.error(where, "expected a non-empty mapping, got", value, "{key: value or [values]}")
        out = {}
        for key, values in cond.items():
            self.option_key(where, key, values)
            if key in dims and not dims[key].categorical:
                raise self.error(f"{where}.{key}", f"constraints see only categorical keys; {key} is a "
                                 f"{dims[key].kind} dimension:", key, "aspects, method or other categorical keys")
            values = values if isinstance(values, list) else [values]
            if not values:
                raise self.error(f"{where}.{key}", "expected a value or a non-empty list, got", values,
                                 "a value or [values]")
            for i, v in enumerate(values):
                if not isinstance(v, _SCALARS):
                    raise self.error(f"{where}.{key}", "expected single values, got", v, "null, bool, number, string")
                self.option_value(f"{where}.{key}" + (f"[{i}]" if len(values) > 1 else ""), key, v)
            out[key] = tuple(values)
        return out

    def constraints(self, value: Any, dims: Mapping[str, Dimension]) -> list[Constraint]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error("constraints", "expected a list, got", value, "a list of {when/require/forbid/reason}")
        out = []
        for i, item in enumerate(value):
            where = f"constraints[{i}]"
            item = self.mapping(where, item)
            for key in item:
                if key not in CONSTRAINT_KEYS:
                    raise self.unknown_key(where, key, CONSTRAINT_KEYS)
            if ("require" in item) == ("forbid" in item):
                raise self.error(where, "needs exactly one of require/forbid, got keys", sorted(item),
                                 "when + require, or forbid (+ when)")
            when = self.condition(f"{where}.when", item["when"], dims) if "when" in item else {}
            require = self.condition(f"{where}.require", item["require"], dims) if "require" in item else {}
            forbid = self.condition(f"{where}.forbid", item["forbid"], dims) if "forbid" in item else {}
            reason = item.get("reason")
            if reason is None:
                reason = _default_reason(when, require, forbid)
            else:
                reason = self.text_field(f"{where}.reason", reason, required=True)
            out.append(Constraint(reason=reason, when=when, require=require, forbid=forbid))
        return out

    # -- the whole file

    def space(self, raw: bytes, text: str) -> Space:
        data = self.top_level()
        name = self.text_field("name", data.get("name", self.path.stem), required=True)
        description = self.text_field("description", data.get("description") or "", required=False)
        metric = self.text_field("metric", data["metric"], required=True)
        mode = data["mode"]
        if mode not in MODES:
            raise self.error("mode", "unknown mode", mode, MODES)
        budget = self.budget(data["budget"])

        fixed: dict[str, Any] = {}
        for key, value in self.mapping("fixed", data.get("fixed")).items():
            self.option_key("fixed", key, value)
            fixed[key] = self.bare_value(f"fixed.{key}", key, value)

        dims: dict[str, Dimension] = {}
        for key, value in self.mapping("params", data.get("params")).items():
            self.option_key("params", key, value)
            if key in fixed:
                raise self.error(f"params.{key}", "key is also in fixed:", key, "each key in fixed or params, once")
            if isinstance(value, Mapping):
                dims[key] = self.distribution(f"params.{key}", key, value)
            else:
                fixed[key] = self.bare_value(f"params.{key}", key, value)

        base, variants = self.neighbourhood(data, fixed, dims)
        if variants:
            dims = {VARIANT: Dimension(VARIANT, "choice", values=tuple(variants)), **dims}

        constraints = self.constraints(data.get("constraints"), dims)
        space = Space(
            path=self.path, name=name, content_hash=hashlib.sha256(raw).hexdigest(), text=text, metric=metric,
            mode=mode, budget=budget, fixed={**fixed, **base}, dimensions=dims, constraints=constraints,
            description=description, base=base, variants=variants,
            presets=self.fw.presets or {}, defaults=self.fw.defaults,
        )
        self.variants_distinct(space)
        allowed = self.grid_allowed(space)
        self.names_every_aspect(space, allowed)
        self.resolves(space, allowed)
        return space

    def neighbourhood(
        self, data: Mapping[str, Any], fixed: Mapping[str, Any], dims: Mapping[str, Dimension]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        if "base" in data and "variants" not in data:
            raise self.error("base", "base is only used with variants; got", data["base"],
                             "base together with variants (or put the keys in fixed)")
        if "variants" not in data:
            return {}, {}
        base: dict[str, Any] = {}
        for key, value in self.mapping("base", data.get("base")).items():
            self.option_key("base", key, value)
            if key in fixed or key in dims:
                raise self.error(f"base.{key}", "key is also in fixed/params:", key, "each key in one section")
            base[key] = self.bare_value(f"base.{key}", key, value)
        items = data["variants"]
        if not isinstance(items, list) or not items:
            raise self.error("variants", "expected a non-empty list of partial configs, got", items,
                             "[{key: value, ...}, ...]")
        variants: dict[str, dict[str, Any]] = {BASE: {}}
        for i, item in enumerate(items):
            where = f"variants[{i}]"
            item = self.mapping(where, item)
            name = item.pop("name", None)
            if not item:
                raise self.error(where, "a variant sets at least one key; got", item, "{key: value, ...}")
            overrides: dict[str, Any] = {}
            for key, value in item.items():
                self.option_key(where, key, value)
                if key in fixed or key in dims:
                    raise self.error(f"{where}.{key}", "a variant may not override fixed or params keys, got", key,
                                     f"base keys or keys set nowhere else (not {_listing(sorted(set(fixed) | set(dims)))})")
                overrides[key] = self.bare_value(f"{where}.{key}", key, value)
            if name is None:
                name = ",".join(f"{k}={v}" for k, v in overrides.items())
            name = self.text_field(f"{where}.name", name, required=True)
            if name in variants:
                raise self.error(f"{where}.name", "duplicate variant name", name,
                                 f"a name other than {_listing(variants)}")
            variants[name] = overrides
        return base, variants

    def variants_distinct(self, space: Space) -> None:
        seen: dict[str, str] = {}
        for i, name in enumerate(space.variants):
            effective = space.effective({VARIANT: name})
            key = repr(sorted(effective.items(), key=lambda kv: kv[0]))
            if key in seen:
                raise self.error(f"variants[{i - 1}]", f"variant trains the same config as {seen[key]!r}:", name,
                                 "variants that change something")
            seen[key] = name

    def grid_allowed(self, space: Space) -> list[dict[str, Any]]:
        """Enumerate the categorical grid: reject contradictory constraints and values no combination allows."""
        size = space._grid_size()
        if size > MAX_GRID:
            names = " × ".join(f"{d.name}({len(d.values or ())})" for d in space.categorical())
            raise self.error("params", f"categorical grid too large to validate ({names}):", size,
                             f"at most {MAX_GRID} combinations")
        allowed: list[dict[str, Any]] = []
        reasons: dict[str, int] = {}
        used: dict[str, set[int]] = {d.name: set() for d in space.categorical()}
        for chosen, config, reason in space._combinations():
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            allowed.append(config)
            for dim in space.categorical():
                used[dim.name].update(i for i, v in enumerate(dim.values or ()) if _same(v, chosen[dim.name]))
        if not allowed:
            axes = " × ".join(d.name for d in space.categorical()) or "the fixed config"
            raise self.error(
                "constraints",
                f"contradictory: no combination of {axes} ({size}) satisfies every constraint; violated:",
                sorted(reasons), "constraints that leave at least one combination",
            )
        for dim in space.categorical():
            for i, value in enumerate(dim.values or ()):
                if i not in used[dim.name]:
                    where = (f"variants[{i - 1}]" if i else "base") if dim.name == VARIANT \
                        else f"params.{dim.name}.choice[{i}]"
                    reachable = [v for j, v in enumerate(dim.values or ()) if j in used[dim.name]]
                    raise self.error(where, "the constraints exclude this value in every combination:", value,
                                     f"values some combination allows: {_listing(reachable)} "
                                     f"(constraints: {_listing(sorted(reasons))})")
        return allowed

    def names_every_aspect(self, space: Space, allowed: list[dict[str, Any]]) -> None:
        for config in allowed:
            if config.get("method") is not None:
                continue
            for aspect in ASPECT_KEYS:
                if config.get(aspect) is None:
                    raise self.error(aspect, "a config names neither a method nor this aspect:", aspect,
                                     f"set method or {aspect} ({_listing(self.fw.names.get(aspect, []))})")

    def resolves(self, space: Space, allowed: list[dict[str, Any]]) -> None:
        """Run csl.config.resolve on allowed configs (all of a small grid, else the first and a seeded sample)."""
        if self.fw.resolve is None:  # csl.presets does not exist yet: see _framework
            return
        configs = allowed if len(allowed) <= 64 else [allowed[0], space.sample(random.Random(0))]
        if any(not d.categorical for d in space.dimensions.values()):
            configs = [*configs, space.sample(random.Random(0))]
        for config in configs:
            trial = space.trial_config(config)
            try:
                self.fw.resolve(trial)
            except Exception as exc:  # noqa: BLE001 - any rejection is a space error
                raise self.error("params", f"csl.config.resolve rejects a config of this space ({exc}):",
                                 space.label(config), "configs that csl.config.resolve accepts") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _same(a: Any, b: Any) -> bool:
    """Equal, with True and 1 told apart."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _default_reason(when: Mapping[str, tuple], require: Mapping[str, tuple], forbid: Mapping[str, tuple]) -> str:
    def show(cond: Mapping[str, tuple]) -> str:
        return " and ".join(f"{k} in {list(v)}" if len(v) > 1 else f"{k}={v[0]}" for k, v in cond.items())

    if forbid:
        return "forbidden: " + show({**when, **forbid})
    return (f"when {show(when)}: " if when else "") + "require " + show(require)


# --------------------------------------------------------------------------------------------------- entry point


def load_space(path: str | Path) -> Space:
    """Read and validate a space file (see the module docstring); every problem is one SpaceError."""
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
