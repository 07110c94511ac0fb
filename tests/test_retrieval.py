"""Whole-split retrieval metrics: against torchmetrics, ties, chunking, chance, bad input, the split metric."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from lame_pl import retrieval
from lame_pl.evaluation.metrics import relevant_ranks
from lame_pl.retrieval import (
    chance_metrics,
    gold_ranks,
    metrics_from_ranks,
    retrieval_metrics,
    tie_aware_ranks,
)
from lame_pl.retrieval_metric import SplitRetrieval


def torchmetrics_reference(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """The same metrics from torchmetrics' flat (preds, target, indexes) form."""
    num_queries, num_candidates = scores.shape
    target = torch.zeros_like(scores, dtype=torch.bool)
    target[torch.arange(num_queries), gold] = True
    indexes = torch.arange(num_queries)[:, None].expand(-1, num_candidates)
    metrics = {f"recall@{k}": RetrievalRecall(top_k=k) for k in (1, 5, 10)}
    metrics["mrr"] = RetrievalMRR()
    metrics["ndcg@10"] = RetrievalNormalizedDCG(top_k=10)
    return {
        name: float(m(scores.flatten(), target.flatten(), indexes=indexes.flatten())) for name, m in metrics.items()
    }


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
    assert metrics["ndcg@10"] == pytest.approx(
        (1 + 1 / torch.log2(torch.tensor(3.0)).item() + 1 / 2.3219280948873623) / 4
    )
    assert metrics["recall@1"] == 0.25 and metrics["recall@5"] == 0.75 and metrics["recall@10"] == 0.75


def test_similarity_is_computed_in_bounded_blocks(monkeypatch):
    seen = []
    original = retrieval.tie_aware_ranks

    def spy(scores, relevant, grades=None):
        seen.append(scores.numel())
        return original(scores, relevant, grades)

    monkeypatch.setattr(retrieval, "tie_aware_ranks", spy)
    query, candidates = torch.randn(100, 8), torch.randn(30, 8)
    ranks = gold_ranks(query, candidates, torch.arange(100) % 30, max_scores=200)
    assert max(seen) <= 200 and sum(seen) == 100 * 30
    monkeypatch.setattr(retrieval, "tie_aware_ranks", original)
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


def test_one_rank_function_for_training_and_the_evaluators():
    assert relevant_ranks is tie_aware_ranks
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (6, 9)).float()  # few values: many ties
    gold = torch.randint(0, 9, (6,))
    # One gold per row: the count of other candidates scoring at least the gold's score.
    expected = (scores >= scores[torch.arange(6), gold][:, None]).sum(1) - 1
    assert torch.equal(tie_aware_ranks(scores, gold[:, None])[:, 0], expected)
    # Rows of graded relevant sets at once equal one query at a time.
    relevant = torch.stack([torch.randperm(9)[:3] for _ in range(6)])
    grades = torch.randint(1, 3, (6, 3)).double()
    batched = tie_aware_ranks(scores, relevant, grades)
    assert torch.equal(batched, torch.stack([relevant_ranks(scores[i], relevant[i], grades[i]) for i in range(6)]))
    with pytest.raises(ValueError, match="grades must be > 0"):
        tie_aware_ranks(scores[0], relevant[0], torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="must share leading dims"):
        tie_aware_ranks(scores, relevant[:2])


def tied_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and targets with small integer coordinates: exactly tied scores."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(-2, 3, (n, 6), generator=generator).float() for _ in range(2))


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_metric_equals_the_function_and_reset_empties_it(split):
    query, target = tied_pairs(23, seed=0)
    metric = SplitRetrieval(split, embedding_dim=6)
    for start, end in ((0, 5), (5, 6), (6, 23)):  # uneven batches
        metric.update(query[start:end], target[start:end])
    expected = {f"{split}/{name}": v for name, v in retrieval_metrics(query, target, torch.arange(23)).items()}
    if split == "test":
        expected["test/num_candidates"] = 23.0
        expected.update({f"chance/{name}": v for name, v in chance_metrics(23).items()})
    assert metric.compute() == expected
    # Not trivial: some gold scores are tied with another candidate's, and the ranking is neither perfect nor worst.
    scores = query @ target.T
    assert ((scores == scores.diagonal()[:, None]).sum(1) > 1).any()
    assert 0 < expected[f"{split}/recall@1"] < 1

    metric.reset()
    assert metric.query == [] and metric.target == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute before update
        assert metric.compute() == {}
    metric.update(query[:4], target[:4])  # after reset only the new rows count
    assert metric.compute()[f"{split}/mrr"] == retrieval_metrics(query[:4], target[:4], torch.arange(4))["mrr"]


def test_split_metric_names_bad_widths():
    with pytest.raises(ValueError, match=r"both be \(B, 6\); got \(2, 6\) and \(2, 5\)"):
        SplitRetrieval("val", 6).update(torch.zeros(2, 6), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="embedding_dim must be >= 1"):
        SplitRetrieval("val", 0)


# Rows each of two ranks holds, per case: uneven, and one rank without a batch (either one).
GATHER_CASES = [(7, 4), (5, 0), (0, 6)]


def _gather_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = []
    for case, sizes in enumerate(GATHER_CASES):
        query, target = tied_pairs(sum(sizes), seed=case)
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        metric = SplitRetrieval("test", embedding_dim=6)
        for rows in torch.arange(sizes[0] + sizes[1])[mine].split(3):  # batches of up to 3 rows
            metric.update(query[rows], target[rows])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics warns on the rank without a batch
            results.append(metric.compute())
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_a_rank_without_a_batch_gathers_rows_of_the_embedding_width():
    """Fast stand-in for the two-process test below: what rank 1 of two sends and gets when it held no batch."""
    query, target = tied_pairs(9, seed=1)
    from_rank0 = iter([query, target])
    sent = []

    def gather(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        sent.append(tuple(tensor.shape))  # torch.distributed needs the same number of dims on every rank
        return [next(from_rank0), tensor]

    rank1 = SplitRetrieval("test", embedding_dim=6, sync_on_compute=False)
    rank1.sync(dist_sync_fn=gather, distributed_available=lambda: True)
    assert sent == [(0, 6), (0, 6)]
    one = SplitRetrieval("test", embedding_dim=6)
    one.update(query, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute on a rank without an update
        assert rank1.compute() == one.compute()


@pytest.mark.slow  # two spawned processes: ~20 s on 2 busy cores
def test_split_metric_gathers_every_rank_in_rank_order(tmp_path):
    """Two gloo processes hold parts of the split; each computes what one process holding it all computes."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    by_rank = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in range(2)]
    assert by_rank[0] == by_rank[1]
    for case, sizes in enumerate(GATHER_CASES):
        query, target = tied_pairs(sum(sizes), seed=case)
        one = SplitRetrieval("test", embedding_dim=6)
        one.update(query, target)
        assert by_rank[0][case] == one.compute(), sizes
