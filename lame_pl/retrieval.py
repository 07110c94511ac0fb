"""Retrieval metrics over a whole split, from a query-candidate similarity matrix."""

from __future__ import annotations

import torch


def retrieval_metrics(
    similarity: torch.Tensor, gold: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024
) -> dict[str, float]:
    """Recall@k and MRR for one gold candidate per query.

    Ties are counted against the query (a candidate scoring the same as the gold one ranks above
    it), so a constant embedding scores chance or worse, never better.

    Args:
        similarity: ``(Q, C)`` scores.
        gold: ``(Q,)`` index of each query's gold candidate.
        ks: Cut-offs for recall.
        chunk: Queries ranked at a time, to bound memory.
    """
    ranks = []
    for start in range(0, similarity.shape[0], chunk):
        sim = similarity[start : start + chunk]
        g = gold[start : start + chunk]
        gold_score = sim.gather(1, g[:, None])
        better_or_tied = (sim >= gold_score).sum(1) - 1  # minus the gold itself
        ranks.append(better_or_tied)
    rank = torch.cat(ranks).float()
    metrics = {f"recall@{k}": float((rank < k).float().mean()) for k in ks}
    metrics["mrr"] = float((1.0 / (rank + 1)).mean())
    return metrics


def chance_metrics(num_candidates: int, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall@k of a random ranking over ``num_candidates`` with one gold each."""
    return {f"recall@{k}": min(k, num_candidates) / num_candidates for k in ks}
