"""Contrastive loss on [EMBED]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor | float,
    hard_negatives: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """InfoNCE of queries against in-batch targets (and optional hard negatives).

    Args:
        query: ``(B, D)`` normalised query embeddings of this rank.
        target: ``(N, D)`` normalised target embeddings of the global batch; the positive of
            ``query[i]`` is ``target[offset + i]``, every other row is a negative.
        logit_scale: ``1 / temperature``.
        hard_negatives: ``(M, D)`` extra negatives shared by all queries.
        offset: Index of this rank's first positive in ``target``.
    """
    candidates = target if hard_negatives is None else torch.cat([target, hard_negatives])
    logits = logit_scale * query @ candidates.T
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(logits, labels)
