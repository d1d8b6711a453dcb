"""The Ray Tune function trainable: one trial = one ``csl.train.train`` run, reported to Tune once per epoch.

The trainer knows nothing about Tune. Its callback hands over each epoch's metrics and a ``save_checkpoint``
function; this module saves into a temporary folder, adds the epoch's result as ``csl_result.json``, reports
``metrics + checkpoint`` with ``tune.report`` (which copies the folder into the experiment's storage before it
returns), and resumes from ``tune.get_checkpoint()`` when Tune restarts the trial (retry after a failure,
resumed search, PBT exploit).

Every report with a checkpoint also carries the trial's running best (``search.best``, by the search's metric and
mode: ``csl_best_epoch`` / ``csl_best_value``) and ``csl_checkpoint_score``, the attribute Tune keeps its best
checkpoint by (``CheckpointConfig(checkpoint_score_attribute=..., checkpoint_score_order="max")``): the epoch itself
when that epoch becomes the new best, else 0. Tune ranks a NaN score below every number and puts a checkpoint whose
score equals an earlier one above it (the later wins a tie: ``ray.train._internal.checkpoint_manager``), so the
metric itself cannot be the score: epochs without evaluation (NaN) and equal values would keep the wrong epoch.
With the epoch as the score, the kept checkpoint of highest score is the last epoch that improved, which is
``search.best``'s best epoch exactly (strictly better only; the earliest of equal values). Tune also keeps the
latest checkpoint whatever its score, and a resume continues from that one. A resumed trial takes its running best
from the checkpoint it continues from.

Every report also says where and how the trial ran (Ray node id, node IP, hostname, and ``precision``: bf16
where ``amp`` found native bf16 on the trial's device, else float32), so the results table can show how trials
spread over a cluster.

A trial whose loss turns NaN/inf or explodes (``csl.train.Diverged``) does not raise, which would make Tune retry
a config that diverges deterministically: it reports one last result with ``diverged=1`` (and the exploded loss,
where it is finite) and returns. That report carries a checkpoint holding only ``csl_result.json``: the durable
record that the trial is over. Likewise a config that cannot train (a ``ValueError``, such as
``ChoiceError``/``CombinationError`` or a batch larger than the data, raised before the first epoch is reported)
fails the same way on every retry: it reports ``failed=1`` with the error and returns, so it fails at once.

A trial that had already ended when its driver died can come back from Tune's experiment snapshot as running or
even pending (Tune snapshots when trials checkpoint, not when they end, and copies the snapshot to storage in
the background). Such a trial must not train again: ``csl-search resume`` writes the trials MLflow holds as ended,
with their last results, to a JSON file named by ``$CSL_ENDED_TRIALS``; a trial found there (or restored from a
diverged record) repeats its last result and returns. The resumed driver adds to that file a new trial that
replays one Tune lost (``search.callback``), before the new trial starts: with the lost trial's last result when
it had ended, else with its last checkpoint, which the replay continues from.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from csl.best import NONE, Best, finite, improves
from search.status import EPOCH_METRICS

RESULT_FILE = "csl_result.json"  # the epoch's reported result, kept beside the trainer's state in a checkpoint
ENDED_ENV = "CSL_ENDED_TRIALS"  # path or URI of the ended-trials file: the last result of each trial that ended
# That file, in the experiment folder: written by resume, added to by the resumed driver. JSON Lines, one
# {"trial_id", "result"} per ended trial or {"trial_id", "checkpoint"} per replay that continues, and not named
# *.json: Tune copies the experiment folder's .json and .pkl files into its driver staging folder when it restores,
# then uploads that folder over the experiment folder at every snapshot, which would put back the stale copy of a
# .json file that the driver adds to during the search.
ENDED_FILE = "ended_trials.jsonl"
SCORE = "csl_checkpoint_score"  # what Tune keeps the best checkpoint by (module docstring)
BEST_EPOCH = "csl_best_epoch"  # the trial's best epoch so far (0: none yet), in every report with a checkpoint
BEST_VALUE = "csl_best_value"  # its value (NaN: none yet)


def _node(config: Mapping[str, Any]) -> dict[str, str]:
    import ray

    from csl.config import resolve
    from csl.train import pick_device, uses_bf16

    resolved = resolve(config)
    precision = "bf16" if uses_bf16(resolved, pick_device(resolved["device"])) else "float32"

    try:
        node_id = ray.get_runtime_context().get_node_id()
        node_ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - not inside Ray (a direct call in a debugger)
        node_id, node_ip = "", ""
    return {"node_id": node_id, "node_ip": node_ip, "hostname": socket.gethostname(), "precision": precision}


def ended_lines(ended: Mapping[str, Mapping[str, Any]]) -> str:
    """The ended-trials file's text for {Ray trial id: last result}."""
    return "".join(json.dumps({"trial_id": key, "result": dict(result)}) + "\n" for key, result in ended.items())


