"""Training: a plain PyTorch loop that knows nothing about search.

``train(config, callback=...)`` runs epochs and calls ``callback(epoch, metrics, save_checkpoint)`` after each;
the search's trainable passes a callback that calls ``tune.report``. ``Run`` holds one run's state so tests and
studies can step it, checkpoint it and resume it exactly.

The step follows airbench's data path: the dataset is uint8 on the device, batches are drawn by indexing with a
device permutation, augmentation is batched with per-sample parameters, and nothing synchronises with the host
inside an epoch (the loss is accumulated on the device and read once at the end).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csl import data as datasets
from csl.config import resolve
from csl.distributed import (data_parallel, gather, global_batchnorm, scaled_lr, shard, wants_global_bn,
                             worker_bn_splits, world)
from csl.embedder import data_stats
from csl.evaluate import extract_features, knn_accuracy, label_free_features, probe_accuracy
from csl.label_free import label_free_metrics
from csl.metrics import METRICS, unmeasured
from csl.model import build_model, target_momentum
from csl.optim import build_optimizer, lr_factor

EpochCallback = Callable[[int, dict[str, float], Callable[[str | Path], None]], None]
CHECKPOINT_FILE = "state.pt"
AUGMENT_SEED_STRIDE = 1_000_003  # worker r of several draws its views from seed + stride·(r + 1)
LABEL_FREE_SEED = 0
"""Seed of the held-out images' choice and of their augmented views: fixed, not the run's ``seed``, so that every
trial of a search is measured on the same images and views."""
LABEL_FREE_AUTO = (1024, 40)
"""``label_free_samples: None``: at most this many images and this fraction (1/40) of the training set."""


class Diverged(RuntimeError):
    """The SSL loss became NaN or infinite, or exploded past its bound; retrying the same config would diverge again.

    ``metrics``: the epoch's training metrics (``ssl_loss`` as it was, ``images_per_s``, ``epoch_time``).
    """

    def __init__(self, epoch: int, loss: float, *, bound: float | None = None,
                 metrics: Mapping[str, float] | None = None) -> None:  # fmt: skip
        why = f" (above {bound:.4g}: diverge_factor times the first step's loss)" if bound is not None else ""
        super().__init__(f"loss diverged to {loss:.4g} in epoch {epoch}{why}")
        self.epoch = epoch
        self.loss = loss
        self.metrics = dict(metrics or {"ssl_loss": loss})


class CheckpointError(ValueError):
    """A checkpoint that cannot be continued from: missing, damaged, or made by another configuration."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def divergence_bound(config: Mapping[str, Any], initial_loss: float | None) -> float | None:
    """The loss above which a run has diverged: ``diverge_factor`` × the first step's loss (at least 1).

    Losses start near their chance level (InfoNCE at log of the candidates, BYOL's at 2) and fall; an epoch whose
    mean loss is a thousand times that has exploded even when it is still finite (an lr of 1e4 with dot-product
    scores reaches 1e18). ``diverge_factor: 0`` keeps only the NaN/inf check.
    """
    factor = float(config["diverge_factor"])
    if factor <= 0 or initial_loss is None or not math.isfinite(initial_loss):
        return None
    return factor * max(abs(initial_loss), 1.0)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: GPUs with bf16 units, and CPUs with AMX (Intel Sapphire Rapids on).

    Elsewhere (laptops, older Xeons, AVX2 machines) bf16 convolutions are emulated and slower than float32, so
    ``amp`` leaves them alone. Measured on a 2-core AMX Xeon, ResNet-18 at width 1/4, batch 128-256: the SimCLR
    step 1.5x faster, AMDIM/BYOL/MoCo/YADIM 1.3-1.5x, evaluation 2x, the first step no slower.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, but the check oneDNN itself relies on
        return bool(amx and amx())
    return False


def uses_bf16(config: Mapping[str, Any], device: torch.device) -> bool:
    """What ``amp`` does for a run of ``config`` on ``device``: bf16 autocast, or float32."""
    return bool(config["amp"]) and native_bf16(device)


@functools.lru_cache(maxsize=8)
def _load_cached(spec: str, split: str, root: str | None, download: bool, limit: int | None,
                 labels: str = "auto", stream: str = "auto") -> Any:
    """Decode a dataset once per process: a search worker reused across trials (reuse_actors) decodes it once."""
    return datasets.load(spec, split=split, root=root, download=download, limit=limit, labels=labels, stream=stream)


