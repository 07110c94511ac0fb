"""LaME's training loss: InfoNCE on [EMBED] over the global batch, and the latent decoder's cross-entropy.

One object owns both terms and the cross-rank traffic they need, so that the LightningModule
only weights and logs them and the plain step and the GradCache step (``lame_pl.gradcache``)
compute the same numbers.

Every term is a sum over this rank's items (queries, target tokens) divided by the *global*
count divided by the world size. In one process that is the plain mean; under DDP, whose
all-reduce averages the ranks' gradients, the update is then exactly that of the mean over the
global batch, even when ranks hold different numbers of rows or of labelled tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lame_pl.distributed import gather_rows, global_count, world_size

# Target index of a position the decoder term must leave out (torch's cross-entropy default).
IGNORE_INDEX = -100
# CLIP's cap on the logit scale, 1 / temperature: no temperature below 0.01 trains.
MAX_LOGIT_SCALE = 100.0


class DecoderLogits(NamedTuple):
    """What the latent decoder predicts for a batch's labelled target tokens.

    A ``NamedTuple``, as ``EncoderOutput``: DeepSpeed ZeRO-3 hooks the decoder's backward through
    the tensors of its output, which it finds in tuples, lists and dicts only.

    Attributes:
        logits: ``(N, V)`` logits over the decoder's output vocabulary, one row per target token.
        targets: ``(N,)`` class indices into ``V``; ``IGNORE_INDEX`` marks a row that only keeps
            the graph connected (a batch without any labelled row).
    """

    logits: torch.Tensor
    targets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """How many target tokens count in the loss."""
        return int((self.targets != IGNORE_INDEX).sum())


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor | float,
    hard_negatives: torch.Tensor | None = None,
    offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE of queries against in-batch targets (and optional hard negatives).

    Args:
        query: ``(B, D)`` normalised query embeddings of this rank.
        target: ``(N, D)`` normalised target embeddings of the global batch; the positive of
            ``query[i]`` is ``target[offset + i]``, every other row is a negative.
        logit_scale: ``1 / temperature``.
        hard_negatives: ``(M, D)`` extra negatives shared by all queries.
        offset: Index of this rank's first positive in ``target``.
        reduction: ``mean`` or ``sum`` over the queries.
    """
    candidates = target if hard_negatives is None else torch.cat([target, hard_negatives])
    logits = logit_scale * query @ candidates.T
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(logits, labels, reduction=reduction)


class LaMELoss(nn.Module):
    """InfoNCE on [EMBED] and the latent decoder's token cross-entropy, as named terms.

    The shape follows open_clip's ``ClipLoss``/``CoCaLoss`` (the loss owns the gather and
    returns its terms by name); the code is this project's. The terms are unweighted: the
    stage spec in force weights them (``lame_pl.module``).
    """

    def contrastive(
        self,
        query: torch.Tensor,
        target: torch.Tensor,
        negatives: torch.Tensor | None,
        logit_scale: torch.Tensor,
        gather: bool,
    ) -> torch.Tensor:
        """InfoNCE of this rank's queries; with ``gather``, against the global batch's targets and negatives.

        Computed in float32 with autocast off whatever the precision: at temperature 0.02,
        bfloat16 logits (~50) would be rounded to steps of 0.25.
        """
        rows, offset, ranks = query.shape[0], 0, 1
        if gather and world_size() > 1:
            target, sizes = gather_rows(target, sync_grads=True)
            offset, ranks = sum(sizes[: dist.get_rank()]), len(sizes)
            # Every rank joins the negatives' gather, with a tensor in the graph even when it has
            # none (a slice of its targets), so that every rank joins the backward too.
            negatives, _ = gather_rows(target[:0] if negatives is None else negatives, sync_grads=True)
            negatives = negatives if negatives.shape[0] else None
            rows = sum(sizes)  # one target per query
        with torch.autocast(query.device.type, enabled=False):
            negatives = None if negatives is None else negatives.float()
            total = info_nce(query.float(), target.float(), logit_scale.float(), negatives, offset, reduction="sum")
        return total / (rows / ranks)

    def decoder(self, predicted: DecoderLogits, num_tokens: int | None = None, gather: bool = False) -> torch.Tensor:
        """Token cross-entropy of the decoder's predictions, over ``num_tokens`` tokens.

        Args:
            predicted: The decoder's logits and targets (``LatentDecoder.forward``).
            num_tokens: Labelled tokens of the whole batch the term is a mean over; ``None`` is
                ``predicted``'s own. A chunk of a batch (GradCache) passes the batch's count, so
                that its chunks' terms sum to the batch's mean.
            gather: Divide by the global count over the world size (DDP's gradient average then
                gives the global batch's mean).

        Returns:
            The mean token cross-entropy; 0, still connected to every decoder weight, when the
            batch holds no labelled token.
        """
        count = predicted.num_tokens if num_tokens is None else num_tokens
        ranks = world_size() if gather else 1
        if gather and ranks > 1:
            count = global_count(count, predicted.logits.device)
        total = F.cross_entropy(predicted.logits.float(), predicted.targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (count / ranks) if count else total

    def forward(
        self,
        query: torch.Tensor,
        target: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        decoder: DecoderLogits | None = None,
        gather: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The terms the inputs allow: ``contrastive`` when targets are given, ``decoder`` when predictions are.

        Args:
            query: ``(B, D)`` query embeddings.
            target: ``(B, D)`` their positives' embeddings.
            negatives: ``(M, D)`` hard negatives' embeddings.
            logit_scale: ``1 / temperature`` (required with ``target``).
            decoder: The decoder's predictions for the batch's labelled rows.
            gather: Training across ranks: InfoNCE over the global batch, global normalisers.
        """
        terms: dict[str, torch.Tensor] = {}
        if target is not None:
            if logit_scale is None:
                raise ValueError("the contrastive term needs logit_scale")
            terms["contrastive"] = self.contrastive(query, target, negatives, logit_scale, gather)
        if decoder is not None:
            terms["decoder"] = self.decoder(decoder, gather=gather)
        return terms
