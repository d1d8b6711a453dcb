"""Optimisers and the learning-rate schedule.

``adam``, ``adamw`` and ``sgd`` are torch's (fused kernels on CUDA); Adam's betas and eps are options because
references set them (AMDIM: betas (0.8, 0.999), amdim-public ``task_self_supervised.py``). ``lars`` is LARS (You
et al. 2017) as SimCLR and BYOL use it: SGD with momentum whose step is scaled per layer by the trust ratio
‖w‖/‖g + wd·w‖; biases and normalisation weights (1-D parameters) are left out of both the adaptation and the
weight decay, as in SimCLR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

OPTIMIZERS = ("adam", "adamw", "sgd", "lars")


class LARS(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, eps: float = 1e-8) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "eps": eps, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    grad = grad * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return None


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float, sgd_momentum: float,
                    fused: bool, adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8
                    ) -> torch.optim.Optimizer:
    """adam_betas, adam_eps: Adam's and AdamW's (torch's defaults unless a preset sets them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=adam_betas, eps=adam_eps, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=adam_betas, eps=adam_eps, weight_decay=weight_decay,
                                 fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=sgd_momentum, weight_decay=weight_decay, fused=fused)
    if name == "lars":
        matrices = [p for p in params if p.dim() > 1]
        vectors = [p for p in params if p.dim() <= 1]
        return LARS([{"params": matrices}, {"params": vectors, "lars_exclude": True, "weight_decay": 0.0}],
                    lr=lr, momentum=sgd_momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to the base rate, then a cosine decay to zero (SimCLR, BYOL)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
