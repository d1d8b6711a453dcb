"""Validating a parsed space file against csl and building its :class:`Space`, or one :class:`SpaceError`.

A search may run for hours, so every mistake a file can hold is caught here, before any trial starts, and the
error names the file, the key, the bad value and what is allowed (see the ``search.space`` package docstring).
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.space.framework import _Framework
from search.space.model import Constraint, Dimension, Space
from search.space.schema import (
    ASPECT_KEYS,
    BASE,
    BUDGET_DEFAULTS,
    BUDGET_KEYS,
    CONSTRAINT_KEYS,
    DESIGN_KEYS,
    DISTRIBUTIONS,
    MAX_GRID,
    MODES,
    TOP_LEVEL_KEYS,
    VARIANT,
    SpaceError,
)
from search.space.values import _SCALARS, _describe_types, _is_int, _is_number, _listing, _same, _type_ok


class _Checker:
    """Checks one parsed file (``data``) section by section; :meth:`space` is the whole check and its result.

    Each method raises at the first problem it finds, so a file with several mistakes reports them one at a time.
    """

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
        high = self.fw.bounds.get("epochs", (1, None))[1]
        if high is not None and budget["epochs"] > high:
            raise self.error("budget.epochs", "more epochs than a run may train:", budget["epochs"],
                             f"an int from 1 to {high:,}")
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
        better = self.fw.metrics.get(metric)
        if better is not None and mode != better:
            raise self.error("mode", f"{metric} is better when {'higher' if better == 'max' else 'lower'}; got",
                             mode, [better])
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

        self.in_bounds(fixed, dims)
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
        self.metric_measured(space, allowed)
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

    def in_bounds(self, fixed: Mapping[str, Any], dims: Mapping[str, Dimension]) -> None:
        """Every value a numeric option can take lies in its range (``csl.config.OPTION_BOUNDS``), and a batch is
        never larger than a fixed ``train_limit`` (a trial would fail on it only once it runs)."""
        for option, (low, high) in self.fw.bounds.items():
            allowed = f"{low} to {high:,}" if high is not None else f"at least {low}"
            for key, value in self._values(option, fixed, dims):
                if _is_number(value) and (value < low or high is not None and value > high):
                    raise self.error(key, f"{option} outside its range:", value, allowed)
        limit = fixed.get("train_limit")
        if _is_int(limit):
            for key, value in self._values("batch_size", fixed, dims):
                if _is_number(value) and value > limit:
                    raise self.error(key, f"batch_size above train_limit ({limit}): a trial has fewer images "
                                     "than one batch:", value, f"a batch_size from 1 to {limit}")
        workers = fixed.get("workers_per_trial")
        if _is_int(workers) and workers > 1:  # every worker trains an equal shard of each batch (csl.distributed)
            for key, value in self._values("batch_size", fixed, dims):
                if _is_int(value) and value % workers:
                    raise self.error(key, f"batch_size not divisible by workers_per_trial ({workers}): each "
                                     "worker trains an equal shard of every batch:", value,
                                     f"a multiple of {workers}")

    @staticmethod
    def _values(option: str, fixed: Mapping[str, Any], dims: Mapping[str, Dimension]) -> list[tuple[str, Any]]:
        """(key in the file, value) of every value ``option`` can take: fixed, each choice, a range's bounds."""
        if option in fixed:
            return [(f"fixed.{option}", fixed[option])]
        dim = dims.get(option)
        if dim is None:
            return []
        if dim.kind == "choice":
            return [(f"params.{option}.choice[{i}]", v) for i, v in enumerate(dim.values or ())]
        return [(f"params.{option}.{dim.kind}", bound) for bound in (dim.low, dim.high)]

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
        if self.fw.resolve is None:  # csl.presets does not exist yet: see framework._framework
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

    def metric_measured(self, space: Space, allowed: list[dict[str, Any]]) -> None:
        """csl.metrics.check_metric for each distinct data setting of the configs: a metric that runs would not
        report (a label metric on unlabelled data) is refused before anything runs."""
        from csl.metrics import CONFIG_KEYS, check_metric

        configs = list(allowed)
        if any(not d.categorical for d in space.dimensions.values()):
            configs.append(space.sample(random.Random(0)))
        seen: set[str] = set()
        for config in configs:
            trial = space.trial_config(config)
            key = repr([trial.get(k) for k in CONFIG_KEYS])
            if key in seen:
                continue
            seen.add(key)
            try:
                check_metric(space.metric, trial)
            except ValueError as exc:  # its message names the metric and what is allowed
                raise SpaceError(f"{self.path}: metric: {exc}", file=str(self.path), key="metric",
                                 value=space.metric) from exc


def _default_reason(when: Mapping[str, tuple], require: Mapping[str, tuple], forbid: Mapping[str, tuple]) -> str:
    def show(cond: Mapping[str, tuple]) -> str:
        return " and ".join(f"{k} in {list(v)}" if len(v) > 1 else f"{k}={v[0]}" for k, v in cond.items())

    if forbid:
        return "forbidden: " + show({**when, **forbid})
    return (f"when {show(when)}: " if when else "") + "require " + show(require)
