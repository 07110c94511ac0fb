"""Ranking metrics: hand-computed answers, ties, and agreement with independent computations."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from lame_pl.evaluation.metrics import mean_metrics, query_metrics, relevant_ranks
from lame_pl.evaluation.task import Item, RetrievalTask, score_task


def metrics_of(scores: list[float], grades: dict[int, float], ks=(1, 5, 10), ideal=None) -> dict[str, float]:
    relevant = torch.tensor(sorted(grades), dtype=torch.long)
    g = torch.tensor([grades[i] for i in sorted(grades)], dtype=torch.float64)
    ranks = relevant_ranks(torch.tensor(scores), relevant, g)
    return query_metrics(ranks, g, ideal if ideal is not None else list(grades.values()), ks)


def brute_force(scores: list[float], grades: dict[int, float], ideal: list[float], k: int) -> dict[str, float]:
    """The documented ordering spelled out: sort by (-score, grade, index), then walk the list."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], grades.get(i, 0.0), i))
    gains = [grades.get(i, 0.0) for i in order]
    dcg = sum(gain / math.log2(pos + 2) for pos, gain in enumerate(gains[:k]))
    best = sorted(ideal, reverse=True)[:k]
    idcg = sum(gain / math.log2(pos + 2) for pos, gain in enumerate(best))
    first = next((pos for pos, gain in enumerate(gains) if gain > 0), None)
    return {
        f"hit@{k}": float(any(gain > 0 for gain in gains[:k])),
        f"recall@{k}": sum(gain > 0 for gain in gains[:k]) / len(ideal),
        f"ndcg@{k}": dcg / idcg,
        "mrr": 0.0 if first is None else 1.0 / (first + 1),
    }


def test_hand_computed_graded_ndcg():
    # Ranking: doc0 (grade 0), doc1 (grade 1), doc2 (grade 2); ideal order is 2, 1.
    m = metrics_of([0.9, 0.8, 0.7], {1: 1.0, 2: 2.0}, ks=(1, 2, 3))
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx(dcg / idcg)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg)
    assert m["hit@1"] == 0.0 and m["hit@2"] == 1.0
    assert m["recall@2"] == 0.5 and m["recall@3"] == 1.0
    assert m["mrr"] == 0.5


def test_ties_count_against_the_query():
    # Every score equal: the gold comes after every rival, so a collapsed model scores the worst.
    m = metrics_of([0.5, 0.5, 0.5, 0.5], {0: 1.0}, ks=(1, 3, 4))
    assert m["hit@1"] == 0.0 and m["hit@3"] == 0.0 and m["hit@4"] == 1.0
    assert m["mrr"] == 0.25
    # Among tied relevant candidates the lower grade ranks first.
    ranks = relevant_ranks(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 2]), torch.tensor([3.0, 1.0]))
    assert ranks.tolist() == [2, 1]


def test_relevant_documents_missing_from_the_corpus_lower_recall_and_ndcg():
    # The qrels name two documents; only one is in the ranked set, at the top.
    m = metrics_of([0.9, 0.1], {0: 1.0}, ks=(1,), ideal=[1.0, 1.0])
    assert m["recall@1"] == 0.5 and m["ndcg@1"] == 1.0 and m["hit@1"] == 1.0
    m = metrics_of([0.9, 0.1], {0: 1.0}, ks=(2,), ideal=[1.0, 1.0])
    assert m["ndcg@2"] == pytest.approx(1.0 / (1 + 1 / math.log2(3)))


@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_a_brute_force_ordering_under_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 30)
    scores = [float(rng.randint(0, 4)) for _ in range(n)]  # few values: many ties
    relevant = rng.sample(range(n), rng.randint(1, min(4, n)))
    grades = {i: float(rng.randint(1, 3)) for i in relevant}
    ideal = list(grades.values()) + [float(rng.randint(1, 3)) for _ in range(rng.randint(0, 2))]
    for k in (1, 3, 5, 10):
        ours = metrics_of(scores, grades, ks=(k,), ideal=ideal)
        assert ours == pytest.approx(brute_force(scores, grades, ideal, k))


def test_agrees_with_torchmetrics_without_ties():
    rng = torch.Generator().manual_seed(0)
    queries, n = 12, 40
    scores = torch.rand(queries, n, generator=rng)  # continuous: no ties
    target = torch.zeros(queries, n, dtype=torch.long)
    for q in range(queries):
        chosen = torch.randperm(n, generator=rng)[: 1 + q % 4]
        target[q, chosen] = torch.randint(1, 4, (len(chosen),), generator=rng)
    indexes = torch.arange(queries)[:, None].expand(queries, n)
    per_query = []
    for q in range(queries):
        grades = {int(i): float(target[q, i]) for i in torch.nonzero(target[q]).flatten()}
        per_query.append(metrics_of(scores[q].tolist(), grades, ks=(1, 5, 10)))
    ours = mean_metrics(per_query)
    for k in (1, 5, 10):
        ndcg = RetrievalNormalizedDCG(top_k=k)(scores.flatten(), target.flatten(), indexes=indexes.flatten())
        hit = RetrievalHitRate(top_k=k)(scores.flatten(), target.flatten() > 0, indexes=indexes.flatten())
        recall = RetrievalRecall(top_k=k)(scores.flatten(), target.flatten() > 0, indexes=indexes.flatten())
        assert ours[f"ndcg@{k}"] == pytest.approx(float(ndcg), abs=1e-6)
        assert ours[f"hit@{k}"] == pytest.approx(float(hit), abs=1e-6)
        assert ours[f"recall@{k}"] == pytest.approx(float(recall), abs=1e-6)
    mrr = RetrievalMRR()(scores.flatten(), target.flatten() > 0, indexes=indexes.flatten())
    assert ours["mrr"] == pytest.approx(float(mrr), abs=1e-6)


def test_score_task_local_and_global_agree_when_every_query_sees_every_candidate():
    rng = torch.Generator().manual_seed(1)
    q_emb = torch.nn.functional.normalize(torch.randn(7, 8, generator=rng), dim=-1)
    c_emb = torch.nn.functional.normalize(torch.randn(5, 8, generator=rng), dim=-1)
    items = [Item("", str(i)) for i in range(7)]
    cands = [Item("", f"c{i}") for i in range(5)]
    relevance = [{i % 5: 1.0} for i in range(7)]
    common = dict(
        name="t",
        modality="image",
        group="CLS",
        main_metric="hit@1",
        queries=items,
        candidates=cands,
        relevance=relevance,
        ideal_grades=[[1.0]] * 7,
    )
    global_ = score_task(RetrievalTask(**common), q_emb, c_emb, chunk=3)
    # A local list in another order ranks the same candidates: same metrics.
    local = score_task(RetrievalTask(**common, local=[[4, 3, 2, 1, 0]] * 7), q_emb, c_emb)
    assert global_ == pytest.approx(local)
    # Brute force: the gold is the argmax when it beats every other candidate.
    expected = float(sum(int((c_emb @ q_emb[q]).argmax()) == q % 5 for q in range(7))) / 7
    assert global_["hit@1"] == pytest.approx(expected)


def test_a_query_without_relevant_candidates_is_an_error():
    with pytest.raises(ValueError, match="at least one relevant"):
        query_metrics(torch.zeros(0, dtype=torch.long), torch.zeros(0), [], (1,))