def load_data(config: Mapping[str, Any]) -> tuple[Any, Any | None]:
    """The SSL training set, and the data's test split where evaluation reads it (labelled data, no eval_data)."""
    spec, root, download = config["data"], config.get("data_root"), bool(config.get("download"))
    labels, stream = config.get("labels", "auto"), config.get("data_stream", "auto")
    train_split = "train+unlabeled" if spec == "stl10" else "train"
    train = _load_cached(spec, train_split, root, download, config.get("train_limit"), labels, stream)
    if config.get("eval_data") or not datasets.is_labelled(train):
        return train, None
    return train, _load_cached(spec, "test", root, download, config.get("test_limit"), labels, stream)


def load_eval_data(config: Mapping[str, Any]) -> tuple[Any, Any]:
    """``eval_data``'s train split (the kNN bank, cut to ``eval_train_limit``) and test split (cut to test_limit)."""
    spec, root, download = config["eval_data"], config.get("data_root"), bool(config.get("download"))
    stream = config.get("data_stream", "auto")
    bank = _load_cached(spec, "train", root, download, config.get("eval_train_limit"), "auto", stream)
    if not datasets.is_labelled(bank):
        raise ValueError(f"eval_data '{spec}' has no labels; name a labelled set (kNN reads its labels)")
    return bank, _load_cached(spec, "test", root, download, config.get("test_limit"), "auto", stream)


def hold_out(data: Any, size: int) -> tuple[Any, Any | None]:
    """(the training set without ``size`` images, those images or None): a choice fixed by ``LABEL_FREE_SEED``."""
    if size == 0:
        return data, None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(LABEL_FREE_SEED))
    return data.subset(order[size:].sort().values), data.subset(order[:size].sort().values)


