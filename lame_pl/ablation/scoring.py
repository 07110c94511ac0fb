"""Per-kind recall of one row's test embeddings: over every distinct statement, and within each contrast group."""

from __future__ import annotations

from typing import Any

import torch

from lame_pl.ablation.spec import KS
from lame_pl.retrieval import chance_metrics, retrieval_metrics, tie_aware_ranks


def kind_metrics(embeddings: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per-kind and overall recall from predicted test embeddings, with chance beside each.

    Args:
        embeddings: What ``callbacks.EmbeddingWriter`` saves: ``keys``, ``query`` and ``target``.
        records: :func:`read_test_records` of the same split.

    Returns:
        ``{"<kind>/recall@k", "<kind>/hard@1", "<kind>/queries", "<kind>/candidates",
        "chance/<kind>/recall@k", "chance/<kind>/hard@1"}`` for each kind, and the same under
        ``all/`` (means over every query).

    Raises:
        ValueError: When a key has no record, or a group's statement has no embedding.
    """
    keys, query, target = embeddings["keys"], embeddings["query"].float(), embeddings["target"].float()
    unknown = [k for k in keys if k not in records]
    if unknown:
        raise ValueError(f"{len(unknown)} embedded keys are not in the test shards, e.g. {unknown[:3]}")
    # Equal statements get equal embeddings; each distinct statement is one candidate.
    text_row: dict[str, int] = {}
    for i, key in enumerate(keys):
        text_row.setdefault(records[key]["text"], i)
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    kinds = sorted({records[k]["kind"] for k in keys})
    for kind in kinds:
        rows = [i for i, k in enumerate(keys) if records[k]["kind"] == kind]
        texts = sorted({records[keys[i]]["text"] for i in rows})
        cand = target[[text_row[t] for t in texts]]
        gold = torch.tensor([texts.index(records[keys[i]]["text"]) for i in rows])
        q = query[rows]
        metrics = retrieval_metrics(q, cand, gold, ks=KS)
        chance = chance_metrics(len(texts), ks=KS)
        groups = [records[keys[i]]["candidates"] for i in rows]
        missing = sorted({t for g in groups for t in g if t not in text_row})
        if missing:
            raise ValueError(f"{kind}: statements of a contrast group have no test embedding, e.g. {missing[:3]}")
        size = len(groups[0])
        group_emb = target[torch.tensor([[text_row[t] for t in g] for g in groups])]  # (Q, G, D)
        hard_sim = torch.einsum("qd,qgd->qg", q, group_emb)
        hard_gold = torch.tensor([records[keys[i]]["member"] for i in rows])
        # Each query ranks its own group; a tie counts against it.
        beaten = tie_aware_ranks(hard_sim, hard_gold[:, None])[:, 0]
        hard = float((beaten == 0).float().mean())
        values = {**{f"recall@{k}": metrics[f"recall@{k}"] for k in KS}, "hard@1": hard}
        chances = {**{f"recall@{k}": chance[f"recall@{k}"] for k in KS}, "hard@1": 1.0 / size}
        for name, value in values.items():
            out[f"{kind}/{name}"] = value
            out[f"chance/{kind}/{name}"] = chances[name]
            totals[name] = totals.get(name, 0.0) + value * len(rows)
            totals[f"chance/{name}"] = totals.get(f"chance/{name}", 0.0) + chances[name] * len(rows)
        out[f"{kind}/queries"] = float(len(rows))
        out[f"{kind}/candidates"] = float(len(texts))
    for name, value in totals.items():
        prefix, _, metric = name.rpartition("/")
        out[f"chance/all/{metric}" if prefix else f"all/{name}"] = value / len(keys)
    out["all/queries"] = float(len(keys))
    return out
