"""What ``csl-search resume`` checks before it continues a search, and how it continues.

Three records of a search can disagree after a crash: Tune's last snapshot in the experiment folder (trials and
searcher state, written every few seconds), the search's ledger (``trials.jsonl``: every trial the searcher
proposed, written at once: ``search.ledger``), and the MLflow child runs. Before anything runs, ``plan_resume``
reads them and picks one of two ways on:

- **restore**: Tune's snapshot is whole (its experiment state parses, its searcher state is csl-search's JSON and
  holds exactly the snapshot's trials). Tune restores it; the planned trials it lacks (proposed after the
  snapshot) are proposed again first, with their recorded configs (*replays*);
- **rebuild**: Tune never snapshotted (the driver died in its first seconds), or the user asked for it
  (``--rebuild``) because the snapshot is damaged. Tune's snapshot files are moved aside (never deleted) and the
  search starts over in the same folder from the ledger: every planned trial is replayed, an ended one repeats
  its end from MLflow without training, an unfinished one continues from its last checkpoint.

Anything else stops the resume with one line (``ResumeError``) naming the file and what to do, before a run or a
table is touched. After the search, ``missing_trials`` says which planned trials did not end in it, so that a
partial restore is never reported (or retired in MLflow) as complete.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from search import storage, trust
from search.errors import ResumeError  # noqa: F401 - defined there so that reporting an error imports no Ray
from search.ledger import Ledger, Planned
from search.searchers import SearcherStateError, read_state


@dataclass
class ResumePlan:
    mode: str  # "restore" or "rebuild"
    planned: list[Planned]
    replays: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (current id, config) to propose again
    snapshot_trials: dict[str, str] = field(default_factory=dict)  # Ray trial id -> status in Tune's snapshot
    notes: list[str] = field(default_factory=list)  # what the resume found, one line each
    checkpoints: list[tuple[str, str]] = field(default_factory=list)  # (missing checkpoint, newest of its trial)


def _rebuild_hint(path: str) -> str:
    return (f"its trials are safe in MLflow and trials.jsonl: csl-search resume {path} --rebuild continues the "
            "search from them (Tune's snapshot files are moved aside, not deleted)")  # fmt: skip


def read_snapshot(path: str) -> tuple[str, dict[str, Any]] | None:
    """(file, Tune's newest experiment state with its trials decoded), None when Tune never wrote one."""
    files = trust.matching(path, trust.EXPERIMENT_STATE)
    if not files:
        return None
    newest = files[-1]  # Tune restores the newest by name (a timestamp)
    try:
        text = storage.read_text(newest)
    except (OSError, UnicodeDecodeError) as exc:
        raise trust.UntrustedFolder(f"{newest}: unreadable ({exc})") from None
    return newest, trust.experiment_state(text, newest)


def plan_resume(path: str, state: dict[str, Any], *, rebuild: bool = False) -> ResumePlan:
    """Check the folder and decide how to continue (module docstring); ResumeError when it cannot."""
    ledger = Ledger(path)
    planned = ledger.planned()
    try:
        trust.check_folder(path)
    except trust.UntrustedFolder as exc:
        raise ResumeError(str(exc)) from None
    pbt = state["options"]["scheduler"] == "pbt"
    if rebuild:
        if pbt:
            raise ResumeError(f"{path}: --rebuild: a PBT search cannot be rebuilt (its population is Tune's own "
                              "state); resume it without --rebuild")  # fmt: skip
        return _rebuild(path, planned, "as asked (--rebuild)")
    try:
        snapshot = read_snapshot(path)
    except trust.UntrustedFolder as exc:
        message = str(exc)
        raise ResumeError(f"{message}; {_rebuild_hint(path)}" if "damaged" in message else message) from None
    if snapshot is None:
        if pbt and planned:
            raise ResumeError(f"{path}: Tune never snapshotted this PBT search; start it again")
        return _rebuild(path, planned, "Tune had not snapshotted the experiment yet")
    where, document = snapshot
    trials = {t["trial_id"]: str(t.get("status", "")).lower() for t, _ in document["trial_data"]}
    plan = ResumePlan("restore", planned, snapshot_trials=trials)
    if not pbt:
        _check_searcher_state(path, state, set(trials))
    known = {trial_id for p in planned for trial_id in p.ids}
    if planned and not set(trials) <= known:
        strangers = sorted(set(trials) - known)
        raise ResumeError(f"{where}: holds trials the search's ledger never planned ({', '.join(strangers[:5])}): "
                          f"the folder mixes two searches or trials.jsonl is damaged; {_rebuild_hint(path)}")
    plan.replays = [(p.trial_id, p.config) for p in planned if not set(p.ids) & set(trials)]
    plan.notes.append(f"Tune's snapshot holds {len(trials)} of the {len(planned)} planned trials")
    plan.checkpoints = _missing_checkpoints(path, document)
    if plan.replays:
        plan.notes.append(f"{len(plan.replays)} trials proposed after it are proposed again with their configs")
    return plan


CHECKPOINT_NAME = re.compile(r"checkpoint_\d{6}$")


def _missing_checkpoints(path: str, document: dict[str, Any]) -> list[tuple[str, str]]:
    """The checkpoints Tune's snapshot would restore unfinished trials from that are gone, each with the newest
    checkpoint of its trial: (missing folder, newest folder).

    Tune keeps two checkpoints per trial, its best (``search.trainable``'s score) and its latest, and deletes an
    older one once a newer one replaces it; it uploads its snapshot in the background, so a driver killed in
    between leaves a snapshot that names a deleted checkpoint, and Tune would fail the trial on it. The copy of the
    newest keeps the trial continuing from its newest epoch; a copy given a deleted best checkpoint's name is not
    taken for the best by ``search.models``, which finds the best epoch's checkpoint by its ``csl_result.json``.
    The names are read from the trial's pickled checkpoint manager as text (``trust.pickle_strings``: nothing is
    unpickled).
    """
    missing = []
    for state, meta in document["trial_data"]:
        if str(state.get("status")) == "TERMINATED":
            continue
        blob = meta.get("checkpoint_manager")
        if not isinstance(blob, dict) or not isinstance(blob.get("value"), str):
            continue
        folder = storage.join(path, str(state.get("relative_logdir") or f"csl_trial_{state['trial_id']}"))
        named = {text.rstrip("/").rsplit("/", 1)[-1] for text in trust.pickle_strings(bytes.fromhex(blob["value"]))}
        named = {name for name in named if CHECKPOINT_NAME.search(name)}
        present = sorted(name for name in _listing(folder) if CHECKPOINT_NAME.fullmatch(name))
        for name in sorted(named - set(present)):
            if not present:
                raise ResumeError(f"{folder}: Tune's snapshot restores this trial from {name}, and no checkpoint of "
                                  f"it is left; {_rebuild_hint(path)}")  # fmt: skip
            missing.append((storage.join(folder, name), storage.join(folder, present[-1])))
    return missing


def _listing(folder: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory]


def restore_checkpoints(plan: ResumePlan) -> None:
    """Give each missing checkpoint back its name, as a copy (hard links, locally) of its trial's newest one: the
    trial then continues from its newest epoch (its reported epoch is the checkpoint's own, ``csl_result.json``)."""
    import shutil

    import pyarrow.fs as pafs

    for missing, newest in plan.checkpoints:
        if storage.is_uri(missing):
            fs, source = storage.filesystem(newest)
            target = storage.filesystem(missing)[1]
            for info in fs.get_file_info(pafs.FileSelector(source, recursive=True)):
                if info.type == pafs.FileType.File:
                    fs.copy_file(info.path, target + info.path[len(source) :])
        else:
            try:
                shutil.copytree(newest, missing, copy_function=os.link)
            except OSError:
                shutil.rmtree(missing, ignore_errors=True)
                shutil.copytree(newest, missing)
        plan.notes.append(f"{missing} (named by Tune's snapshot, deleted since) is a copy of {newest}")


def _check_searcher_state(path: str, state: dict[str, Any], snapshot_ids: set[str]) -> None:
    files = trust.matching(path, "searcher-state-*.pkl")
    if not files:
        raise ResumeError(f"{path}: Tune's snapshot has no searcher state (searcher-state-*.pkl); "
                          f"{_rebuild_hint(path)}")  # fmt: skip
    try:
        if storage.is_uri(files[-1]):
            raise SearcherStateError(f"{files[-1]}: searcher states are read from local folders only")
        searcher = read_state(files[-1], state["options"]["searcher"])
    except SearcherStateError as exc:
        raise ResumeError(f"{exc}; {_rebuild_hint(path)}") from None
    launched = set(searcher["launched"])
    if launched != snapshot_ids:
        raise ResumeError(f"{files[-1]}: the searcher state and the experiment state are from different moments "
                          f"({len(launched)} vs {len(snapshot_ids)} trials); {_rebuild_hint(path)}")


def _rebuild(path: str, planned: list[Planned], why: str) -> ResumePlan:
    plan = ResumePlan("rebuild", planned, replays=[(p.trial_id, p.config) for p in planned])
    plan.notes.append(f"rebuilding from the ledger ({why}): {len(planned)} planned trials proposed again")
    return plan


def set_aside_snapshot(path: str) -> str | None:
    """Move Tune's snapshot files into ``superseded-<time>/`` (a rebuild starts Tune afresh); the folder or None."""
    files = [f for pattern in (trust.EXPERIMENT_STATE, *trust.RAY_PICKLES, "searcher-state-*.pkl")
             for f in trust.matching(path, pattern)]  # fmt: skip
    if not files:
        return None
    target = storage.join(path, time.strftime("superseded-%Y%m%d-%H%M%S"))
    fs, base = storage.filesystem(target)
    fs.create_dir(base, recursive=True)
    for file in files:
        source = storage.filesystem(file)[1]
        fs.move(source, f"{base}/{source.rsplit('/', 1)[-1]}")
    return target


def missing_trials(planned: list[Planned], rows: list[dict[str, Any]]) -> list[Planned]:
    """The planned trials that no row of the results table stands for."""
    held = {row["trial_id"] for row in rows}
    return [p for p in planned if not set(p.ids) & held]
