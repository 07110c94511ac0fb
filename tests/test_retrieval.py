"""Whole-split retrieval metrics: against torchmetrics, ties, chunking, chance, bad input."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from lame_pl import retrieval
from lame_pl.retrieval import chance_metrics, gold_ranks, metrics_from_ranks, retrieval_metrics


def torchmetrics_reference(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """The same metrics from torchmetrics' flat (preds, target, indexes) form."""
    num_queries, num_candidates = scores.shape
    target = torch.zeros_like(scores, dtype=torch.bool)
    target[torch.arange(num_queries), gold] = True
    indexes = torch.arange(num_queries)[:, None].expand(-1, num_candidates)
    metrics = {f"recall@{k}": RetrievalRecall(top_k=k) for k in (1, 5, 10)}
    metrics["mrr"] = RetrievalMRR()
    metrics["ndcg@10"] = RetrievalNormalizedDCG(top_k=10)
    return {name: float(m(scores.flatten(), target.flatten(), indexes=indexes.flatten())) for name, m in metrics.items()}


@pytest.mark.parametrize("max_scores", [1, 150, 10**6])
def test_metrics_match_torchmetrics_on_tie_free_scores(max_scores):
    torch.manual_seed(1)
    query, candidates = torch.randn(40, 16), torch.randn(60, 16)
    # Gold indices spread over the candidates (not the diagonal), so a wrong gather would show.
    gold = torch.randperm(60)[:40]
    ours = retrieval_metrics(query, candidates, gold, max_scores=max_scores)
    # exp keeps the order; torchmetrics' MRR counts a gold with a score <= 0 as never found,
    # which cosine similarities would hit.
    reference = torchmetrics_reference((query @ candidates.T).exp(), gold)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), name
    # A random model on 60 candidates is far from perfect: the comparison was not trivial.
    assert 0 < ours["recall@1"] < 1


def test_ties_count_against_the_query():
    collapsed = torch.ones(5, 4)
    ranks = gold_ranks(collapsed, collapsed, torch.arange(5))
    assert ranks.tolist() == [4] * 5
    metrics = metrics_from_ranks(ranks)
    assert metrics["recall@1"] == 0.0 and metrics["recall@5"] == 1.0
    assert metrics["mrr"] == pytest.approx(1 / 5)


def test_perfect_ranking_scores_one():
    eye = torch.eye(12)
    metrics = retrieval_metrics(eye, eye, torch.arange(12))
    assert metrics == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0, "ndcg@10": 1.0}


def test_ndcg_and_mrr_of_known_ranks():
    metrics = metrics_from_ranks(torch.tensor([0, 1, 3, 12]))
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 13) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / torch.log2(torch.tensor(3.0)).item() + 1 / 2.3219280948873623) / 4)
    assert metrics["recall@1"] == 0.25 and metrics["recall@5"] == 0.75 and metrics["recall@10"] == 0.75


def test_similarity_is_computed_in_bounded_blocks(monkeypatch):
    seen = []
    original = retrieval.ranks_in_block

    def spy(scores, gold):
        seen.append(scores.numel())
        return original(scores, gold)

    monkeypatch.setattr(retrieval, "ranks_in_block", spy)
    query, candidates = torch.randn(100, 8), torch.randn(30, 8)
    ranks = gold_ranks(query, candidates, torch.arange(100) % 30, max_scores=200)
    assert max(seen) <= 200 and sum(seen) == 100 * 30
    monkeypatch.setattr(retrieval, "ranks_in_block", original)
    assert torch.equal(ranks, gold_ranks(query, candidates, torch.arange(100) % 30))


@pytest.mark.parametrize("n", [1, 3, 10, 257])
def test_chance_is_the_mean_over_every_gold_rank(n):
    # A random ranking puts the gold at each rank 0..n-1 with probability 1/n.
    assert chance_metrics(n) == pytest.approx(metrics_from_ranks(torch.arange(n)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(3, 4), torch.randn(5, 2), torch.arange(3)), "must be (Q, D) and (C, D)"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.arange(2)), "one index per query"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 5])), "gold indices must lie in [0, 5)"),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gold_ranks(*args)


def test_no_queries_and_bad_counts():
    assert gold_ranks(torch.zeros(0, 4), torch.randn(5, 4), torch.zeros(0, dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError, match="at least one ranked query"):
        metrics_from_ranks(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="num_candidates must be >= 1"):
        chance_metrics(0)
