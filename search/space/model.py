"""The searchable space: its dimensions, its constraints, and how configs are drawn from it.

Everything here assumes a space that ``search.space.checks`` has already validated and built. A :class:`Space` is
plain data (the search callback pickles it into the experiment folder), and its methods only read it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.space.schema import DESIGN_KEYS, SAMPLE_TRIES, VARIANT, SpaceError
from search.space.values import _listing, _same

if TYPE_CHECKING:  # pragma: no cover
    import optuna


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
    """A validated search space (see the ``search.space`` package docstring for the file schema).

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
