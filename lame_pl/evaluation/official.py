"""The benchmarks' own scoring ("official"), beside the project's ``strict`` rules (``metrics``, ``task``).

``strict`` counts ties against the query, merges candidates with the same name and leaves out
queries without a positive qrel: right for catching a collapsed model, but not the number a paper
reports. ``official`` reproduces what each benchmark's code computes from the same embeddings:

MMEB-v2, as VLM2Vec's ``eval.py`` and ``src/utils/eval_utils/metrics.py`` (``RankingMetrics``) do:

- A local task ranks each query's candidate list as given, duplicates included; a candidate's
  embedding is that of the first candidate of the task with its name (VLM2Vec embeds one per name,
  ``generate_cand_dataset``). The order is ``numpy.argsort(-scores)`` (numpy's default sort), so
  tied candidates keep numpy's order, not ours.
- A global task ranks the task's candidates in VLM2Vec's order: the candidates the query rows name,
  first-seen, then (visual documents) the corpus rows not named yet.
- hit@k: a label name in the top k; recall@k: distinct labels in the top k over the labels;
  nDCG@k (``ndcg_linear``): each ranked entry's grade (a duplicate of the gold counts at each
  place it holds) over the ideal DCG of the labels' grades; every query row counts.
- Not reproduced: with graded qrels VLM2Vec pairs the grades with ``list(set(labels))``, whose
  order depends on ``PYTHONHASHSEED``; we pair each grade with its own document (the two agree
  whenever a query's grades are equal, as in binary qrels).

MRMR, as its ``Any2AnyRetrievalEvaluator.evaluate`` (trec_eval through ``pytrec_eval``) and its task
loaders (``mteb/tasks/Image/Any2AnyRetrieval/eng/*``) do:

- qrels: ``int(score)``, a repeated (query, document) pair keeps its last row; grades of 0 stay.
- Every query with at least one qrel row counts, also one whose grades are all 0 (it scores 0).
- Ranking: score descending, ties by document id descending (trec_eval's order); a document id
  that appears twice is ranked once, at its higher score.
- nDCG@k with linear gain, recall@k over the grades >= 1 (documents missing from the corpus
  included), hit@k as MRMR's ``CV_Recall`` (any qrel document, any grade, in the top k), MRR of
  the first document with grade > 0.
- Not reproduced: MRMR rounds each mean to 5 decimals and keeps the top 1000 documents of a query;
  neither changes nDCG@10 or recall@1 beyond the rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from lame_pl.evaluation.metrics import mean_metrics

# A gap between the two scorings at least this large (absolute, on a 0..1 score) is flagged.
GAP_FLAG = 0.05

SCORER_NAMES = {"vlm2vec": "VLM2Vec RankingMetrics", "trec_eval": "trec_eval (MRMR's Any2AnyRetrievalEvaluator)"}


@dataclass
class OfficialView:
    """A task as the benchmark's own scorer sees it.

    Attributes:
        scorer: ``vlm2vec`` (MMEB-v2) or ``trec_eval`` (MRMR).
        queries: The queries it scores, as it embeds them.
        candidates: Its candidates, as it embeds them.
        relevance: vlm2vec: per query, ``{candidate index: grade}`` of its labels in the corpus.
        labels: vlm2vec: per query, every label's grade (also those missing from the corpus).
        lists: vlm2vec local tasks: per query, the candidate list as given (duplicates kept).
        order: vlm2vec global tasks: every candidate index, in the order VLM2Vec ranks them.
        qrels: trec_eval: per query, ``{document id: grade}`` as the benchmark builds it.
        doc_ids: trec_eval: each candidate's document id (ties are broken by it).
    """

    scorer: Literal["vlm2vec", "trec_eval"]
    queries: list
    candidates: list
    relevance: list[dict[int, float]] = field(default_factory=list)
    labels: list[list[float]] = field(default_factory=list)
    lists: list[list[int]] | None = None
    order: list[int] | None = None
    qrels: list[dict[str, int]] = field(default_factory=list)
    doc_ids: list[str] | None = None


def _dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def vlm2vec_query(
    prediction: Sequence[int], relevance: dict[int, float], labels: Sequence[float], ks: Sequence[int]
) -> dict[str, float]:
    """hit@k, recall@k, nDCG@k (linear) and MRR of one ranked list, as ``RankingMetrics`` counts them."""
    out: dict[str, float] = {}
    ideal = sorted(labels, reverse=True)
    for k in ks:
        top = list(prediction[:k])
        found = {p for p in top if p in relevance}
        out[f"hit@{k}"] = 1.0 if found else 0.0
        out[f"recall@{k}"] = len(found) / len(labels) if labels else 1.0
        idcg = _dcg(ideal[:k])
        out[f"ndcg@{k}"] = _dcg([relevance.get(p, 0.0) for p in top]) / idcg if idcg > 0 else 0.0
    first = next((i for i, p in enumerate(prediction) if p in relevance), None)
    out["mrr"] = 0.0 if first is None else 1.0 / (first + 1)
    return out


def trec_query(ranked_ids: Sequence[str], qrels: dict[str, int], ks: Sequence[int]) -> dict[str, float]:
    """ndcg_cut, recall (trec_eval), hit (MRMR's CV_Recall) and MRR of one ranking in trec_eval's order."""
    out: dict[str, float] = {}
    positive = sorted((g for g in qrels.values() if g > 0), reverse=True)
    num_rel = sum(1 for g in qrels.values() if g >= 1)
    for k in ks:
        top = ranked_ids[:k]
        idcg = _dcg(positive[:k])
        out[f"hit@{k}"] = 1.0 if any(d in qrels for d in top) else 0.0
        out[f"recall@{k}"] = sum(1 for d in top if qrels.get(d, 0) >= 1) / num_rel if num_rel else 0.0
        out[f"ndcg@{k}"] = _dcg([max(qrels.get(d, 0), 0) for d in top]) / idcg if idcg > 0 else 0.0
    first = next((i for i, d in enumerate(ranked_ids) if qrels.get(d, 0) > 0), None)
    out["mrr"] = 0.0 if first is None else 1.0 / (first + 1)
    return out


def trec_order(scores: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """Candidate indices by score descending, ties by document id descending (``id_rank`` 0 = largest id)."""
    return np.lexsort((id_rank, -scores.astype(np.float64)))


def score_official(
    view: OfficialView,
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 256,
) -> dict[str, float]:
    """Mean metrics of a task under its benchmark's own scorer (rows of the embeddings: ``view``'s items)."""
    q = query_embeddings.float().cpu().numpy()
    c = candidate_embeddings.float().cpu().numpy()
    per_query: list[dict[str, float]] = []
    if view.scorer == "vlm2vec":
        if view.lists is not None:
            for i, listed in enumerate(view.lists):
                ranked = np.argsort(-np.dot(q[i], c[listed].T))  # VLM2Vec's call, numpy's default sort
                per_query.append(vlm2vec_query([listed[j] for j in ranked], view.relevance[i], view.labels[i], ks))
        else:
            order = np.asarray(view.order if view.order is not None else range(len(c)))
            for start in range(0, len(q), chunk):
                ranked = np.argsort(-np.dot(q[start : start + chunk], c[order].T), axis=1)
                for offset, row in enumerate(ranked):
                    i = start + offset
                    per_query.append(vlm2vec_query(order[row].tolist(), view.relevance[i], view.labels[i], ks))
    else:
        ids = view.doc_ids or []
        by_id = sorted(set(ids), reverse=True)
        rank_of = {d: r for r, d in enumerate(by_id)}
        id_rank = np.asarray([rank_of[d] for d in ids])
        for start in range(0, len(q), chunk):
            block = np.dot(q[start : start + chunk], c.T)
            for offset, scores in enumerate(block):
                order = trec_order(scores, id_rank)
                ranked: list[str] = []
                seen: set[str] = set()
                for j in order.tolist():  # a repeated id is ranked once, at its higher score
                    if ids[j] not in seen:
                        seen.add(ids[j])
                        ranked.append(ids[j])
                per_query.append(trec_query(ranked, view.qrels[start + offset], ks))
    metrics = mean_metrics(per_query)
    metrics["num_queries"] = float(len(per_query))
    metrics["num_candidates"] = float(len(view.candidates))
    return metrics


__all__ = ["GAP_FLAG", "SCORER_NAMES", "OfficialView", "score_official", "trec_order", "trec_query", "vlm2vec_query"]
