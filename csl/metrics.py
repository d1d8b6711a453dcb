"""The metrics a run reports after each epoch: their names, which way is better, and which need labels.

One table, read by the trainer (what it reports), the search (``search.status.EPOCH_METRICS``: what MLflow, the
history table and results.parquet carry), and the space validator (what a space may name as its ``metric``:
``check_metric``). A new metric is one line here and the code in ``csl`` that computes it.

``ssl_loss`` is the self-supervised objective of the epoch (mean over its steps); it is not called ``loss`` so that
no metric shares a name with the ``loss`` aspect in MLflow's params, the tables and a join of them.

Label metrics (kNN, the probe) need a labelled evaluation set; the label-free ones (``csl.label_free``) are
measured on images held out of the SSL training set (``label_free_samples``). ``unmeasured`` says which metrics a
config's runs do not report and why: the trainer skips those, and ``check_metric`` refuses a search on one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csl.registry import ChoiceError


@dataclass(frozen=True)
class Metric:
    """A per-epoch metric: ``mode`` is the direction a search would optimise it in (``max`` or ``min``);
    ``labels``: whether computing it needs labelled data; ``held_out``: measured on the held-out SSL images."""

    name: str
    mode: str
    labels: bool
    description: str
    held_out: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ssl_loss", "min", False, "the self-supervised loss, mean over the epoch's steps (nats)"),
        Metric("knn_acc", "max", True, "weighted kNN accuracy on the evaluation split (fraction)"),
        Metric("probe_acc", "max", True, "online linear-probe accuracy on the evaluation split (fraction)"),
        Metric("rankme", "max", False, "RankMe, the effective rank of the held-out images' representations "
               "(1 to min(N, D))", held_out=True),
        Metric("alpha_req", "min", False, "α-ReQ, the power-law decay of the held-out representations' "
               "eigenspectrum (a diagnostic: search on alpha_req_gap)", held_out=True),
        Metric("alpha_req_gap", "min", False, "|α − 1|: α-ReQ's distance from the 1/n spectrum", held_out=True),
        Metric("alignment", "min", False, "mean squared distance of two augmented views' normalised "
               "representations, held-out images (0 to 4)", held_out=True),
        Metric("uniformity", "min", False, "log mean exp(−2 d²) over pairs of held-out images' normalised "
               "representations (−4 to 0)", held_out=True),
        Metric("images_per_s", "max", False, "training throughput of the epoch (images/s)"),
        Metric("epoch_time", "min", False, "wall-clock time of the epoch's training steps (s)"),
    )
}

EPOCH_METRICS: tuple[str, ...] = tuple(METRICS)
LABEL_FREE: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.held_out)
CONFIG_KEYS: tuple[str, ...] = ("data", "data_root", "labels", "eval_data", "probe", "label_free_samples")
"""The config keys ``unmeasured`` and ``check_metric`` read: configs equal on these measure the same metrics."""


def unmeasured(config: Mapping[str, Any], *, labelled: bool | None) -> dict[str, str]:
    """The metrics runs of ``config`` do not report, each with the reason (a phrase).

    ``labelled``: whether the SSL training data carries labels (None: not known, taken as yes). The rules: kNN needs
    a labelled evaluation set (``eval_data``, else the SSL data itself); the online probe learns from the SSL
    batches' labels and is measured on the SSL data's own test split, so it needs labels there, ``probe`` on and
    no ``eval_data``; the label-free metrics need held-out images (``label_free_samples`` not 0).
    """
    cfg = _with_defaults(config)
    eval_data = cfg.get("eval_data")
    no_labels = f"data '{cfg['data']}' has no labels" + (" (labels: none)" if cfg["labels"] == "none" else "")
    skipped: dict[str, str] = {}
    if labelled is False and not eval_data:
        skipped["knn_acc"] = f"{no_labels} and no eval_data names a labelled set"
    if not cfg["probe"]:
        skipped["probe_acc"] = "probe is off"
    elif eval_data:
        skipped["probe_acc"] = "the online probe learns the SSL data's classes, not eval_data's"
    elif labelled is False:
        skipped["probe_acc"] = no_labels
    if cfg.get("label_free_samples") == 0:
        skipped.update({m.name: "label_free_samples is 0" for m in METRICS.values() if m.held_out})
    return skipped


def check_metric(metric: str, config: Mapping[str, Any]) -> None:
    """Refuse ``metric`` as a search metric for runs of ``config`` if they would not report it (one line).

    Whether the data has labels is read from the files' structure without decoding them
    (``csl.data.has_labels``); data that cannot be found here is taken as labelled (the run reports the error).
    """
    from csl.data import has_labels

    if metric not in METRICS:
        raise ChoiceError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    cfg = _with_defaults(config)
    if cfg["eval_data"] and has_labels(cfg["eval_data"], root=cfg["data_root"]) is False:
        raise ChoiceError(f"eval_data '{cfg['eval_data']}' has no labels; name a labelled set (kNN reads its labels)")
    labelled = has_labels(cfg["data"], labels=cfg["labels"], root=cfg["data_root"])
    reason = unmeasured(cfg, labelled=labelled).get(metric)
    if reason is not None:
        kind = "needs labels" if METRICS[metric].labels else "is not measured"
        raise ChoiceError(f"metric {metric} {kind}, but {reason}; label-free metrics: {', '.join(LABEL_FREE)} "
                          "(or ssl_loss)")


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    from csl.config import TRAINER_DEFAULTS

    return {**TRAINER_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
