"""What a space file may say (its keys, distributions and the limits of checking it), and the one error it raises.

Kept apart from the model and the checks so that both read the same names; the schema itself is described in the
``search.space`` package docstring.
"""

from __future__ import annotations

from typing import Any

from csl.best import MODES  # noqa: F401 - the one list of modes, used here and re-exported

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
VARIANT = "variant"
"""Name of the categorical dimension of a ``base``/``variants`` space."""
BASE = "base"
"""The variant that is the base itself."""
MAX_GRID = 200_000
"""Largest categorical grid that load_space enumerates to check the constraints."""
SAMPLE_TRIES = 10_000


class SpaceError(ValueError):
    """A space file that cannot be searched. The message names the file, the key, the bad value, what is allowed.

    The parts are also attributes (``file``, ``key``, ``value``, ``allowed``) where they apply.
    """

    def __init__(
        self, message: str, *, file: str | None = None, key: str | None = None, value: Any = None, allowed: Any = None
    ) -> None:
        super().__init__(message)
        self.file, self.key, self.value, self.allowed = file, key, value, allowed
