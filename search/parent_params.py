"""What a search's parent run records of its setup beside its options, so that a report needs nothing but MLflow:
the budget, the scheduler's parameters and the data sets its trials see (``search.tracking.start_parent_run`` logs
them as params, the data sets also as MLflow dataset inputs, as the trial runs have theirs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The options that say which images a trial sees (csl.config.TRAINER_DEFAULTS): its SSL data, the labelled set
# its kNN evaluation reads, and their limits.
DATA_KEYS = ("data", "data_root", "train_limit", "eval_data", "eval_train_limit", "test_limit")


def setup_params(space: Any, options: Mapping[str, Any], datasets: list[dict[str, Any]]) -> dict[str, Any]:
    """What a report needs of a search without its Ray folder: the budget (``budget.epochs``,
    ``budget.grace_period``, ``budget.reduction_factor``, ``budget.num_samples`` as run, ...), the scheduler's
    parameters (``scheduler.<name>``: ``search.schedulers.scheduler_settings``) and the data sets (``DATA_KEYS``,
    under the children's param names; several values joined by ", ")."""
    from search.schedulers import scheduler_settings

    budget = {**space.budget, "num_samples": options.get("num_samples", space.budget.get("num_samples"))}
    if options.get("max_concurrent"):
        budget["max_concurrent_trials"] = options["max_concurrent"]
    params = {f"budget.{k}": v for k, v in budget.items() if v is not None}
    epochs = int(options.get("max_epochs") or space.budget["epochs"])  # what build_scheduler was given
    settings = scheduler_settings(str(options["scheduler"]), space, epochs)
    params.update({f"scheduler.{k}": v for k, v in settings.items()})
    for key in DATA_KEYS:
        values = list(dict.fromkeys(str(d[key]) for d in datasets if d.get(key) is not None))
        if values:
            params[key] = ", ".join(values)
    return params


def search_datasets(space: Any) -> list[dict[str, Any]]:
    """The distinct data sets the space's trials train on: ``DATA_KEYS`` of its base, each variant, each ``data``
    choice, as the trials will see them (trainer defaults filled in)."""
    candidates = [{}] + [{"variant": name} for name in space.variants]
    dimension = space.dimensions.get("data")
    if dimension is not None and dimension.values:
        candidates = [{**c, "data": value} for c in candidates for value in dimension.values]
    found: list[dict[str, Any]] = []
    for candidate in candidates:
        effective = space.effective(candidate)
        data = {key: effective.get(key) for key in DATA_KEYS}
        if data not in found:
            found.append(data)
    return found
