"""Retrieval metrics over a whole split: the gold candidate's rank per query, then metrics of ranks.

With one gold candidate per query every metric is a function of the gold's rank ``r`` (0 = top):
recall@k is ``r < k``, the reciprocal rank ``1 / (r + 1)`` and NDCG@k (binary relevance, whose
ideal DCG is 1) ``1 / log2(r + 2)`` when ``r < k``. So ranking keeps one integer per query, and
the similarity matrix is computed a block of queries at a time, never whole.

Ties are counted against the query (a candidate scoring the same as the gold ranks above it), so
a collapsed embedding scores chance or worse, never better. torchmetrics' retrieval metrics do
not fit here: they break ties by sort order, their MRR counts a gold whose score is <= 0 (a
negative cosine) as never found, and they hold every score of the split (``Q × C`` values plus
targets and indexes) until ``compute``. ``tests/test_retrieval.py`` checks these metrics against
torchmetrics on tie-free, positive scores.

``tie_aware_ranks`` is the project's one ranking rule (the evaluators' ``relevant_ranks`` is the
same function). ``lame_pl.retrieval_metric.SplitRetrieval`` is the ``torchmetrics.Metric`` that
keeps a split's embeddings on every rank and gathers them for these metrics at the end of
validation and test (a module of its own: importing torchmetrics takes seconds, which the
evaluators and the search index need not pay).
"""

from __future__ import annotations

import math

import torch

KS = (1, 5, 10)
NDCG_AT = 10
# Most similarity scores held at once (64 MiB in float32).
MAX_SCORES = 1 << 24


def gold_ranks(
    query: torch.Tensor, candidates: torch.Tensor, gold: torch.Tensor, max_scores: int = MAX_SCORES
) -> torch.Tensor:
    """The rank of each query's gold candidate among all candidates, by dot product.

    Args:
        query: ``(Q, D)`` query embeddings.
        candidates: ``(C, D)`` candidate embeddings.
        gold: ``(Q,)`` index into ``candidates`` of each query's gold candidate.
        max_scores: Most scores computed at once; the query block is ``max_scores // C`` rows
            (at least one).

    Returns:
        ``(Q,)`` long tensor: how many other candidates score at least the gold's score.

    Raises:
        ValueError: On mismatched shapes or a gold index outside ``[0, C)``.
    """
    if query.ndim != 2 or candidates.ndim != 2 or query.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"query and candidates must be (Q, D) and (C, D); got {tuple(query.shape)} and {tuple(candidates.shape)}"
        )
    if gold.shape != (query.shape[0],):
        raise ValueError(f"gold must hold one index per query, shape ({query.shape[0]},); got {tuple(gold.shape)}")
    if query.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=query.device)
    num_candidates = candidates.shape[0]
    if num_candidates == 0 or int(gold.min()) < 0 or int(gold.max()) >= num_candidates:
        raise ValueError(f"gold indices must lie in [0, {num_candidates}); got {gold.min()}..{gold.max()}")
    if max_scores < 1:
        raise ValueError(f"max_scores must be >= 1, got {max_scores}")
    block = max(1, max_scores // num_candidates)
    ranks = []
    for start in range(0, query.shape[0], block):
        scores = query[start : start + block] @ candidates.T
        ranks.append(tie_aware_ranks(scores, gold[start : start + block, None])[:, 0])
    return torch.cat(ranks)


def tie_aware_ranks(scores: torch.Tensor, relevant: torch.Tensor, grades: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each relevant candidate among all candidates, ties counted against the query.

    A candidate scoring the same as a relevant one ranks above it when it is irrelevant, or
    relevant with a lower grade, or relevant with the same grade and a lower index. With one
    relevant candidate per row the rank is how many other candidates score at least its score.

    Args:
        scores: ``(..., C)`` scores of the candidates (one row per query, or one query ``(C,)``).
        relevant: ``(..., R)`` distinct indices into the last dimension of ``scores``.
        grades: ``(..., R)`` their relevance grades, all > 0; ``None``: all equal.

    Returns:
        ``(..., R)`` long tensor: the number of candidates ranked above each relevant one.

    Raises:
        ValueError: On mismatched shapes or a grade <= 0.
    """
    if relevant.shape[:-1] != scores.shape[:-1] or (grades is not None and grades.shape != relevant.shape):
        shapes = f"scores {tuple(scores.shape)}, relevant {tuple(relevant.shape)}"
        raise ValueError(
            f"scores (..., C), relevant and grades (..., R) must share leading dims; got {shapes}"
            + ("" if grades is None else f", grades {tuple(grades.shape)}")
        )
    if grades is not None and bool((grades <= 0).any()):
        raise ValueError(f"relevance grades must be > 0; got {grades.min().item()}")
    # The relevant scores come from the same matrix as the others, so rounding cannot part a tie.
    own = scores.gather(-1, relevant)
    # Every candidate scoring at least a relevant one's score: those above, tied ones and itself.
    at_least = (scores.unsqueeze(-2) >= own.unsqueeze(-1)).sum(-1)
    # Among the tied relevant candidates (itself included) only those ordered first count.
    tied = own.unsqueeze(-1) == own.unsqueeze(-2)
    grade = (
        torch.ones_like(own, dtype=torch.float64)
        if grades is None
        else grades.to(device=own.device, dtype=torch.float64)
    )
    mine, other = grade.unsqueeze(-1), grade.unsqueeze(-2)
    first = (other < mine) | ((other == mine) & (relevant.unsqueeze(-2) < relevant.unsqueeze(-1)))
    return at_least - tied.sum(-1) + (tied & first).sum(-1)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS, ndcg_at: int = NDCG_AT) -> dict[str, float]:
    """Recall@k, MRR and NDCG@``ndcg_at``, averaged over queries, from the gold ranks.

    Args:
        ranks: ``(Q,)`` gold ranks (0 = top), ``Q >= 1``.
        ks: Cut-offs for recall.
        ndcg_at: Cut-off for NDCG.
    """
    if ranks.numel() == 0:
        raise ValueError("metrics need at least one ranked query")
    rank = ranks.double()
    metrics = {f"recall@{k}": float((rank < k).double().mean()) for k in ks}
    metrics["mrr"] = float((1.0 / (rank + 1)).mean())
    gain = torch.where(rank < ndcg_at, 1.0 / torch.log2(rank + 2), torch.zeros_like(rank))
    metrics[f"ndcg@{ndcg_at}"] = float(gain.mean())
    return metrics


def retrieval_metrics(
    query: torch.Tensor,
    candidates: torch.Tensor,
    gold: torch.Tensor,
    ks: tuple[int, ...] = KS,
    ndcg_at: int = NDCG_AT,
    max_scores: int = MAX_SCORES,
) -> dict[str, float]:
    """Recall@k, MRR and NDCG for one gold candidate per query (see ``gold_ranks``)."""
    return metrics_from_ranks(gold_ranks(query, candidates, gold, max_scores), ks, ndcg_at)


def chance_metrics(num_candidates: int, ks: tuple[int, ...] = KS, ndcg_at: int = NDCG_AT) -> dict[str, float]:
    """The expected metrics of a uniformly random ranking over ``num_candidates`` with one gold each."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    n = num_candidates
    metrics = {f"recall@{k}": min(k, n) / n for k in ks}
    metrics["mrr"] = float((1.0 / torch.arange(1, n + 1, dtype=torch.float64)).sum()) / n
    metrics[f"ndcg@{ndcg_at}"] = sum(1.0 / math.log2(r + 2) for r in range(min(ndcg_at, n))) / n
    return metrics