def label_free_size(config: Mapping[str, Any], n: int) -> int:
    """How many of the ``n`` training images ``label_free_samples`` holds out (None: ``LABEL_FREE_AUTO``)."""
    size = config.get("label_free_samples")
    if size is None:
        auto = min(LABEL_FREE_AUTO[0], n // LABEL_FREE_AUTO[1])
        return auto if auto >= 2 else 0
    if isinstance(size, bool) or not isinstance(size, int) or size == 1 or size < 0:
        raise ValueError(f"label_free_samples must be 0 (no label-free metrics), an int >= 2 or None (auto), "
                         f"got {size!r}")
    if size >= n:
        raise ValueError(f"label_free_samples {size} holds out the whole training set ({n} images); "
                         f"lower it or raise train_limit")
    return size


def image_size(data: Any) -> int:
    size = getattr(data, "image_size", None)
    return int(size) if size else int(data.images.shape[-1])


def _on(data: Any, device: torch.device) -> Any:
    return data.to(device) if data is not None and hasattr(data, "to") else data


def _chosen(metric: str, config: Mapping[str, Any]) -> bool:
    """Whether the config itself turned ``metric`` off (nothing to tell the user then)."""
    if metric == "probe_acc":
        return not config["probe"]
    return METRICS[metric].held_out and config["label_free_samples"] == 0


class Run:
    """One training run: model, optimiser, probe, RNG and position in the schedule.

    Data: ``train_data`` (the SSL training set, without ``label_free_data``, the images held out for the label-free
    metrics), ``eval_train`` and ``test_data`` (kNN's bank and queries: ``eval_data``'s splits, else the SSL
    data's; None where kNN is not measured). ``unmeasured``: the metrics this run does not report, and why.
    """

    def __init__(self, config: Mapping[str, Any], *, data: tuple[Any, Any] | None = None) -> None:
        self.config = resolve(config)
        cfg = self.config
        torch.manual_seed(cfg["seed"])
        self.device = pick_device(cfg["device"])
        # Several workers (csl.distributed): each trains on its shard of every global batch, with views drawn by its
        # own generator; the batch order comes from the run's generator, the same on every worker, and each worker
        # reads (a stream: decodes) only its rows of each batch.
        self.rank, self.workers = world()
        self.shard: tuple[int, int] | None = None
        if self.workers > 1:
            shard(cfg["batch_size"], self.rank, self.workers)  # the batch splits into equal shards, or say why not
            self.shard = (self.rank, self.workers)
        train_data, test_data = data if data is not None else load_data(cfg)
        self._set_data(train_data, test_data)
        mean, std = self.train_data.mean_std()
        # kept in every checkpoint: what rebuilds the encoder's evaluation view without the data (csl.embedder)
        self.data_stats = data_stats(image_size(self.train_data), mean, std)
        self.pipeline, self.model = build_model(self._per_worker(cfg), image_size=image_size(self.train_data),
                                                mean=mean, std=std)
        if self.workers > 1 and wants_global_bn(cfg["sync_bn"], self.model):
            global_batchnorm(self.model, self.device)  # before the optimiser: it makes new parameters
        self.on_cuda = self.device.type == "cuda"
        self.autocast = uses_bf16(cfg, self.device)
        # channels_last pays on the CPU too (oneDNN's NHWC convolutions: 1.5x per step measured here at width 1/4).
        self.channels_last = bool(cfg["channels_last"])
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Classes of the evaluation set (kNN, linear evaluation); the probe exists only where it is measured.
        self.num_classes = (self.train_data if self.eval_train is None else self.eval_train).num_classes
        self.probe: nn.Linear | None = None
        self.probe_optimizer: torch.optim.Adam | None = None
        if "probe_acc" not in self.unmeasured:
            self.probe = nn.Linear(self.model.encoder.vector_dim, self.train_data.num_classes).to(self.device)
            self.probe_optimizer = torch.optim.Adam(self.probe.parameters(), lr=cfg["probe_lr"])
        self.optimizer = build_optimizer(cfg["optimizer"], self.model, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                         sgd_momentum=cfg["sgd_momentum"], fused=self.on_cuda,
                                         adam_betas=(cfg["adam_beta1"], cfg["adam_beta2"]), adam_eps=cfg["adam_eps"])
        self.generator = torch.Generator(device=self.device).manual_seed(cfg["seed"])
        self.augment_generator = self.generator
        if self.workers > 1:
            self.augment_generator = torch.Generator(device=self.device).manual_seed(cfg["seed"] + AUGMENT_SEED_STRIDE
                                                                                     * (self.rank + 1))
        self.steps_per_epoch = len(self.train_data) // cfg["batch_size"]
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        self.warmup_steps = min(cfg["warmup_epochs"], cfg["epochs"]) * self.steps_per_epoch
        self.epoch = 0
        self.step = 0
        self.forward = data_parallel(self.model, self.device) if self.workers > 1 else self.model
        if cfg["compile"]:
            self.forward = torch.compile(self.forward)
            self.pipeline.compile(self.device)
        self.last_eval: dict[str, float] = {}
        self.initial_loss: float | None = None  # the run's first step's loss: what divergence is measured against

    def _set_data(self, train_data: Any, test_data: Any | None) -> None:
        """Hold out the label-free images, pick kNN's bank and queries, check the sizes, say what is not measured."""
        cfg = self.config
        labelled = datasets.is_labelled(train_data)
        # What this run does not measure, and why (csl.metrics: the one rule, also the search validator's)
        self.unmeasured = unmeasured(cfg, labelled=labelled)
        held = label_free_size(cfg, len(train_data))
        if held == 0 and cfg["label_free_samples"] is None:
            self.unmeasured |= {m.name: f"the training set ({len(train_data)} images) is too small to hold out "
                                "images for them; set label_free_samples" for m in METRICS.values() if m.held_out}
        train_data, label_free_data = hold_out(train_data, held)
        # The kNN bank and queries: eval_data's splits, else the SSL data's own (None: kNN not measured)
        eval_train: Any = None
        if cfg["eval_data"]:
            eval_train, test_data = load_eval_data(cfg)
        elif "knn_acc" in self.unmeasured:
            test_data = None
        else:
            eval_train = train_data
        self.train_data = _on(train_data, self.device)
        self.label_free_data = _on(label_free_data, self.device)
        self.eval_train = self.train_data if eval_train is train_data else _on(eval_train, self.device)
        self.test_data = _on(test_data, self.device)
        if len(self.train_data) < cfg["batch_size"]:
            held_text = f" after {held} held out for the label-free metrics" if held else ""
            raise ValueError(f"batch_size {cfg['batch_size']} is larger than the training set "
                             f"({len(self.train_data)} images{held_text}): lower batch_size or raise train_limit"
                             + (" or lower label_free_samples" if held else ""))
        by_reason: dict[str, list[str]] = {}
        for metric, why in self.unmeasured.items():
            if not _chosen(metric, cfg):
                by_reason.setdefault(why, []).append(metric)
        if by_reason:
            reasons = "; ".join(f"{', '.join(metrics)} ({why})" for why, metrics in by_reason.items())
            print(f"csl: not measured in this run: {reasons}", file=sys.stderr, flush=True)

    def _per_worker(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The config a worker builds its model from: split batch norm keeps its sub-batch size (MoCo's per-GPU
        batch norm), so each of W workers splits its shard into bn_splits / W parts."""
        splits = int(cfg.get("bn_splits") or 1)
        if self.workers == 1 or splits == 1:
            return dict(cfg)
        return {**cfg, "bn_splits": worker_bn_splits(splits, self.workers),
                "batch_size": cfg["batch_size"] // self.workers}

    def _set_lr(self) -> None:
        factor = lr_factor(self.step, self.total_steps, self.warmup_steps)
        cfg = self.config
        base = scaled_lr(cfg["lr"], cfg["batch_size"], cfg["lr_scaling"], cfg["lr_reference_batch"])
        for group in self.optimizer.param_groups:
            group["lr"] = base * factor

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimisation step on this worker's images (of several workers: its shard of the global batch, as
        ``batches(..., shard=self.shard)`` reads it); returns the loss as a device tensor (no host synchronisation)."""
        self._set_lr()
        view_a, view_b = self.pipeline(images, self.augment_generator)
        if self.channels_last and view_a.dim() == 4:
            view_a = view_a.contiguous(memory_format=torch.channels_last)
            view_b = view_b.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, vectors = self.forward(view_a, view_b)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.model.target is not None:
            self.model.update_target(target_momentum(self.config, self.step / max(1, self.total_steps)))
        if self.probe is not None and self.probe_optimizer is not None:
            # Unlabelled images (label −1, STL-10's unlabeled split) are ignored by masking, not by indexing,
            # which would synchronise with the host.
            vectors = gather(vectors.detach())  # every worker trains the same probe on the global batch
            labels = gather(labels)
            per_image = F.cross_entropy(self.probe(vectors.float()), labels, ignore_index=-1, reduction="none")
            probe_loss = per_image.sum() / (labels >= 0).sum().clamp(min=1)
            self.probe_optimizer.zero_grad(set_to_none=True)
            probe_loss.backward()
            self.probe_optimizer.step()
        self.step += 1
        return loss.detach()

    def train_epoch(self, progress: Callable[[int], object] | None = None) -> dict[str, float]:
        """One pass over the training set; ``progress(n)`` is told of every n images done (a progress bar)."""
        self.model.train()
        if self.on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        total = torch.zeros((), device=self.device)
        seen = 0
        for images, labels in self.train_data.batches(self.config["batch_size"], self.generator, shard=self.shard):
            step_loss = self.train_step(images.to(self.device, non_blocking=True), labels.to(self.device))
            if self.initial_loss is None:
                self.initial_loss = float(step_loss)  # once per run: the only synchronisation inside an epoch
            total += step_loss
            seen += images.shape[0] * self.workers  # the global batch: each worker read its shard of it
            if progress is not None:
                progress(images.shape[0] * self.workers)
        loss = float(total) / max(1, self.steps_per_epoch)  # the epoch's one synchronisation
        elapsed = time.perf_counter() - start
        self.epoch += 1
        metrics = {"ssl_loss": loss, "images_per_s": seen / elapsed, "epoch_time": elapsed}
        if not math.isfinite(loss):
            raise Diverged(self.epoch, loss, metrics=metrics)
        bound = divergence_bound(self.config, self.initial_loss)
        if bound is not None and abs(loss) > bound:
            raise Diverged(self.epoch, loss, bound=bound, metrics=metrics)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Every metric this run measures (``csl.metrics``); those in ``unmeasured`` are absent, never faked.

        Of several workers the first evaluates, over the whole evaluation set; the others measure nothing."""
        metrics: dict[str, float] = {}
        if self.rank > 0:
            return metrics
        if self.test_data is not None:
            metrics.update(self.evaluate_labels())
        if self.label_free_data is not None:
            metrics.update(self.evaluate_label_free())
        self.last_eval = metrics
        return metrics

    def evaluate_labels(self) -> dict[str, float]:
        """kNN accuracy (bank ``eval_train``, queries ``test_data``) and, where it exists, the probe's."""
        batch = max(256, self.config["batch_size"])
        train_x, train_y = extract_features(self.model, self.pipeline, self.eval_train, batch_size=batch,
                                            device=self.device, autocast=self.autocast)
        test_x, test_y = extract_features(self.model, self.pipeline, self.test_data, batch_size=batch,
                                          device=self.device, autocast=self.autocast)
        metrics = {"knn_acc": knn_accuracy(train_x, train_y, test_x, test_y, k=self.config["knn_k"],
                                           temperature=self.config["knn_temperature"], num_classes=self.num_classes)}
        if self.probe is not None:
            metrics["probe_acc"] = probe_accuracy(self.probe, test_x, test_y)
        return metrics

    def evaluate_label_free(self) -> dict[str, float]:
        """The label-free metrics of the held-out images (``csl.label_free``), on the same views every epoch."""
        clean, view_a, view_b = label_free_features(
            self.model, self.pipeline, self.label_free_data, seed=LABEL_FREE_SEED,
            batch_size=max(256, self.config["batch_size"]), device=self.device, autocast=self.autocast)
        return label_free_metrics(clean, view_a, view_b)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "probe_optimizer": self.probe_optimizer.state_dict() if self.probe_optimizer is not None else None,
            "generator": self.generator.get_state(),
            "augment_generators": self._augment_states(),
            "torch_rng": torch.get_rng_state(),
            # the device's default generator: what draws without the run's generator use (AMDIM's anchor picks)
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.on_cuda else None,
            "epoch": self.epoch,
            "step": self.step,
            "last_eval": dict(self.last_eval),
            "initial_loss": self.initial_loss,
            "config": {k: v for k, v in self.config.items()},
            "data_stats": dict(self.data_stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.probe is not None and self.probe_optimizer is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
            self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        # RNG states are CPU byte tensors; torch.load(map_location=cuda) moves them to the GPU, where set_state
        # refuses them
        self.generator.set_state(state["generator"].cpu())
        views = state.get("augment_generators")  # one per worker; absent from checkpoints made before workers
        if self.workers > 1 and views is not None and len(views) == self.workers:
            self.augment_generator.set_state(views[self.rank].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.on_cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.last_eval = dict(state["last_eval"])
        self.initial_loss = state.get("initial_loss")  # absent from checkpoints made before it was kept

    def _augment_states(self) -> list[Tensor] | None:
        """Every worker's view generator state (a collective: every worker calls it), None for one worker."""
        if self.workers == 1:
            return None
        states: list[Any] = [None] * self.workers
        torch.distributed.all_gather_object(states, self.augment_generator.get_state())
        return states

    def save(self, directory: str | Path) -> Path:
        """Write the state beside the checkpoint, then rename it over: a kill or Ctrl-C while it is written
        leaves the last epoch's checkpoint whole. Of several workers every one calls it and the first writes."""
        state = self.state_dict()
        path = Path(directory)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            partial = path / f".{CHECKPOINT_FILE}.partial"
            torch.save(state, partial)
            partial.replace(path / CHECKPOINT_FILE)
        return path / CHECKPOINT_FILE

    def load(self, directory: str | Path) -> None:
        """Continue from a checkpoint folder; a missing, damaged or foreign one is a ``CheckpointError``."""
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no checkpoint there (a --checkpoint folder holds {CHECKPOINT_FILE})")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, empty or not a torch file: all mean "damaged"
            raise CheckpointError(f"{path}: damaged checkpoint ({type(exc).__name__}: {_first_line(exc)})") from exc
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: a checkpoint of another configuration ({_first_line(exc)})") from exc


def train(config: Mapping[str, Any], *, callback: EpochCallback | None = None,
          resume_from: str | Path | None = None, data: tuple[Any, Any] | None = None) -> dict[str, float]:
    """Train for ``config['epochs']`` epochs (counted from the checkpoint when resuming); return the last metrics."""
    run = Run(config, data=data)
    if resume_from is not None:
        run.load(resume_from)
    metrics: dict[str, float] = {}
    every = max(1, int(run.config["eval_every"]))
    while run.epoch < run.config["epochs"]:
        metrics = run.train_epoch()
        if run.epoch % every == 0 or run.epoch == run.config["epochs"]:
            run.evaluate()
        metrics.update(run.last_eval)
        metrics["epoch"] = run.epoch
        if callback is not None:
            callback(run.epoch, dict(metrics), run.save)
    return metrics
