"""An experiment folder is read like code: who may have written it, and what Ray's pickles in it would import.

csl-search's own files there are JSON (``csl_search.json``, ``trials.jsonl``, ``ended_trials.jsonl``, the searcher
state). Ray's are not: to resume, Tune unpickles parts of ``experiment_state-*.json`` (it embeds cloudpickle
blobs: each trial's storage context, placement group, checkpoint manager), ``search_gen_state-*.json``,
``basic-variant-state-*.json`` and ``callback-states-*.pkl``; unpickling runs whatever code a crafted file names.
(``tuner.pkl`` is Ray's too; ``csl-search resume`` never reads it: it builds a new Tuner from ``csl_search.json``
and the space file.) So before a resume hands the folder to Tune:

- a local folder, and each of those files, must belong to the user running the resume and be writable by nobody
  else (``check_owner``);
- every pickle Tune will load is read first by an unpickler that builds nothing (``InertUnpickler``: each global
  it names becomes an inert stand-in, nothing is imported or called), which finds a damaged file (it does not
  parse) and lists the globals it names; one that names anything outside the classes Ray 2.60 itself writes
  there (``RAY_STATE_GLOBALS``) is refused.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
from collections.abc import Iterator
from typing import Any

from search import storage

# Every global that Ray 2.60's experiment state names (read from the folders of this project's searches: trials'
# storage, checkpoint managers and placement groups, the experiment and its stopper, the concurrency limiter's and
# PBT's variant generator's state). Functions here are referenced, never called, except the two that rebuild
# a filesystem from its URI.
RAY_STATE_GLOBALS = frozenset({
    ("collections", "deque"), ("uuid", "UUID"), ("pyarrow._fs", "FileSystem._from_uri"),
    ("ray.train", "SyncConfig"), ("ray.train._internal.checkpoint_manager", "_CheckpointManager"),
    ("ray.train._internal.session", "_TrainingResult"), ("ray.train._internal.storage", "StorageContext"),
    ("ray.train._internal.storage", "_FilesystemSyncer"), ("ray.train._internal.storage", "_upload_to_fs_path"),
    ("ray.tune", "Checkpoint"), ("ray.tune", "CheckpointConfig"), ("ray.tune.stopper.noop", "NoopStopper"),
    ("ray.tune.stopper.timeout", "TimeoutStopper"), ("ray.tune.execution.placement_groups", "PlacementGroupFactory"),
    ("ray.tune.experiment.experiment", "Experiment"), ("search.run", "trial_dirname"),
})  # fmt: skip
RAY_PICKLES = ("search_gen_state-*.json", "basic-variant-state-*.json", "callback-states-*.pkl")
EXPERIMENT_STATE = "experiment_state-*.json"
TRUSTED_FILES = (EXPERIMENT_STATE, *RAY_PICKLES, "searcher-state-*.pkl", "tuner.pkl")


class UntrustedFolder(RuntimeError):
    """An experiment folder that a resume must not hand to Tune; the message names the file and why."""


class _Inert:
    """What every global of an inspected pickle becomes: accepts any construction and any state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


class InertUnpickler(pickle.Unpickler):
    """Reads a pickle through to its end without importing or calling anything; ``named``: the globals it names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.named: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> type:
        self.named.add((module, name))
        return type(f"inert {module}.{name}", (_Inert,), {})

    def persistent_load(self, pid: Any) -> _Inert:
        return _Inert()


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """The globals a pickle names; ValueError when it is not a whole pickle (cut short, damaged)."""
    unpickler = InertUnpickler(data)
    try:
        unpickler.load()
    except Exception as exc:  # noqa: BLE001 - any failure to parse means "damaged"
        raise ValueError(f"not a whole pickle ({type(exc).__name__}: {exc})") from None
    return unpickler.named


def pickle_strings(data: bytes) -> list[str]:
    """The text constants of a pickle, read opcode by opcode (``pickletools``): nothing is built or run."""
    import pickletools

    found = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                found.append(arg)
    except Exception:  # noqa: BLE001 - a damaged pickle: check_pickle says so
        pass
    return found


def check_pickle(data: bytes, where: str) -> None:
    try:
        named = pickle_globals(data)
    except ValueError as exc:
        raise UntrustedFolder(f"{where}: damaged: {exc}") from None
    foreign = sorted(f"{module}.{name}" for module, name in named - RAY_STATE_GLOBALS)
    if foreign:
        raise UntrustedFolder(
            f"{where}: names {', '.join(foreign)}, which Ray's own state never holds; the folder may have been "
            "tampered with: it was not resumed (nothing in it was run)"
        )


# The trial fields that Trial.__setstate__ unpickles from hex strings (``Trial._nonjson_fields`` in Ray 2.60).
TRIAL_PICKLED_FIELDS = ("results", "extra_arg", "placement_group_factory", "_resources",
                        "_default_placement_group_factory")  # fmt: skip


def _hex(value: Any, where: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise UntrustedFolder(f"{where}: damaged: a pickled field is not hex") from None


def _blobs(value: Any, where: str) -> Iterator[bytes]:
    """The cloudpickle fallbacks (``TuneFunctionEncoder``) a Tune state document holds."""
    if isinstance(value, dict):
        if value.get("_type") == "CLOUDPICKLE_FALLBACK":
            yield _hex(value.get("value"), where)
            return
        for item in value.values():
            yield from _blobs(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _blobs(item, where)


def experiment_state(text: str, where: str) -> dict[str, Any]:
    """A Tune ``experiment_state`` file parsed as plain JSON (its pickles left as they are), each pickle checked.

    Returns the document with ``trial_data`` decoded: a list of (trial state, run metadata) dicts.
    """
    try:
        document = json.loads(text)
        trials = [(json.loads(state), json.loads(meta)) for state, meta in document["trial_data"]]
        runner = document["runner_data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UntrustedFolder(f"{where}: damaged: not Tune's experiment state ({type(exc).__name__}: {exc})") from None
    for blob in _blobs([runner, trials], where):
        check_pickle(blob, where)
    for state, _ in trials:
        for key in TRIAL_PICKLED_FIELDS:
            if key in state:
                check_pickle(_hex(state[key], where), where)
    return {**document, "trial_data": trials}


def check_owner(path: str) -> None:
    """A local file or folder must be the user's own and writable by nobody else."""
    if storage.is_uri(path):
        return  # object stores: access is the bucket's policy
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UntrustedFolder(f"{path}: owned by uid {info.st_uid}, not by you (uid {os.getuid()}): not resumed; "
                              "an experiment folder is trusted like code, copy it if you trust its author")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFolder(f"{path}: writable by others (mode {stat.filemode(info.st_mode)}): not resumed; "
                              f"chmod go-w {path} if you trust everyone who could write it")


def matching(experiment_path: str, pattern: str) -> list[str]:
    """The files of the experiment folder whose names match ``pattern``, oldest name first (Tune's order)."""
    import fnmatch

    import pyarrow.fs as pafs

    fs, base = storage.filesystem(experiment_path)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))
    return [storage.join(experiment_path, name) for name in names]


def check_folder(experiment_path: str) -> None:
    """Owner and mode of the folder and of every file Tune reads when it restores; each pickle of those files."""
    check_owner(experiment_path)
    for pattern in TRUSTED_FILES:
        for path in matching(experiment_path, pattern):
            check_owner(path)
    for pattern in RAY_PICKLES:
        for path in matching(experiment_path, pattern):
            data = storage.read_bytes(path)
            check_pickle(data, path)
