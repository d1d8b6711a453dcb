"""A trained encoder as a model a user can take away: images in, the embedding kNN evaluation reads out.

``Embedder`` is the encoder plus the evaluation view of ``csl.augment.pipelines.Pipeline.eval_view`` (resize to
the training image side, normalise by the training data's mean and std, cut into patches for CPC-style encoders),
so that nothing about how the encoder was trained has to be guessed to use it:

    input   float32 N×3×H×W, RGB, values in [0, 1] (uint8 0-255 is accepted too and divided by 255);
            H = W = ``image_size`` (other sides are resized to it, antialiased bilinear)
    output  float32 N×D: the encoder's pooled vector (the mean patch vector for patch encoders), D = ``dim``

A checkpoint of ``csl.train.Run`` (``state.pt``) holds what it needs: the model weights, the resolved config and
the data's image side, mean and std (``data_stats``). ``save`` / ``load`` write and read the plain, pickle-free
form: ``encoder.pt`` (the Embedder's ``state_dict``) and ``config.json`` (the resolved config and data stats, from
which ``csl.model.build_model`` builds the same modules).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from csl.augment import ops

WEIGHTS_FILE = "encoder.pt"
CONFIG_FILE = "config.json"
INPUT = "float32 N×3×H×W RGB in [0, 1], H = W = image_size (others are resized); output float32 N×D"


class Embedder(nn.Module):
    """Encoder + evaluation view: ``forward(images)`` is what kNN evaluation computes (module docstring)."""

    def __init__(self, encoder: nn.Module, *, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 patch_size: int | None = None, patch_stride: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.image_size = int(image_size)
        self.patch_size = patch_size
        self.patch_stride = patch_stride or patch_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    @property
    def dim(self) -> int:
        return int(self.encoder.vector_dim)

    def forward(self, images: Tensor) -> Tensor:
        from csl.model import encode

        view = ops.normalize(ops.resize(ops.to_float(images), self.image_size), self.mean, self.std)
        if self.patch_size is not None and self.patch_stride is not None:
            view = ops.patchify(view, self.patch_size, self.patch_stride)
        return encode(self.encoder, view).vector.float()


def data_stats(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """What a checkpoint keeps of its training data so that the encoder can be rebuilt without it."""
    return {"image_size": int(image_size), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _build(config: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[Any, nn.Module]:
    from csl.model import build_model

    return build_model(dict(config), image_size=int(stats["image_size"]), mean=tuple(stats["mean"]),
                       std=tuple(stats["std"]))  # fmt: skip


def _wrap(pipeline: Any, encoder: nn.Module) -> Embedder:
    embedder = Embedder(encoder, image_size=pipeline.image_size, mean=pipeline.mean, std=pipeline.std,
                        patch_size=pipeline.patch_size, patch_stride=pipeline.patch_stride)  # fmt: skip
    return embedder.eval()


def from_run(run: Any) -> Embedder:
    """The Embedder of a live ``csl.train.Run`` (its encoder itself, not a copy)."""
    return _wrap(run.pipeline, run.model.encoder)


def from_state(state: Mapping[str, Any]) -> Embedder:
    """The Embedder of a ``csl.train.Run`` checkpoint's state (``torch.load`` of ``state.pt``), on the CPU."""
    if "data_stats" not in state:
        raise ValueError("the checkpoint has no data_stats (made before they were kept): its encoder cannot be "
                         "rebuilt without its training data")  # fmt: skip
    import csl  # noqa: F401 - registers every choice

    pipeline, model = _build(state["config"], state["data_stats"])
    model.load_state_dict(state["model"])
    return _wrap(pipeline, model.encoder.float().to(memory_format=torch.contiguous_format).cpu())


def from_checkpoint(folder: str | Path) -> tuple[Embedder, dict[str, Any]]:
    """(Embedder, description for ``config.json``) of a checkpoint folder holding ``state.pt``."""
    from csl.train import CHECKPOINT_FILE

    state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return from_state(state), describe(state["config"], state["data_stats"], epoch=state.get("epoch"))


def describe(config: Mapping[str, Any], stats: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """``config.json``: the resolved config, the data stats and the input convention."""
    return {"config": dict(config), "data_stats": dict(stats), "input": INPUT, **extra}


def save(embedder: Embedder, description: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``encoder.pt`` (state_dict) and ``config.json`` into ``folder``; return the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(embedder.state_dict(), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(dict(description), indent=2, default=str))
    return out


def load(folder: str | Path) -> Embedder:
    """The Embedder that ``save`` wrote into ``folder`` (``encoder.pt`` + ``config.json``), in eval mode.

    ``folder`` may be an MLflow artifact URI (``runs:/<run id>/encoder``, what every trial of a search logs): it is
    downloaded from the tracking server that ``MLFLOW_TRACKING_URI`` / ``mlflow.set_tracking_uri`` names."""
    import csl  # noqa: F401 - registers every choice

    if "://" in str(folder) or str(folder).startswith("runs:/"):
        import mlflow.artifacts

        folder = mlflow.artifacts.download_artifacts(artifact_uri=str(folder))

    description = json.loads((Path(folder) / CONFIG_FILE).read_text())
    pipeline, model = _build(description["config"], description["data_stats"])
    embedder = _wrap(pipeline, model.encoder)
    embedder.load_state_dict(torch.load(Path(folder) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return embedder.eval()
