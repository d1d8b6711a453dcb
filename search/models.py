"""The best model of a trial and of a search: found in the trial's checkpoints, logged to MLflow, registered,
exported.

A trial's best epoch is ``search.best``'s, over the metric history its MLflow run holds; its checkpoint is the
trial's ``checkpoint_NNNNNN`` folder whose ``csl_result.json`` names that epoch and which holds the trainer's
state (Tune keeps it: ``search.trainable``'s checkpoint score). It is found by content, not by Tune's bookkeeping,
so a folder a resume gave back as a copy of a newer one (``search.recovery.restore_checkpoints``) is never taken
for it.

What a run holds:

- every trial's run, once the trial ended: ``encoder/encoder.pt`` + ``encoder/config.json``, the plain form
  (``csl.embedder.save``): the best epoch's weights as a ``state_dict`` and the resolved config that builds the
  modules; ``csl.embedder.load("runs:/<run id>/encoder")`` gives the model in one call;
- the search's best trial's run and the parent run, when the search ends: also ``model``, an MLflow PyTorch model
  in the ``pt2`` format (``torch.export``): ``mlflow.pytorch.load_model("runs:/<run id>/model")`` gives an
  ``nn.Module`` from images to the embedding kNN evaluation reads (``csl.embedder``: float32 N×3×S×S in [0, 1]
  in, float32 N×D out; the signature says the shapes). Chosen because it loads in one call with torch and MLflow
  alone, without this project's code or a pickle (MLflow 3.17 refuses to unpickle by default). Only for the best:
  exporting takes about 2 s of the driver's time per model (measured here on the CPU), the plain form 0.03 s, and a
  search of hundreds of trials would wait minutes for models nobody asked for;
- tags ``csl.model_epoch`` (the epoch the model is from) and, where none could be logged, ``csl.model_warning``.

``csl-search run --register-model NAME`` registers the parent's model as a version of ``NAME``;
``csl-search export RUN_OR_DIR --out DIR`` writes the plain form of a run's or an experiment folder's best model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from search import best, storage
from search.errors import UsageError
from search.status import MAX_TAG
from search.trainable import RESULT_FILE

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the MLflow model of a run: runs:/<run id>/model
ENCODER_DIR = "encoder"  # the plain form among a run's artifacts
EPOCH_TAG = "csl.model_epoch"
WARNING_TAG = "csl.model_warning"
STATE_FILE = "state.pt"  # csl.train.CHECKPOINT_FILE (not imported: that would import torch with search.models)


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_of_epoch(filesystem: Any, trial_folders: list[str], epoch: int) -> str | None:
    """The checkpoint folder (a path on ``filesystem``) holding the trainer's state at ``epoch``, else None."""
    import pyarrow.fs as pafs

    for trial_folder in trial_folders:
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(trial_folder, allow_not_found=True))
        except OSError:
            continue
        folders = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                          and i.base_name.startswith("checkpoint_")), reverse=True)  # fmt: skip
        for folder in folders:
            try:
                with filesystem.open_input_stream(f"{folder}/{RESULT_FILE}") as f:
                    result = json.loads(f.read().decode())
            except (OSError, ValueError):
                continue
            state = filesystem.get_file_info(f"{folder}/{STATE_FILE}")
            if result.get("epoch") == epoch and state.type == pafs.FileType.File:
                return folder
    return None


def _local(filesystem: Any, folder: str, scratch: str) -> str:
    """``folder`` as a local path: itself on a local filesystem, else a copy of its state in ``scratch``."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        return folder
    pafs.copy_files(f"{folder}/{STATE_FILE}", f"{scratch}/{STATE_FILE}", source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    return scratch


def embedder_at(filesystem: Any, trial_folders: list[str], epoch: int) -> tuple[Any, dict[str, Any]] | None:
    """(Embedder, config.json description) of a trial's checkpoint at ``epoch``; None when none holds it."""
    from csl.embedder import from_checkpoint

    folder = checkpoint_of_epoch(filesystem, trial_folders, epoch)
    if folder is None:
        return None
    with tempfile.TemporaryDirectory(prefix="csl-best-") as scratch:
        embedder, description = from_checkpoint(_local(filesystem, folder, scratch))
    description["checkpoint"] = folder
    return embedder, description


# ------------------------------------------------------------------------------------------------ MLflow


def log_plain(client: Any, run_id: str, embedder: Any, description: dict[str, Any]) -> None:
    """Log ``embedder``'s plain form to run ``run_id`` as ``encoder/`` and tag the epoch it is from."""
    from csl.embedder import save

    with tempfile.TemporaryDirectory(prefix="csl-encoder-") as folder:
        client.log_artifacts(run_id, str(save(embedder, description, folder)), ENCODER_DIR)
    client.set_tag(run_id, EPOCH_TAG, str(description.get("epoch")))


