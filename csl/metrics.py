"""The metrics a run reports after each epoch: their names, which way is better, and which need labels.

One table, read by the trainer (what it reports), the search (``search.status.EPOCH_METRICS``: what MLflow, the
history table and results.parquet carry), and the space validator (what a space may name as its ``metric``). A new
metric is one line here and the code in ``csl`` that computes it.

``ssl_loss`` is the self-supervised objective of the epoch (mean over its steps); it is not called ``loss`` so that
no metric shares a name with the ``loss`` aspect in MLflow's params, the tables and a join of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A per-epoch metric: ``mode`` is the direction a search would optimise it in (``max`` or ``min``);
    ``labels``: whether computing it needs labelled data."""

    name: str
    mode: str
    labels: bool
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ssl_loss", "min", False, "the self-supervised loss, mean over the epoch's steps (nats)"),
        Metric("knn_acc", "max", True, "weighted kNN accuracy on the evaluation split (fraction)"),
        Metric("probe_acc", "max", True, "online linear-probe accuracy on the evaluation split (fraction)"),
        Metric("images_per_s", "max", False, "training throughput of the epoch (images/s)"),
        Metric("epoch_time", "min", False, "wall-clock time of the epoch's training steps (s)"),
    )
}

EPOCH_METRICS: tuple[str, ...] = tuple(METRICS)
