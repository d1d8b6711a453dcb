"""Tune schedulers built from a space's budget: ASHA (default), HyperBand, PBT, FIFO.

Every scheduler counts in epochs (``time_attr="epoch"``, which each report carries), so a trial restored from a
checkpoint is judged at the right rung. ASHA and HyperBand stop at the budget's ``epochs`` and use its
``grace_period`` / ``reduction_factor``. PBT exploits other trials' checkpoints every ``grace_period`` epochs and
explores the space's continuous dimensions (``uniform`` / ``loguniform``), kept inside their bounds.
"""

from __future__ import annotations

import functools
import random
from typing import Any

SCHEDULERS = ("asha", "hyperband", "pbt", "fifo")


def scheduler_settings(name: str, space: Any, max_epochs: int) -> dict[str, Any]:
    """The parameters ``build_scheduler`` gives scheduler ``name``: what the search's parent run records."""
    budget = dict(space.budget or {})
    if name == "asha":
        return {"time_attr": "epoch", "max_t": max_epochs, "grace_period": int(budget.get("grace_period", 1)),
                "reduction_factor": float(budget.get("reduction_factor", 2))}  # fmt: skip
    if name == "hyperband":
        return {"time_attr": "epoch", "max_t": max_epochs, "reduction_factor": float(budget.get("reduction_factor", 3))}
    if name == "pbt":
        # Exploit/explore every grace_period epochs: the span after which ASHA would judge a trial too.
        return {"time_attr": "epoch", "perturbation_interval": int(budget.get("grace_period", 1)),
                "hyperparam_mutations": sorted(continuous_bounds(space))}  # fmt: skip
    if name == "fifo":
        return {}
    raise ValueError(f"unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}")


def build_scheduler(name: str, space: Any, max_epochs: int, seed: int = 0) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining

    settings = scheduler_settings(name, space, max_epochs)
    if name == "asha":
        return ASHAScheduler(**settings)
    if name == "hyperband":
        return HyperBandScheduler(**settings)
    if name == "pbt":
        mutations = continuous_mutations(space)
        if not mutations:
            raise ValueError(f"pbt needs continuous dimensions (uniform, loguniform) to perturb; {space.name} has none")
        random.seed(seed)  # PBT draws its exploit/explore decisions from the global generator
        return PopulationBasedTraining(
            time_attr=settings["time_attr"],
            perturbation_interval=settings["perturbation_interval"],
            hyperparam_mutations=mutations,
            custom_explore_fn=functools.partial(clip_to_bounds, bounds=continuous_bounds(space)),
        )
    return FIFOScheduler()


def continuous_bounds(space: Any) -> dict[str, tuple[float, float]]:
    """(low, high) of every ``uniform`` / ``loguniform`` dimension."""
    return {
        name: (float(dim.low), float(dim.high))
        for name, dim in space.dimensions.items()
        if dim.kind in ("uniform", "loguniform")
    }


def continuous_mutations(space: Any) -> dict[str, Any]:
    """Tune domains for PBT's explore step (resampling): one per continuous dimension."""
    from ray import tune

    return {
        name: tune.loguniform(low, high) if space.dimensions[name].kind == "loguniform" else tune.uniform(low, high)
        for name, (low, high) in continuous_bounds(space).items()
    }


def clip_to_bounds(config: dict[str, Any], *, bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """PBT's explore step multiplies by 0.8 / 1.2 without looking at the domain: keep values inside the space."""
    for key, (low, high) in bounds.items():
        if isinstance(config.get(key), (int, float)):
            config[key] = min(max(config[key], low), high)
    return config


def initial_population(searcher: Any, size: int, max_concurrent: int | None) -> tuple[Any, dict[str, Any]]:
    """PBT's first generation, drawn up front by the chosen searcher (so it respects the constraints).

    Tune refuses any ``SearchGenerator`` beside PBT (PBT itself searches, by exploiting and exploring); its plain
    ``BasicVariantGenerator`` may run fixed configs, so the searcher's proposals become ``points_to_evaluate``
    (which must name keys of the param space: each key is declared with ``None``, which the trainer ignores).
    PBT then only perturbs continuous dimensions, which constraints never name. Returns (search_alg, param_space).
    """
    from ray.tune.search import BasicVariantGenerator, Searcher

    configs = []
    for i in range(size):
        config = searcher.suggest(f"pbt-initial-{i}")
        if config in (None, Searcher.FINISHED):
            break
        configs.append(config)
    param_space = {key: None for config in configs for key in config}
    return BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=int(max_concurrent or 0)), param_space