def _entries(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(entry, dict) and isinstance(entry.get("trial_id"), str):
            found.append(entry)
    return found


def parse_ended(text: str) -> dict[str, dict[str, Any]]:
    """{Ray trial id: last result} from the ended-trials file's text; a later line for a trial wins."""
    return {e["trial_id"]: e["result"] for e in _entries(text) if isinstance(e.get("result"), dict)}


def parse_continued(text: str) -> dict[str, str]:
    """{Ray trial id: checkpoint path or URI to continue from} from the ended-trials file's text."""
    return {e["trial_id"]: e["checkpoint"] for e in _entries(text) if isinstance(e.get("checkpoint"), str)}


def _handover_text() -> str:
    location = os.environ.get(ENDED_ENV)
    if not location:
        return ""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)
    try:
        with fs.open_input_stream(path) as f:
            return f.readall().decode()
    except FileNotFoundError:
        return ""


def ended_trials() -> dict[str, dict[str, Any]]:
    """{Ray trial id: last result} from the file ``$CSL_ENDED_TRIALS`` names (a path or a pyarrow URI)."""
    return parse_ended(_handover_text())


def continued_trials() -> dict[str, str]:
    """{Ray trial id: checkpoint to continue from} from the file ``$CSL_ENDED_TRIALS`` names."""
    return parse_continued(_handover_text())


def add_handover(filesystem: Any, path: str, trial_id: str, *, result: Mapping[str, Any] | None = None,
                 checkpoint: str | None = None) -> None:  # fmt: skip
    """Add one trial to the ended-trials file (``path`` on a pyarrow ``filesystem``), before that trial starts.

    The resumed driver calls this for a trial that replays one Tune lost (``search.callback``): with ``result``
    the replay repeats the lost trial's end instead of training again, with ``checkpoint`` it continues the lost
    trial's training from there. Read and written whole: object stores cannot append.
    """
    try:
        with filesystem.open_input_stream(path) as f:
            text = f.readall().decode()
    except FileNotFoundError:
        text = ""
    entry: dict[str, Any] = {"trial_id": trial_id}
    if result is not None:
        entry["result"] = dict(result)
    if checkpoint is not None:
        entry["checkpoint"] = checkpoint
    with filesystem.open_output_stream(path) as f:
        f.write((text + json.dumps(entry) + "\n").encode())


def checkpoint_folder(result: Mapping[str, Any], save_checkpoint: Callable[[Path], None] | None,
                      folder: str) -> Any:  # fmt: skip
    """A Tune checkpoint of ``folder``: the trainer's state (when ``save_checkpoint`` is given) and the result."""
    from ray import tune

    if save_checkpoint is not None:
        save_checkpoint(Path(folder))
    (Path(folder) / RESULT_FILE).write_text(json.dumps(dict(result)))  # NaN is written as NaN and read back
    return tune.Checkpoint.from_directory(folder)


def _failure(metric_names: set[str], epoch: int, node: Mapping[str, str], **fields: Any) -> dict[str, Any]:
    """A last result that ends a trial: every metric Tune was told about is present (NaN marks "none")."""
    final: dict[str, Any] = {name: math.nan for name in metric_names | set(EPOCH_METRICS)}
    final.update({"epoch": int(epoch), "diverged": 0, **fields, **node})
    return final


def running_best(result: Mapping[str, Any] | None) -> Best:
    """The running best a report carried (``BEST_EPOCH`` / ``BEST_VALUE``): what a resumed trial continues from."""
    result = result or {}
    epoch, value = result.get(BEST_EPOCH), result.get(BEST_VALUE)
    if isinstance(epoch, int) and epoch > 0 and finite(value):
        return Best(epoch, float(value))
    return NONE


