"""Searchers that propose trial configs from a ``Space`` and never launch one its constraints forbid.

Three ``ray.tune.search.Searcher`` subclasses, all returning the flat trial config (``space.trial_config(params)``)
as the Ray trial's config, so a Ray config key, an MLflow param and a ``csl train`` option are the same word:

- ``ConstrainedOptunaSearcher``: optuna's TPE on optuna's ask/tell API (why not Ray's ``OptunaSearch``: see its
  docstring);
- ``SpaceRandomSearcher``: ``space.sample(rng)`` with rejection;
- ``GridSearcher``: every allowed combination of ``space.grid()`` exactly once, then ``FINISHED``.

Every proposal is written to the search's ledger (``search.ledger``) before Tune sees it. A resume hands a searcher
the planned trials Tune lost (``replays``): it proposes those first, with their recorded configs, and moves its own
state on as if it had proposed them again (the draws are made and set aside, an optuna trial is asked with the
recorded parameters), so that nothing is proposed twice and a new proposal is never an old one.

State is JSON, never pickle. Tune calls ``save`` / ``restore`` when it snapshots and restores the experiment
(the file is Tune's ``searcher-state-<session>.pkl``; what it holds is JSON): the launched configs, the rejection
count, and per searcher the optuna history (parameters, distributions as ``optuna.distributions`` JSON, states,
values, intermediate values), the ``random.Random`` state or the grid position. A file that is not such JSON is
refused (``SearcherStateError``), never executed.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from typing import Any

from ray.tune.search import Searcher

log = logging.getLogger(__name__)

# Proposals rejected in a row before a searcher concludes that the space has nothing allowed left to offer.
MAX_REJECTIONS = 2000
STATE_FORMAT = "csl-searcher-1"


class SearcherStateError(ValueError):
    """A searcher state file that cannot be read back (damaged, replaced, or of another searcher)."""


class _SpaceSearcher(Searcher):
    """Bookkeeping shared by the three searchers: the space, the ledger, replays, the JSON state."""

    kind = ""

    def __init__(self, space: Any, *, metric: str | None = None, mode: str | None = None, seed: int = 0) -> None:
        super().__init__(metric=metric or space.metric, mode=mode or space.mode)
        self.space = space
        self.seed = seed
        self.rejected = 0  # proposals dropped because a constraint forbade them
        self.launched: dict[str, dict[str, Any]] = {}  # Ray trial id -> config it was given
        self.ledger: Any = None  # search.ledger.Ledger, set by the driver
        self.replays: list[tuple[str, dict[str, Any]]] = []  # (lost trial id, its config), proposed first

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # The space is given to the constructor; Tune's param_space stays empty. Accept Tune's metric/mode.
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    # ------------------------------------------------------------------ proposing

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.replays:
            lost, config = self.replays.pop(0)
            self._replay(trial_id, config)
            return self._launch(trial_id, config, replays=lost)
        return self._propose(trial_id)

    def _propose(self, trial_id: str) -> dict[str, Any] | str | None:
        """A new config for ``trial_id`` (abstract: each searcher below proposes in its own way)."""
        raise NotImplementedError

    def _replay(self, trial_id: str, config: dict[str, Any]) -> None:
        """Move the searcher's state on as if it had just proposed ``config`` for ``trial_id`` (abstract: every
        searcher below overrides it)."""
        raise NotImplementedError

    def _allowed(self, params: dict[str, Any]) -> dict[str, Any] | None:
        config = self.space.trial_config(params)
        reason = self.space.violation(config)
        if reason is not None:
            self.rejected += 1
            log.debug("rejected %s: %s", params, reason)
            return None
        return config

    def _launch(self, trial_id: str, config: dict[str, Any], *, replays: str | None = None) -> dict[str, Any]:
        if self.ledger is not None:
            self.ledger.record(trial_id, config, replays=replays)
        self.launched[trial_id] = config
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Random and grid proposals do not learn from results."""

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "kind": self.kind, "seed": self.seed, "rejected": self.rejected,
                "launched": self.launched}  # fmt: skip

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.rejected = int(state["rejected"])
        self.launched = {str(k): dict(v) for k, v in dict(state["launched"]).items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(self.state(), f, default=str)

    def restore(self, checkpoint_path: str) -> None:
        self.load_state(read_state(checkpoint_path, self.kind))


def read_state(path: str, kind: str | None = None) -> dict[str, Any]:
    """A searcher state file's content, or SearcherStateError saying why it is not one (nothing is executed)."""
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SearcherStateError(f"{path}: not a csl-search searcher state ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SearcherStateError(f"{path}: not a csl-search searcher state (format {STATE_FORMAT} expected)")
    if kind is not None and state.get("kind") != kind:
        raise SearcherStateError(f"{path}: a {state.get('kind')} searcher's state, not a {kind} searcher's")
    if not isinstance(state.get("launched"), dict):
        raise SearcherStateError(f"{path}: no launched trials in the searcher state")
    return state


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

    Its state: one record per launched trial (parameters, distributions, state, value, intermediate values).
    Restoring replays the ended ones into a fresh study (``study.add_trial``) and asks the running ones again with
    their parameters (``study.enqueue_trial``); the fresh sampler is seeded from the seed and the history's length,
    so it does not repeat the first run's draws. Rejected draws are counted, not kept (TPE ignores FAIL trials).
    """

    kind = "optuna"

    def __init__(
        self, space: Any, *, max_epochs: int, metric: str | None = None, mode: str | None = None, seed: int = 0
    ) -> None:
        import optuna

        super().__init__(space, metric=metric, mode=mode, seed=seed)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one "Trial N failed" warning per rejection is noise
        self.max_epochs = max_epochs
        self.ot_trials: dict[str, Any] = {}  # Ray trial id -> live optuna trial
        self.reported: dict[str, int] = {}  # Ray trial id -> last epoch reported to optuna
        self.records: dict[str, dict[str, Any]] = {}  # Ray trial id -> its optuna trial as JSON
        self.study = self._new_study(seed)

    def _new_study(self, seed: int) -> Any:
        import optuna

        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        direction = "maximize" if self.mode == "max" else "minimize"
        return optuna.create_study(direction=direction, sampler=sampler)

    def _record(self, trial_id: str, ot_trial: Any) -> None:
        from optuna.distributions import distribution_to_json

        frozen = self.study.trials[ot_trial.number]
        self.records[trial_id] = {
            "params": dict(frozen.params),
            "distributions": {k: distribution_to_json(v) for k, v in frozen.distributions.items()},
            "state": "RUNNING", "value": None, "intermediate": {},
        }  # fmt: skip
        self.ot_trials[trial_id] = ot_trial

    def _propose(self, trial_id: str) -> dict[str, Any] | str | None:
        from optuna.trial import TrialState

        for _ in range(MAX_REJECTIONS):
            ot_trial = self.study.ask()
            config = self._allowed(self.space.suggest(ot_trial))
            if config is not None:
                self._record(trial_id, ot_trial)
                return self._launch(trial_id, config)
            self.study.tell(ot_trial, state=TrialState.FAIL)
        log.warning("optuna proposed %d forbidden configs in a row; ending the search", MAX_REJECTIONS)
        return Searcher.FINISHED

    def _replay(self, trial_id: str, config: dict[str, Any]) -> None:
        params = {name: config[name] for name in self.space.dimensions if name in config}
        self.study.enqueue_trial(params, skip_if_exists=False)
        ot_trial = self.study.ask()
        self.space.suggest(ot_trial)  # takes the enqueued values
        self._record(trial_id, ot_trial)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self.ot_trials.get(trial_id)
        value, epoch = result.get(self.metric), result.get("epoch")
        if ot_trial is None or not _finite(value) or epoch is None or epoch <= self.reported.get(trial_id, 0):
            return
        ot_trial.report(float(value), int(epoch))
        self.reported[trial_id] = int(epoch)
        self.records[trial_id]["intermediate"][str(int(epoch))] = float(value)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        ot_trial = self.ot_trials.pop(trial_id, None)
        if ot_trial is None:
            return
        result = result or {}
        value = result.get(self.metric)
        record = self.records[trial_id]
        if error or result.get("diverged") or result.get("failed") or not _finite(value):
            self.study.tell(ot_trial, state=TrialState.FAIL)
            record["state"] = "FAIL"
        elif int(result.get("epoch", 0)) < self.max_epochs:
            self.study.tell(ot_trial, state=TrialState.PRUNED)
            record["state"] = "PRUNED"
        else:
            self.study.tell(ot_trial, float(value), state=TrialState.COMPLETE)
            record.update(state="COMPLETE", value=float(value))

    def state(self) -> dict[str, Any]:
        return {**super().state(), "records": self.records, "reported": self.reported}

    def load_state(self, state: Mapping[str, Any]) -> None:
        from optuna.distributions import json_to_distribution
        from optuna.trial import TrialState, create_trial

        super().load_state(state)
        try:
            records = {str(k): dict(v) for k, v in dict(state["records"]).items()}
            self.reported = {str(k): int(v) for k, v in dict(state["reported"]).items()}
            self.study = self._new_study(_mixed_seed(self.seed, len(records)))
            self.ot_trials, self.records = {}, {}
            for trial_id, record in records.items():
                distributions = {k: json_to_distribution(v) for k, v in record["distributions"].items()}
                intermediate = {int(k): float(v) for k, v in record["intermediate"].items()}
                if record["state"] == "RUNNING":
                    self.study.enqueue_trial(record["params"], skip_if_exists=False)
                    ot_trial = self.study.ask(distributions)
                    for step, value in sorted(intermediate.items()):
                        ot_trial.report(value, step)
                    self.ot_trials[trial_id] = ot_trial
                else:
                    self.study.add_trial(create_trial(
                        params=record["params"], distributions=distributions, state=TrialState[record["state"]],
                        value=record["value"], intermediate_values=intermediate,
                    ))  # fmt: skip
                self.records[trial_id] = record
        except (KeyError, TypeError, ValueError) as exc:
            raise SearcherStateError(f"optuna history does not read back ({type(exc).__name__}: {exc})") from None


class SpaceRandomSearcher(_SpaceSearcher):
    """Independent draws from ``space.sample(rng)`` (seeded), rejecting what the constraints forbid."""

    kind = "random"

    def __init__(self, space: Any, *, metric: str | None = None, mode: str | None = None, seed: int = 0) -> None:
        super().__init__(space, metric=metric, mode=mode, seed=seed)
        self.rng = random.Random(seed)

    def _draw(self) -> dict[str, Any] | None:
        for _ in range(MAX_REJECTIONS):
            config = self._allowed(self.space.sample(self.rng))
            if config is not None:
                return config
        log.warning("the space's sampler proposed %d forbidden configs in a row; ending the search", MAX_REJECTIONS)
        return None

    def _propose(self, trial_id: str) -> dict[str, Any] | str | None:
        config = self._draw()
        return Searcher.FINISHED if config is None else self._launch(trial_id, config)

    def _replay(self, trial_id: str, config: dict[str, Any]) -> None:
        self._draw()  # the draw the lost proposal made: the next new one is a new draw

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {**super().state(), "rng": [version, list(internal), gauss]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        try:
            version, internal, gauss = state["rng"]
            self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        except (KeyError, TypeError, ValueError) as exc:
            raise SearcherStateError(f"random generator state does not read back ({exc})") from None


class GridSearcher(_SpaceSearcher):
    """Every allowed combination of ``space.grid()`` exactly once, in the grid's order, then ``FINISHED``.

    ``len(grid)`` is the natural ``num_samples``; a smaller one runs the first ``num_samples`` combinations.
    Combinations the constraints forbid (the grid should already leave them out) are skipped, never launched.
    """

    kind = "grid"

    def __init__(self, space: Any, *, metric: str | None = None, mode: str | None = None, seed: int = 0) -> None:
        super().__init__(space, metric=metric, mode=mode, seed=seed)
        self.grid = list(space.grid())
        self.position = 0

    def _next(self) -> dict[str, Any] | None:
        while self.position < len(self.grid):
            params = self.grid[self.position]
            self.position += 1
            config = self._allowed(params)
            if config is not None:
                return config
        return None

    def _propose(self, trial_id: str) -> dict[str, Any] | str | None:
        config = self._next()
        return Searcher.FINISHED if config is None else self._launch(trial_id, config)

    def _replay(self, trial_id: str, config: dict[str, Any]) -> None:
        self._next()

    def allowed(self) -> int:
        """How many configs this grid launches in all."""
        return sum(self.space.violation(self.space.trial_config(p)) is None for p in self.grid)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "position": self.position}

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        try:
            self.position = int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SearcherStateError(f"grid position does not read back ({exc})") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mixed_seed(seed: int, history: int) -> int:
    """The seed of a restored sampler: the search's seed and how much history it restored (0: the seed itself)."""
    return seed if history == 0 else random.Random(f"{seed}:{history}").randrange(2**32)


SEARCHERS = {"optuna": ConstrainedOptunaSearcher, "random": SpaceRandomSearcher, "grid": GridSearcher}


def make_searcher(name: str, space: Any, *, max_epochs: int, seed: int = 0) -> _SpaceSearcher:
    if name == "optuna":
        return ConstrainedOptunaSearcher(space, max_epochs=max_epochs, seed=seed)
    if name == "random":
        return SpaceRandomSearcher(space, seed=seed)
    if name == "grid":
        return GridSearcher(space, seed=seed)
    raise ValueError(f"unknown searcher '{name}'; choose one of: {', '.join(SEARCHERS)}")
