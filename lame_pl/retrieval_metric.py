"""The whole-split retrieval metric of a LightningModule's validation or test: a ``torchmetrics.Metric``.

The ranking and the metrics are ``lame_pl.retrieval``'s; this object keeps the embeddings of every
batch and gathers them across ranks (torchmetrics' ``"cat"`` states).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lame_pl.retrieval import chance_metrics, gold_ranks, metrics_from_ranks


class SplitRetrieval(Metric):
    """The whole-split retrieval metrics of one split, for a ``LightningModule``'s validation or test.

    ``update`` keeps each batch's query and target embeddings (row ``i`` of one matching row ``i``
    of the other); ``compute`` gathers every rank's rows in rank order (``"cat"`` states), ranks
    each query against every target of the split (``gold_ranks``) and returns the metrics under
    the names the modules log. ``reset`` empties it. Every rank must call ``compute`` (it gathers);
    each ranks the whole split, one block of queries at a time.

    Args:
        split: ``val`` or ``test``, the prefix of the names ``compute`` returns.
        embedding_dim: Width of an embedding (a rank without a batch still gathers ``(0, D)`` rows).
        kwargs: ``torchmetrics.Metric``'s keyword arguments.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, split: str, embedding_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.split, self.embedding_dim = split, embedding_dim
        self.add_state("query", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, query: torch.Tensor, target: torch.Tensor) -> None:
        """Keeps a batch's ``(B, D)`` query and target embeddings (detached)."""
        if query.shape != target.shape or query.ndim != 2 or query.shape[1] != self.embedding_dim:
            raise ValueError(
                f"query and target must both be (B, {self.embedding_dim}); "
                f"got {tuple(query.shape)} and {tuple(target.shape)}"
            )
        self.query.append(query.detach())
        self.target.append(target.detach())

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """``Metric.sync``, after giving a rank without a batch (fewer shards than ranks) ``(0, D)`` rows:
        torchmetrics' own stand-in for an empty state is 1-D, which the other ranks' rows would not match."""
        for state in (self.query, self.target):
            if isinstance(state, list) and not state:
                state.append(torch.zeros(0, self.embedding_dim, device=self.device))
        super().sync(*args, **kwargs)

    def _rows(self, state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        # A list of batches before the gather, one tensor after it.
        return dim_zero_cat(state) if len(state) else torch.zeros(0, self.embedding_dim, device=self.device)

    def compute(self) -> dict[str, float]:
        """``{split}/recall@k``, ``{split}/mrr``, ``{split}/ndcg@10``; for ``test`` also
        ``test/num_candidates`` and chance's metrics as ``chance/...``; empty when no rank held a query."""
        query, target = self._rows(self.query), self._rows(self.target)
        if query.shape[0] == 0:
            return {}
        ranks = gold_ranks(query, target, torch.arange(query.shape[0], device=query.device))
        metrics = {f"{self.split}/{name}": value for name, value in metrics_from_ranks(ranks).items()}
        if self.split == "test":
            metrics["test/num_candidates"] = float(target.shape[0])
            metrics.update({f"chance/{name}": value for name, value in chance_metrics(target.shape[0]).items()})
        return metrics
