"""Statistics of an embedding space, computed on a small set of query-target pairs.

All take L2-normalised embeddings unless said otherwise, as float tensors with one row per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alignment(query: torch.Tensor, target: torch.Tensor) -> float:
    """Wang & Isola (2020) alignment: the mean squared distance between positive pairs (lower is better)."""
    return float((query - target).pow(2).sum(-1).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola (2020) uniformity: ``log E exp(-t ||x_i - x_j||^2)`` over pairs ``i < j`` (lower is better).

    Points spread evenly over the sphere give a low value; identical points give 0, the maximum.
    """
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {x.shape[0]}")
    distances = torch.pdist(x.double()).pow(2)
    # logsumexp - log n: stable when the distances are large.
    return float(torch.logsumexp(-t * distances, 0) - math.log(distances.numel()))


def positive_and_hardest_negative(query: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """The mean cosine of positive pairs and the mean, over queries, of the most similar wrong target."""
    if query.shape[0] < 2:
        raise ValueError(f"a hardest negative needs at least 2 pairs, got {query.shape[0]}")
    cosine = query @ target.T
    positive = cosine.diagonal()
    eye = torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)
    hardest = cosine.masked_fill(eye, float("-inf")).max(1).values
    return float(positive.mean()), float(hardest.mean())


def std_ratio(x: torch.Tensor) -> float:
    """The mean per-dimension standard deviation of ``x`` times ``sqrt(d)``.

    For unit vectors spread over the sphere each coordinate's std is about ``1/sqrt(d)``, so the
    ratio is near 1; a space collapsing to one point drives it to 0 (SimSiam's collapse check).
    """
    if x.shape[0] < 2:
        raise ValueError(f"a per-dimension std needs at least 2 rows, got {x.shape[0]}")
    return float(F.normalize(x.double(), dim=-1).std(0).mean() * math.sqrt(x.shape[1]))


def effective_rank(x: torch.Tensor) -> float:
    """Roy & Vetterli (2007): ``exp`` of the entropy of the L1-normalised singular values of ``x``.

    Between 1 (all rows on one line, e.g. identical) and ``min(N, d)`` (all singular values equal).
    The matrix is not centred, so a collapsed space scores 1 rather than being undefined.
    """
    singular = torch.linalg.svdvals(x.double())
    total = singular.sum()
    if total <= 0:
        raise ValueError("effective rank of an all-zero matrix is undefined")
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(states: torch.Tensor) -> float:
    """The mean cosine between distinct rows of each ``(K, H)`` item of ``(B, K, H)``, averaged over B.

    Near 1 when the K states collapse into one direction.
    """
    if states.ndim != 3 or states.shape[1] < 2:
        raise ValueError(f"pairwise cosine needs states of shape (B, K >= 2, H), got {tuple(states.shape)}")
    unit = F.normalize(states.double(), dim=-1)
    gram = unit @ unit.transpose(1, 2)
    k = states.shape[1]
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return float((off_diagonal / (k * (k - 1))).mean())
