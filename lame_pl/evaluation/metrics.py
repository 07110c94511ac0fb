"""Ranking metrics of one query: hit@k, recall@k, nDCG@k (linear gain) and MRR.

The conventions are those of VLM2Vec's ``RankingMetrics`` and trec_eval:

- hit@k: 1 if any relevant candidate is in the top k.
- recall@k: relevant candidates in the top k over all relevant ones (those the qrels name,
  found in the corpus or not).
- nDCG@k: DCG with linear gain ``rel / log2(i + 1)`` (i = 1 for the top), divided by the DCG of
  the ideal ranking of the query's relevance grades (every positive grade the qrels give).
- MRR: reciprocal rank of the first relevant candidate over the whole ranking.

Ties are counted against the query: candidates with equal scores are ordered by ascending
relevance grade (irrelevant ones first), then by candidate index. A model that gives every
candidate the same score therefore scores the worst ranking, never the best. Exact ties are rare
with float embeddings; they matter for collapsed models and for tests. The rule is
``lame_pl.retrieval.tie_aware_ranks``, which training's whole-split metrics rank with too;
``relevant_ranks`` is that function (one query: ``scores (C,)``, ``relevant`` and ``grades (R,)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lame_pl.retrieval import tie_aware_ranks as relevant_ranks

__all__ = ["mean_metrics", "query_metrics", "relevant_ranks"]


def _dcg(gains: Sequence[float], positions: Sequence[int]) -> float:
    return sum(g / math.log2(p + 2) for g, p in zip(gains, positions, strict=True))


def query_metrics(
    ranks: torch.Tensor, grades: torch.Tensor, ideal_grades: Sequence[float], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """hit@k, recall@k, nDCG@k for each k, and MRR, of one query.

    Args:
        ranks: ``(R,)`` 0-based ranks of the relevant candidates found in the ranked set.
        grades: ``(R,)`` their grades.
        ideal_grades: Every positive grade of the query (also those of documents missing from the
            ranked set), for recall's denominator and the ideal DCG.
        ks: Cut-offs.
    """
    if not ideal_grades:
        raise ValueError("a query needs at least one relevant candidate to be scored")
    rank_list = [int(r) for r in ranks.tolist()]
    grade_list = [float(g) for g in grades.tolist()]
    ideal = sorted((float(g) for g in ideal_grades), reverse=True)
    out: dict[str, float] = {}
    for k in ks:
        top = [(r, g) for r, g in zip(rank_list, grade_list, strict=True) if r < k]
        out[f"hit@{k}"] = 1.0 if top else 0.0
        out[f"recall@{k}"] = len(top) / len(ideal)
        dcg = _dcg([g for _, g in top], [r for r, _ in top])
        ideal_dcg = _dcg(ideal[:k], range(min(k, len(ideal))))
        out[f"ndcg@{k}"] = dcg / ideal_dcg
    out["mrr"] = 1.0 / (min(rank_list) + 1) if rank_list else 0.0
    return out


def mean_metrics(per_query: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over queries (the per-task figure)."""
    if not per_query:
        raise ValueError("no query to average")
    return {name: sum(q[name] for q in per_query) / len(per_query) for name in per_query[0]}
