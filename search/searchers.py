"""Searchers that propose trial configs from a ``Space`` and never launch one its constraints forbid.

Three ``ray.tune.search.Searcher`` subclasses, all returning the flat trial config (``space.trial_config(params)``)
as the Ray trial's config, so a Ray config key, an MLflow param and a ``csl train`` option are the same word:

- ``ConstrainedOptunaSearcher``: optuna's TPE on optuna's ask/tell API (why not Ray's ``OptunaSearch``: see its
  docstring);
- ``SpaceRandomSearcher``: ``space.sample(rng)`` with rejection;
- ``GridSearcher``: every allowed combination of ``space.grid()`` exactly once, then ``FINISHED``.

Each one keeps its whole state in plain attributes and pickles it in ``save`` / ``restore``, which Tune calls
when it checkpoints the experiment, so a resumed search continues where the searcher stood and a completed trial
is never proposed again.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
from typing import Any

from ray.tune.search import Searcher

log = logging.getLogger(__name__)

# Proposals rejected in a row before a searcher concludes that the space has nothing allowed left to offer.
MAX_REJECTIONS = 2000


class _SpaceSearcher(Searcher):
    """Bookkeeping shared by the three searchers: the space, the rejected count, save/restore of ``__dict__``."""

    def __init__(self, space: Any, *, metric: str | None = None, mode: str | None = None, seed: int = 0) -> None:
        super().__init__(metric=metric or space.metric, mode=mode or space.mode)
        self.space = space
        self.seed = seed
        self.rejected = 0  # proposals dropped because a constraint forbade them
        self.launched: dict[str, dict[str, Any]] = {}  # Ray trial id -> config it was given

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # The space is given to the constructor; Tune's param_space stays empty. Accept Tune's metric/mode.
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def _accept(self, trial_id: str, params: dict[str, Any]) -> dict[str, Any] | None:
        config = self.space.trial_config(params)
        reason = self.space.violation(config)
        if reason is not None:
            self.rejected += 1
            log.debug("rejected %s: %s", params, reason)
            return None
        self.launched[trial_id] = config
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Random and grid proposals do not learn from results."""

    # Tune pickles the searcher into the experiment folder; restoring replaces the whole state.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class ConstrainedOptunaSearcher(_SpaceSearcher):
    """TPE (optuna) over the space's dimensions that never launches a config the space's constraints forbid.

    Each Ray trial is one optuna trial: ``suggest`` calls ``study.ask()``, lets ``space.suggest(optuna_trial)``
    draw the parameters define-by-run, and checks ``space.violation(...)``. A forbidden draw is told to optuna as
    ``FAIL`` at once (TPE builds its densities from completed trials only, so the rejection costs nothing and
    biases nothing) and the searcher asks again, up to ``MAX_REJECTIONS`` times in a row; only an allowed config
    ever reaches Ray. Per-epoch results are reported to the optuna trial (``trial.report(value, epoch)``), and the
    end is told as ``COMPLETE`` with the last value (trial reached the budget's last epoch), ``PRUNED`` (stopped
    early by the scheduler: TPE ranks it by its intermediate values) or ``FAIL`` (error, diverged).

    Why not Ray's ``ray.tune.search.optuna.OptunaSearch``: it binds one ``study.ask()`` to each Ray trial id
    and turns whatever the space (a dict of distributions, or a define-by-run function) yields into a launched
    trial. A define-by-run function must return a dict (or ``None``, meaning "use what was suggested"), so it
    has no way to say "this draw is not allowed, draw again": raising aborts ``suggest`` on the driver, and the
    optuna trial stays bound to the Ray trial id. Optuna's own ``constraints_func`` (TPESampler) is a soft
    constraint evaluated *after* the objective ran, i.e. after the forbidden config was trained. Rejecting
    before launch needs the ask/tell loop that this class owns.
    """

    def __init__(
        self, space: Any, *, max_epochs: int, metric: str | None = None, mode: str | None = None, seed: int = 0
    ) -> None:
        import optuna

        super().__init__(space, metric=metric, mode=mode, seed=seed)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one "Trial N failed" warning per rejection is noise
        self.max_epochs = max_epochs
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        direction = "maximize" if self.mode == "max" else "minimize"
        self.study = optuna.create_study(direction=direction, sampler=sampler)
        self.ot_trials: dict[str, Any] = {}  # Ray trial id -> optuna trial
        self.reported: dict[str, int] = {}  # Ray trial id -> last epoch reported to optuna

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        from optuna.trial import TrialState

        for _ in range(MAX_REJECTIONS):
            ot_trial = self.study.ask()
            params = self.space.suggest(ot_trial)
            config = self._accept(trial_id, params)
            if config is not None:
                self.ot_trials[trial_id] = ot_trial
                return config
            self.study.tell(ot_trial, state=TrialState.FAIL)
        log.warning("optuna proposed %d forbidden configs in a row; ending the search", MAX_REJECTIONS)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self.ot_trials.get(trial_id)
        value, epoch = result.get(self.metric), result.get("epoch")
        if ot_trial is None or not _finite(value) or epoch is None or epoch <= self.reported.get(trial_id, 0):
            return
        ot_trial.report(float(value), int(epoch))
        self.reported[trial_id] = int(epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        ot_trial = self.ot_trials.pop(trial_id, None)
        if ot_trial is None:
            return
        result = result or {}
        value = result.get(self.metric)
        if error or result.get("diverged") or not _finite(value):
            self.study.tell(ot_trial, state=TrialState.FAIL)
        elif int(result.get("epoch", 0)) < self.max_epochs:
            self.study.tell(ot_trial, state=TrialState.PRUNED)
        else:
            self.study.tell(ot_trial, float(value), state=TrialState.COMPLETE)


class SpaceRandomSearcher(_SpaceSearcher):
    """Independent draws from ``space.sample(rng)`` (seeded), rejecting what the constraints forbid."""

    def __init__(self, space: Any, *, metric: str | None = None, mode: str | None = None, seed: int = 0) -> None:
        super().__init__(space, metric=metric, mode=mode, seed=seed)
        self.rng = random.Random(seed)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for _ in range(MAX_REJECTIONS):
            config = self._accept(trial_id, self.space.sample(self.rng))
            if config is not None:
                return config
        log.warning("the space's sampler proposed %d forbidden configs in a row; ending the search", MAX_REJECTIONS)
        return Searcher.FINISHED


class GridSearcher(_SpaceSearcher):
    """Every allowed combination of ``space.grid()`` exactly once, in the grid's order, then ``FINISHED``.

    ``len(grid)`` is the natural ``num_samples``; a smaller one runs the first ``num_samples`` combinations.
    Combinations the constraints forbid (the grid should already leave them out) are skipped, never launched.
    """

    def __init__(self, space: Any, *, metric: str | None = None, mode: str | None = None, seed: int = 0) -> None:
        super().__init__(space, metric=metric, mode=mode, seed=seed)
        self.grid = list(space.grid())
        self.position = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        while self.position < len(self.grid):
            params = self.grid[self.position]
            self.position += 1
            config = self._accept(trial_id, params)
            if config is not None:
                return config
        return Searcher.FINISHED

    def allowed(self) -> int:
        """How many configs this grid launches in all."""
        return sum(self.space.violation(self.space.trial_config(p)) is None for p in self.grid)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


SEARCHERS = {"optuna": ConstrainedOptunaSearcher, "random": SpaceRandomSearcher, "grid": GridSearcher}


def make_searcher(name: str, space: Any, *, max_epochs: int, seed: int = 0) -> _SpaceSearcher:
    if name == "optuna":
        return ConstrainedOptunaSearcher(space, max_epochs=max_epochs, seed=seed)
    if name == "random":
        return SpaceRandomSearcher(space, seed=seed)
    if name == "grid":
        return GridSearcher(space, seed=seed)
    raise ValueError(f"unknown searcher '{name}'; choose one of: {', '.join(SEARCHERS)}")
