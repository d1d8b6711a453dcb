"""Evaluation of a representation: kNN, the online linear probe, offline linear evaluation, and the features the
label-free metrics read (``csl.label_free``).

All read the encoder's pooled vector, on deterministic (un-augmented) views except the label-free metrics'
augmented pair, and never train the encoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(model: Any, pipeline: Any, data: Any, *, batch_size: int, device: torch.device,
                     autocast: bool) -> tuple[Tensor, Tensor]:
    """Pooled vectors and labels of a whole dataset, in its stored order."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, y in data.ordered_batches(batch_size):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            feats.append(model.representation(pipeline.eval_view(images)).float())
        labels.append(y.to(device))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def label_free_features(model: Any, pipeline: Any, data: Any, *, seed: int, batch_size: int, device: torch.device,
                        autocast: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled vectors of every image of ``data`` in its stored order: un-augmented, and of two augmented views.

    The views come from a generator made here with ``seed``: every call (every epoch, every trial) sees the same
    views of the same images, and the training generator's stream is never touched.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    clean, view_a, view_b = [], [], []
    for images, _ in data.ordered_batches(batch_size):
        images = images.to(device, non_blocking=True)
        a, b = pipeline(images, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            clean.append(model.representation(pipeline.eval_view(images)).float())
            view_a.append(model.representation(a).float())
            view_b.append(model.representation(b).float())
    model.train(was_training)
    return torch.cat(clean), torch.cat(view_a), torch.cat(view_b)


@torch.no_grad()
def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
                 k: int = 200, temperature: float = 0.1, num_classes: int, chunk: int = 1024) -> float:
    """Weighted kNN (Wu et al. 2018, as in lightly and solo-learn): the k most cosine-similar training samples vote
    for their class with weight exp(sim / temperature)."""
    keep = train_labels >= 0
    bank, bank_labels = F.normalize(train_features[keep], dim=1), train_labels[keep]
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        query = F.normalize(test_features[start : start + chunk], dim=1)
        sims, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(dim=1) == test_labels[start : start + chunk]).sum()
    return float(correct) / test_features.shape[0]


@torch.no_grad()
def probe_accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> float:
    return float((probe(features).argmax(dim=1) == labels).float().mean())


def linear_eval(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
                num_classes: int, epochs: int = 100, lr: float = 1e-2, batch_size: int = 256, seed: int = 0) -> float:
    """Offline linear evaluation: a linear classifier trained on frozen, standardised features (Adam, cosine)."""
    generator = torch.Generator(device=train_features.device).manual_seed(seed)
    keep = train_labels >= 0
    x, y = train_features[keep], train_labels[keep]
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True) + 1e-6
    x, x_test = (x - mean) / std, (test_features - mean) / std
    classifier = nn.Linear(x.shape[1], num_classes).to(x.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=1e-6)
    steps = epochs * max(1, x.shape[0] // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator, device=x.device)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return probe_accuracy(classifier, x_test, test_labels)
