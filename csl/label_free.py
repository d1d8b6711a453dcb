"""Label-free measures of a representation: what a search can rank trials by when the data has no labels.

    rankme        RankMe (Garrido et al., ICML 2023, eq. 1): the effective rank exp(H(p)) of the N×D matrix of
                  representations, p_k = σ_k / ‖σ‖₁ + ε over its singular values σ; higher is better
    alpha_req     α-ReQ (Agrawal et al., NeurIPS 2022): α of the power law λ_i ∝ i^(−α) fitted to the
                  eigenspectrum of the representations' covariance; a diagnostic (see below)
    alpha_req_gap |α − 1|: the paper's selection criterion, α near 1; lower is better
    alignment     E‖f(x) − f(x⁺)‖² over two augmented views (Wang & Isola, ICML 2020, α = 2); lower is better
    uniformity    log E exp(−2‖f(x) − f(y)‖²) over pairs of images, the mean of both views (Wang & Isola, t = 2);
                  lower is better

Every measure reads the encoder's pooled vector (``CSLModel.representation``, what kNN and the probe read).
RankMe's paper computes it on the embeddings (the projector's output) and evaluates the representations; here
the extraction head is a searchable aspect (a projector, AMDIM's multiscale maps, CPC's context network, none),
so only the encoder's vector means the same thing in every trial of a search, and it is what downstream tasks
use. Alignment and uniformity are measured on the L2-normalised vector, as Wang & Isola define them.

α-ReQ: the authors' code (reptrix, ``reptrix/alpha.py`` and ``utils.py``) centres the representations, takes
the covariance eigenvalues and fits log λ_i against log i by least squares weighted by 1/i, over the ranks
6..100 (the largest five are left out: the fit is of the spectrum's body). Here the same, with the range cut
to the ranks the sample resolves (at most N − 1 and D); with fewer than two ranks left α is NaN. The paper
reports "well-defined intervals for α where models exhibit excellent downstream generalization", around α = 1
(the 1/n spectrum of Stringer et al. 2019): a larger α is a spectrum that decays fast, towards collapse, a
smaller one a spectrum towards white noise. So α itself has no better direction: ``alpha_req_gap`` = |α − 1| is
what a search minimises; ``alpha_req`` is reported to read the spectrum by (its table mode, min, is the
direction away from collapse, the usual failure of a contrastive search).

Alignment alone is minimised by a collapsed encoder (every image at one point) and uniformity alone by ignoring
the views; Wang & Isola read them together. Spectra are computed in float64 (``torch.linalg``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RANKME_EPS = 1e-7
"""ε of RankMe's p_k (the paper's value): keeps log p finite for a zero singular value."""
ALPHA_FIT_RANKS = (6, 100)
"""First and last eigenvalue rank (1 = the largest) of the α-ReQ fit: the authors' code's default range."""
UNIFORMITY_T = 2.0
"""t of the uniformity measure (Wang & Isola's default)."""


def rankme(z: Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of representations ``z`` (N×D): between 1 (one direction) and min(N, D) (all singular values equal)."""
    sigma = torch.linalg.svdvals(z.double())
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def eigenspectrum(z: Tensor) -> Tensor:
    """Eigenvalues of the covariance of ``z`` (N×D), largest first, float64."""
    x = z.double()
    x = x - x.mean(dim=0, keepdim=True)
    covariance = x.T @ x / max(1, x.shape[0] - 1)
    return torch.linalg.eigvalsh(covariance).flip(0)


def power_law_alpha(spectrum: Tensor, ranks: tuple[int, int] = ALPHA_FIT_RANKS) -> float:
    """α of λ_i ∝ i^(−α) fitted to ``spectrum`` (largest first) over ``ranks`` (first, last; 1-based, inclusive).

    Least squares of log λ_i on log i with weights 1/i, as the authors' code. Eigenvalues at or below 1e-12 of the
    largest (numerically zero: a dead feature) count as 1e-12 of it, so a collapsed spectrum gives a large α.
    """
    first, last = ranks[0], min(ranks[1], spectrum.numel())
    if last - first + 1 < 2:
        return math.nan
    values = spectrum.double().cpu().numpy()
    floor = max(float(values[0]), 0.0) * 1e-12
    if floor <= 0.0:
        return math.nan
    i = np.arange(first, last + 1, dtype=np.float64)
    y = np.log(np.maximum(values[first - 1 : last], floor))
    slope, _ = np.polyfit(np.log(i), y, 1, w=np.sqrt(1.0 / i))  # polyfit squares its weights
    return float(-slope)


def alpha_req(z: Tensor) -> float:
    """α-ReQ of representations ``z`` (N×D): the spectrum's decay, over the ranks the N samples resolve."""
    spectrum = eigenspectrum(z)[: max(0, z.shape[0] - 1)]
    return power_law_alpha(spectrum)


def alignment(a: Tensor, b: Tensor) -> float:
    """Mean squared distance between the L2-normalised representations of two views of the same images."""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    return float((a - b).norm(dim=1).pow(2).mean())


def uniformity(x: Tensor, t: float = UNIFORMITY_T) -> float:
    """log of the mean Gaussian potential exp(−t‖u − v‖²) over all pairs of L2-normalised representations."""
    x = F.normalize(x.float(), dim=1)
    return float(torch.pdist(x).pow(2).mul(-t).exp().mean().log())


def label_free_metrics(clean: Tensor, view_a: Tensor, view_b: Tensor) -> dict[str, float]:
    """Every label-free metric (``csl.metrics``) of held-out images: their un-augmented representations ``clean``
    (N×D) for the spectra, and those of two augmented views of the same images for alignment and uniformity."""
    alpha = alpha_req(clean)
    return {
        "rankme": rankme(clean),
        "alpha_req": alpha,
        "alpha_req_gap": abs(alpha - 1.0),
        "alignment": alignment(view_a, view_b),
        "uniformity": (uniformity(view_a) + uniformity(view_b)) / 2,
    }
