"""A run's configuration: one flat record.

A config names one choice per aspect (``augment``, ``encoder``, ``extract``, ``similarity``, ``loss``) plus the
options of those choices and of the trainer, all at the top level, so an MLflow param or a search-space key is the
same word a user types on the command line. ``method`` names a preset (``csl.presets``) whose values fill what the
config leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from csl.data import STREAM_MODES
from csl.data.folder import LABEL_MODES
from csl.distributed import LR_SCALING, SYNC_BN
from csl.extract.heads import HEADS
from csl.registry import ASPECTS, ChoiceError

# Options of the trainer, evaluation and data, with defaults. Aspect options live in the builders' signatures.
TRAINER_DEFAULTS: dict[str, Any] = {
    "method": None,
    "data": "cifar10-mini",
    "data_root": None,
    "download": False,
    "labels": "auto",  # the SSL data's labels: auto (what it has) or none (read unlabelled; csl.data)
    # Parquet sets: on, streamed (encoded bytes in memory, batches decoded by DataLoader workers, on a GPU decoded
    # there); off, decoded whole into memory; auto, streamed when the decoded set would take over a quarter of the
    # memory available (csl.data.STREAM_SHARE). imagefolder: always streams; the torchvision sets never do.
    "data_stream": "auto",
    "train_limit": None,
    "test_limit": None,  # the evaluation queries: the test split of eval_data, else of data
    # A labelled set for kNN (its train split the bank, cut to eval_train_limit; its test split the queries, cut
    # to test_limit), resized to the training image size; None: data's own splits, when it has labels.
    "eval_data": None,
    "eval_train_limit": None,
    # SSL training images held out for the label-free metrics (csl.label_free), drawn once with a fixed seed (the
    # same images in every trial) and never trained on. None: min(1024, 1/40 of the training set), under 5% of
    # an epoch (benchmarks/bench_label_free.py); 0: no label-free metrics.
    "label_free_samples": None,
    "epochs": 10,
    "batch_size": 256,
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 1e-6,
    "sgd_momentum": 0.9,
    "adam_beta1": 0.9,  # Adam's and AdamW's betas and eps (csl.optim.build_optimizer)
    "adam_beta2": 0.999,
    "adam_eps": 1e-8,
    "warmup_epochs": 0,
    "target_momentum": None,
    "target_momentum_final": 1.0,
    "seed": 0,
    "device": "auto",
    "compile": False,
    "amp": True,  # bf16 autocast where the device computes bf16 natively: csl.train.native_bf16
    "channels_last": True,
    "encode_views": "joint",
    "knn_k": 200,
    "knn_temperature": 0.1,
    "probe": True,
    "probe_lr": 1e-3,
    "eval_every": 1,
    "diverge_factor": 1000.0,  # an epoch loss above this × the first step's is diverged (csl.train); 0: NaN/inf only
    # Several workers per run (csl.distributed; a search trains such a trial with Ray Train): batch_size is the
    # global batch, each worker trains on an equal shard of it. sync_bn: batch norm over the global batch
    # (auto: on, except for split batch norm, MoCo's per-worker statistics). lr_scaling: lr × B/ref (linear) or
    # × √(B/ref) (sqrt) for the global batch B, ref = lr_reference_batch; none: lr as given.
    "workers_per_trial": 1,
    "sync_bn": "auto",
    "lr_scaling": "none",
    "lr_reference_batch": 256,
}


# Options whose values are names, with the allowed ones, checked by resolve so that a space file naming a wrong one
# fails when it is loaded (csl.model.encode_views says what the two views options do; csl.extract.heads the heads).
OPTION_CHOICES: dict[str, tuple[str, ...]] = {"encode_views": ("joint", "separate"), "head": HEADS,
                                              "labels": LABEL_MODES, "data_stream": STREAM_MODES, "sync_bn": SYNC_BN,
                                              "lr_scaling": LR_SCALING}


MAX_EPOCHS = 100_000
"""The most epochs a run may train (a guard against a typo such as 1000000000000, which would run for ever)."""

# Numeric options with the range a run can train with: (lowest, highest or None). Checked by resolve, so that
# ``csl train`` and a space file (search.space, which also checks every value a dimension can take) share the rule.
OPTION_BOUNDS: dict[str, tuple[int, int | None]] = {
    "epochs": (1, MAX_EPOCHS),
    "batch_size": (1, None),
    "train_limit": (1, None),
    "test_limit": (1, None),
    "eval_every": (1, None),
    "warmup_epochs": (0, None),
    "knn_k": (1, None),
    "workers_per_trial": (1, None),
    "lr_reference_batch": (1, None),
}


def bounds_problem(option: str, value: object) -> str | None:
    """Why ``value`` is outside the range of ``option`` (``OPTION_BOUNDS``), or None when it is inside."""
    if option not in OPTION_BOUNDS or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = OPTION_BOUNDS[option]
    if value < low:
        return f"{option} must be at least {low}, got {value}"
    if high is not None and value > high:
        return f"{option} must be at most {high:,}, got {value}"
    return None


def known_options() -> set[str]:
    """Every key a config may hold: aspects, their choices' options, and the trainer's."""
    keys = set(TRAINER_DEFAULTS) | set(ASPECTS)
    for registry in ASPECTS.values():
        keys |= registry.all_options()
    return keys


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill a config from its preset and the trainer defaults, and reject what nothing would read."""
    from csl.presets import PRESETS

    unknown = sorted(set(config) - known_options())
    if unknown:
        raise ChoiceError(f"unknown option {', '.join(unknown)}; known options: {', '.join(sorted(known_options()))}")
    resolved: dict[str, Any] = dict(TRAINER_DEFAULTS)
    method = config.get("method")
    if method is not None:
        if method not in PRESETS:
            raise ChoiceError(f"unknown method '{method}'; choose one of: {', '.join(sorted(PRESETS))}")
        resolved.update(PRESETS[method])
    resolved.update({k: v for k, v in config.items() if v is not None})
    for option, allowed in OPTION_CHOICES.items():
        if option in resolved and resolved[option] not in allowed:
            raise ChoiceError(f"unknown {option} '{resolved[option]}'; choose one of: {', '.join(allowed)}")
    for option in OPTION_BOUNDS:
        problem = bounds_problem(option, resolved.get(option))
        if problem is not None:
            raise ChoiceError(problem)
    for aspect, registry in ASPECTS.items():
        if aspect not in resolved:
            raise ChoiceError(f"config names no {aspect}; give --method or --{aspect} ({', '.join(registry.names())})")
        registry.get(resolved[aspect])
    return resolved