def scored(result: dict[str, Any], best: Best, metric: str | None, mode: str | None) -> Best:
    """Add the running best and the checkpoint score to an epoch's ``result``; return the new running best."""
    epoch = int(result["epoch"])
    improved = metric is not None and mode is not None and improves(best, result.get(metric), mode)
    if improved:
        best = Best(epoch, float(result[metric]))
    result[SCORE] = float(epoch) if improved else 0.0
    result[BEST_EPOCH] = int(best.epoch or 0)
    result[BEST_VALUE] = float(best.value) if best.found else math.nan
    return best


def csl_trial(config: Mapping[str, Any], metric: str | None = None, mode: str | None = None,
              worker_resources: Mapping[str, float] | None = None) -> None:
    """Train one config, reporting ``epoch``, the trainer's metrics and a checkpoint after every epoch.

    ``metric`` / ``mode``: the search's, for the running best and the checkpoint score (``tune.with_parameters``).
    ``worker_resources``: given to a trial of several Ray Train workers (``search.train_trial``), each worker's.
    """
    from ray import tune

    from csl.train import Diverged, train

    node = _node(config)
    metric_names: set[str] = set()
    reports = 0
    last_epoch = 0
    best = NONE

    def report(epoch: int, metrics: Mapping[str, float], save_checkpoint: Callable[[Path], None]) -> None:
        nonlocal reports, last_epoch, best
        metric_names.update(metrics)
        # An epoch without evaluation (eval_every > 1) still carries every metric Tune checks for; NaN = none.
        result = {**{name: math.nan for name in EPOCH_METRICS}, **metrics, "epoch": int(epoch), "diverged": 0, **node}
        best = scored(result, best, metric, mode)
        with tempfile.TemporaryDirectory(prefix="csl-ckpt-") as folder:
            tune.report(result, checkpoint=checkpoint_folder(result, save_checkpoint, folder))
        reports += 1
        last_epoch = int(epoch)

    trial_id = tune.get_context().get_trial_id()
    ended = ended_trials().get(trial_id)
    if ended is not None:
        tune.report(ended)  # over already: say again how it ended, train nothing
        return
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and trial_id in continued_trials():
        checkpoint = tune.Checkpoint(continued_trials()[trial_id])  # the lost trial this one replays
    if worker_resources is not None:
        from search.train_trial import check_workers, multi_worker_trial

        try:
            check_workers(config)
        except ValueError as exc:  # the same on every retry: fail now, with the reason (as below)
            tune.report(_failure(set(), 0, node, failed=1, error=f"{type(exc).__name__}: {exc}"))
            return
        multi_worker_trial(config, node, worker_resources, metric=metric, mode=mode, start=checkpoint)
        return
    last = None
    try:
        if checkpoint is None:
            train(dict(config), callback=report)
            return
        with checkpoint.as_directory() as folder:
            saved = Path(folder) / RESULT_FILE
            last = json.loads(saved.read_text()) if saved.exists() else None
            if last is not None and (last.get("diverged") or last.get("failed")):
                tune.report({**last, **node})  # over already: say again how it ended, train nothing
                return
            last_epoch = int((last or {}).get("epoch") or 0)
            best = running_best(last)
            train(dict(config), callback=report, resume_from=folder)
        if reports == 0 and last is not None:
            # Resumed from the checkpoint of the last epoch: nothing left to train, so say again how it ended.
            tune.report({**last, **node})
    except Diverged as exc:
        # The epoch's metrics where they are finite (the exploded loss is kept: it is the record of the explosion).
        epoch_metrics = {k: v for k, v in exc.metrics.items() if isinstance(v, float) and math.isfinite(v)}
        final = _failure(metric_names, exc.epoch, node, diverged=1, error=str(exc), **epoch_metrics)
        # It carries a checkpoint (the record that the trial is over), never a best one: no trainer state in it.
        final.update({SCORE: 0.0, BEST_EPOCH: int(best.epoch or 0), BEST_VALUE: best.value if best.found else math.nan})
        with tempfile.TemporaryDirectory(prefix="csl-ckpt-") as folder:
            tune.report(final, checkpoint=checkpoint_folder(final, None, folder))
    except ValueError as exc:
        if reports:
            raise  # it trained before: not a config that cannot train, let Tune retry
        # Raised while the run was built (or before its first epoch ended): the same config fails the same way on
        # every retry, so the trial fails now, with the reason, and Tune does not retry it.
        tune.report(_failure(metric_names, last_epoch, node, failed=1, error=f"{type(exc).__name__}: {exc}"))