def log_model(tracking_uri: str, run_id: str, embedder: Any, description: dict[str, Any], *,
              register: str | None = None) -> Any:  # fmt: skip
    """Log ``embedder`` to run ``run_id`` as ``model`` (pt2, with a signature) and its plain form as ``encoder/``;
    with ``register``, also a new version of that registered model. Returns MLflow's ``ModelInfo``."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import Schema, TensorSpec

    from csl.embedder import INPUT

    side = embedder.image_size
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, side, side), "images")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedder.dim), "embedding")]))
    # Two images (a batch of 1 would export a fixed batch size), fixed so that every logged model is the same.
    example = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)).numpy()
    epoch = description.get("epoch")
    client = MlflowClient(tracking_uri)
    # Made here in the run's experiment: log_model would put it in the active experiment (Default, with its
    # artifacts under ./mlruns), where runs:/<run id>/model does not look.
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=MODEL_NAME,
                                       source_run_id=run_id, model_type="csl-encoder")  # fmt: skip
    with _use_tracking_uri(tracking_uri), torch.no_grad():
        info = mlflow.pytorch.log_model(
            embedder, name=MODEL_NAME, run_id=run_id, model_id=model.model_id, signature=signature,
            input_example=example, serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"input": INPUT, "epoch": epoch, "trial_config": description["config"]},
            registered_model_name=register, validate_serving_input=False, await_registration_for=30,
        )  # fmt: skip
    log_plain(client, run_id, embedder, description)
    return info


def warn(client: Any, run_id: str, message: str) -> None:
    log.warning("MLflow run %s: %s", run_id, message)
    client.set_tag(run_id, WARNING_TAG, message[:MAX_TAG])


def trial_best(client: Any, run_id: str, metric: str, mode: str) -> best.Best:
    """A trial's best epoch over the history its MLflow run holds (``search.best``)."""
    return best.best_of(((m.step, m.value) for m in client.get_metric_history(run_id, metric)), mode)


def log_trial_model(client: Any, tracking_uri: str, run_id: str, *, filesystem: Any, trial_folders: list[str],
                    metric: str, mode: str) -> bool:  # fmt: skip
    """Log a trial's best model, in the plain form, to its run (module docstring); False, with
    ``csl.model_warning``, when it has none.

    Never raises: a model that cannot be logged must not end the search.
    """
    try:
        found = trial_best(client, run_id, metric, mode)
        if not found.found:
            warn(client, run_id, f"no best epoch (no finite {metric}): no model logged")
            return False
        built = embedder_at(filesystem, trial_folders, int(found.epoch))
        if built is None:
            warn(client, run_id, f"no checkpoint of the best epoch {found.epoch} holds the trainer's state: no model "
                                 "logged")  # fmt: skip
            return False
        embedder, description = built
        description.update(metric=metric, mode=mode, value=found.value)
        log_plain(client, run_id, embedder, description)
        return True
    except Exception as exc:  # noqa: BLE001 - the search goes on; the run says why it has no model
        log.exception("could not log the model of MLflow run %s", run_id)
        try:
            warn(client, run_id, f"the model could not be logged: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            pass
        return False


def log_search_model(tracking_uri: str, parent_run_id: str, best_run_id: str | None, *,
                     register: str | None = None) -> str:  # fmt: skip
    """Log the best trial's model (from its run's plain form) as an MLflow model on its run and on the parent run,
    the parent's registered as ``register`` if given; one line saying where it is, or why there is none. Never
    raises."""
    from mlflow import MlflowClient

    from csl.embedder import load

    client = MlflowClient(tracking_uri)
    try:
        if best_run_id is None:
            warn(client, parent_run_id, "the search has no best trial: no model logged")
            return "best model: none (no trial has a best value)"
        with tempfile.TemporaryDirectory(prefix="csl-best-") as folder:
            try:
                local = client.download_artifacts(best_run_id, ENCODER_DIR, folder)
            except Exception:  # noqa: BLE001 - not there: the trial logged none
                message = f"the best trial's run {best_run_id} holds no model (see its {WARNING_TAG} tag)"
                warn(client, parent_run_id, message)
                return f"best model: none ({message})"
            description = json.loads((Path(local) / "config.json").read_text())
            embedder = load(local)
            if not has_model(client, best_run_id):  # a resume may end on the same best trial
                log_model(tracking_uri, best_run_id, embedder, description)
            info = log_model(tracking_uri, parent_run_id, embedder, description, register=register)
        line = f"best model: runs:/{parent_run_id}/{MODEL_NAME} (mlflow.pytorch.load_model)"
        if register:
            version = getattr(info, "registered_model_version", None)
            line += f", registered as {register} version {version}"
        return line
    except Exception as exc:  # noqa: BLE001 - every result of the search is kept; the parent says why
        log.exception("could not log the search's best model on MLflow run %s", parent_run_id)
        message = f"the best model could not be logged: {type(exc).__name__}: {exc}"
        try:
            warn(client, parent_run_id, message)
        except Exception:  # noqa: BLE001
            pass
        return f"best model: none ({message})"


def has_model(client: Any, run_id: str) -> bool:
    """Whether run ``run_id`` has an MLflow model (MLflow 3 keeps logged models beside runs, not among their
    artifacts)."""
    experiment = client.get_run(run_id).info.experiment_id
    return bool(client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'",
                                            max_results=1))  # fmt: skip


