"""Search spaces over the five CSL aspects, declared as data in ``spaces/*.yaml``.

A space file says what a search varies, what it keeps fixed, what it optimises and on what budget. It is
validated completely by :func:`load_space` before anything runs: every mistake is one :class:`SpaceError` whose
message names the file, the key, the bad value and the allowed values.

Schema (top-level keys; anything else is an error)
--------------------------------------------------
``name``         str, defaults to the file's stem.
``description``  str, optional; the MLflow experiment's description (``mlflow.note.content``) when a search creates it.
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

Layout (one module per concern): ``schema`` (the file's keys, limits and :class:`SpaceError`), ``model``
(:class:`Dimension`, :class:`Constraint`, :class:`Space`), ``yaml_loader`` (YAML with file/line errors),
``framework`` (what a space is checked against, read from csl), ``values`` (value and type predicates),
``checks`` (the validation), ``load`` (:func:`load_space`, which ties them together).
"""

from __future__ import annotations

from search.space.load import load_space
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
    SAMPLE_TRIES,
    TOP_LEVEL_KEYS,
    VARIANT,
    SpaceError,
)

__all__ = [
    "ASPECT_KEYS",
    "BASE",
    "BUDGET_DEFAULTS",
    "BUDGET_KEYS",
    "CONSTRAINT_KEYS",
    "DESIGN_KEYS",
    "DISTRIBUTIONS",
    "MAX_GRID",
    "MODES",
    "SAMPLE_TRIES",
    "TOP_LEVEL_KEYS",
    "VARIANT",
    "Constraint",
    "Dimension",
    "Space",
    "SpaceError",
    "load_space",
]
