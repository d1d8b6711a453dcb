"""The search's own record of the trials its searcher proposed: ``trials.jsonl`` in the experiment folder.

Tune snapshots an experiment (its trials and searcher) every few seconds and after checkpoints; a driver that dies
between two snapshots takes the trials proposed since with it. The searchers (``search.searchers``) write a line
here the moment they propose a trial, before Tune creates it, so a resume knows every planned trial whatever Tune
kept: it proposes the ones Tune lost again, with their recorded configs (a *replay*, which continues the lost
trial's MLflow run and checkpoint), and it checks at the end that each planned trial ended exactly once.

One JSON object per line: ``trial_id``, ``config`` (as the trial trains it), ``fingerprint``
(``search.tracking.config_fingerprint``) and ``replays`` (the id of the lost trial a replay stands for, else
null). A *planned trial* is a first proposal and its chain of replays; its current Ray trial id is the chain's last.
JSON Lines, not ``*.json``: Tune copies the folder's ``.json`` and ``.pkl`` files into its staging folder on restore
and uploads them back at every snapshot, which would put back a stale copy (``search.trainable.ENDED_FILE``).
A line cut short by a kill is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from search import storage

LEDGER_FILE = "trials.jsonl"


@dataclass(frozen=True)
class Planned:
    """One planned trial: its first Ray trial id, its current one (the last replay), its config."""

    first_id: str
    trial_id: str
    config: dict[str, Any]
    fingerprint: str
    ids: tuple[str, ...]  # every Ray trial id of the chain, first to current


class Ledger:
    """The ledger of one experiment folder (a local path or a URI); read once, appended to by the driver."""

    def __init__(self, experiment_path: str) -> None:
        self.path = storage.join(experiment_path, LEDGER_FILE)
        self.entries: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        try:
            text = storage.read_text(self.path)
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line of a driver killed while writing it
            if isinstance(entry, dict) and isinstance(entry.get("trial_id"), str):
                entries.append(entry)
        return entries

    def exists(self) -> bool:
        return bool(self.entries) or storage.exists(self.path)

    def record(self, trial_id: str, config: Mapping[str, Any], *, replays: str | None = None) -> None:
        from search.tracking import config_fingerprint

        entry = {
            "trial_id": trial_id, "config": dict(config), "fingerprint": config_fingerprint(config),
            "replays": replays, "time": time.time(),
        }  # fmt: skip
        storage.append_line(self.path, json.dumps(entry, default=str))
        self.entries.append(entry)

    def replay_of(self, trial_id: str) -> str | None:
        """The id of the lost trial that ``trial_id`` replays, if it is a replay."""
        for entry in reversed(self.entries):
            if entry["trial_id"] == trial_id:
                return entry.get("replays")
        return None

    def replayed(self, trial_id: str) -> list[str]:
        """The ids ``trial_id`` stands for: the trial it replays, the one that one replayed, ... (latest first)."""
        chain: list[str] = []
        lost = self.replay_of(trial_id)
        while lost is not None and lost not in chain:
            chain.append(lost)
            lost = self.replay_of(lost)
        return chain

    def planned(self) -> list[Planned]:
        """The planned trials, in the order they were first proposed."""
        first: dict[str, str] = {}  # any id of a chain -> its first id
        chains: dict[str, Planned] = {}
        for entry in self.entries:
            trial_id, replays = entry["trial_id"], entry.get("replays")
            root = first.get(replays, replays) if replays else trial_id
            first[trial_id] = root
            if root in chains:
                old = chains[root]
                chains[root] = Planned(root, trial_id, old.config, old.fingerprint, (*old.ids, trial_id))
            else:
                config = dict(entry.get("config") or {})
                chains[root] = Planned(root, trial_id, config, str(entry.get("fingerprint")), (trial_id,))
        return list(chains.values())