# ------------------------------------------------------------------------------------------------ export


def _from_folder(path: str, out: Path) -> str:
    import pyarrow.parquet as pq

    from csl.embedder import save
    from search.results import best_trial
    from search.run import STATE_FILE as SEARCH_STATE

    state = json.loads(storage.read_text(storage.join(path, SEARCH_STATE)))
    results = storage.join(path, "results.parquet")
    if not storage.exists(results):
        raise UsageError(f"{path}: no results.parquet (the search has not ended); allowed: a folder of a search that "
                         "ended, or an MLflow run id")  # fmt: skip
    fs, base = storage.filesystem(results)
    rows = pq.read_table(base, filesystem=fs).to_pylist()
    found = best_trial(rows, state["metric"], state["mode"])
    if found is None:
        raise UsageError(f"{results}: no trial has a best {state['metric']}; there is no best model to export")
    fs, folder = storage.filesystem(path)
    built = embedder_at(fs, [f"{folder}/csl_trial_{found.trial_id}", *_replayed(path, found.trial_id)], found.epoch)
    if built is None:
        raise UsageError(f"{path}: trial {found.trial_id}: no checkpoint of its best epoch {found.epoch} is left")
    embedder, description = built
    description.update(metric=found.metric, mode=state["mode"], value=found.value, trial_id=found.trial_id)
    save(embedder, description, out)
    return f"trial {found.trial_id}, epoch {found.epoch}"


def _replayed(path: str, trial_id: str) -> list[str]:
    """Trial folders of the trials ``trial_id`` replays (a resumed search: ``search.ledger``), newest first."""
    from search.ledger import Ledger

    fs, folder = storage.filesystem(path)
    return [f"{folder}/csl_trial_{lost}" for lost in Ledger(path).replayed(trial_id)]


def _from_run(client: Any, target: str, out: Path) -> str:
    run_id = target.removeprefix("runs:/").split("/", 1)[0]
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - any failure: the store does not hold it
        raise UsageError(f"RUN_OR_DIR {target}: neither an experiment folder nor an MLflow run in "
                         f"{client.tracking_uri}; allowed: a csl-search experiment folder, a run id, "
                         "runs:/<id>") from None
    tags = run.data.tags
    if "mlflow.parentRunId" not in tags and "csl.best_run_id" in tags:
        run_id = tags["csl.best_run_id"]  # a search: its best trial
    try:
        local = client.download_artifacts(run_id, ENCODER_DIR, str(out))
    except Exception:  # noqa: BLE001
        why = tags.get(WARNING_TAG) or "it holds no encoder/ artifacts"
        raise UsageError(f"RUN_OR_DIR {target}: MLflow run {run_id} has no model: {why}") from None
    # download_artifacts puts them in out/encoder/: move them up into out
    for file in Path(local).iterdir():
        file.replace(out / file.name)
    Path(local).rmdir()
    epoch = client.get_run(run_id).data.tags.get(EPOCH_TAG, "?")
    return f"MLflow run {run_id}, epoch {epoch}"


def export(target: str, out: str, *, tracking_uri: str | None) -> str:
    """Write the best encoder of ``target`` (an experiment folder, or an MLflow run id / ``runs:/`` URI: a parent
    run means its best trial) into ``out`` as ``encoder.pt`` + ``config.json``; the line to print."""
    from csl.embedder import CONFIG_FILE, WEIGHTS_FILE

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = storage.normalise(target)
    if storage.exists(storage.join(path, "csl_search.json")):
        source = _from_folder(path, folder)
    elif Path(target).exists():
        raise UsageError(f"RUN_OR_DIR {target}: not a csl-search experiment folder (no csl_search.json)")
    else:
        if tracking_uri is None:
            raise UsageError(f"RUN_OR_DIR {target}: an MLflow run needs --mlflow-uri (or the --storage of its search)")
        from mlflow import MlflowClient

        source = _from_run(MlflowClient(tracking_uri), target, folder)
    return (f"wrote {folder / WEIGHTS_FILE} (state_dict) and {folder / CONFIG_FILE} ({source}); load: "
            f"python -c \"import csl.embedder; model = csl.embedder.load('{folder}')\"")
