"""What the ranks of a distributed run exchange, for the loss and the metrics alike.

``torch.distributed`` directly, not the strategy's ``all_gather``: the loss object runs the same
under DDP and FSDP2, and ranks may hold different numbers of rows, which Lightning's gather
(equal shapes) does not allow.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size() -> int:
    """Processes in the default group (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_count(count: int | float, device: torch.device) -> float:
    """The sum of ``count`` over all ranks (``count`` itself in one process)."""
    if world_size() == 1:
        return float(count)
    total = torch.tensor([float(count)], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def gather_rows(x: torch.Tensor, sync_grads: bool = False) -> tuple[torch.Tensor, list[int]]:
    """All ranks' rows of ``x`` in rank order, and how many rows each rank gave.

    Ranks may hold different numbers of rows (a short last batch, hard negatives per row). With
    ``sync_grads`` the gather is differentiable: the gradient of every rank's loss with respect
    to this rank's rows comes back to this rank (``torch.distributed.nn``'s all-gather), which
    is what makes each rank's encoder learn from the global batch.
    """
    if world_size() == 1:
        return x, [x.shape[0]]
    sizes_tensor = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes_tensor) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes_tensor)
    sizes = [int(s.item()) for s in all_sizes]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0])).contiguous()
    if sync_grads:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]), sizes


def split_retrieval_metrics(query: torch.Tensor, local_target: torch.Tensor, split: str) -> dict[str, float]:
    """Retrieval metrics of a split held across ranks, row ``i`` of each rank's queries matching
    row ``i`` of its targets; every rank must call it (it gathers).

    Each rank ranks its own queries against every rank's targets, so each query is ranked once,
    and only the ranks, one integer per query, travel back. Targets arrive in rank order, so
    this rank's gold targets start after those of the ranks before it.

    Returns:
        ``{split}/<metric>`` (``lame_pl.retrieval``), and for ``test`` the number of candidates and
        chance's metrics; empty when no rank held a query.
    """
    from lame_pl.retrieval import chance_metrics, gold_ranks, metrics_from_ranks

    target, sizes = gather_rows(local_target)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    gold = sum(sizes[:rank]) + torch.arange(query.shape[0], device=query.device)
    ranks = gold_ranks(query, target, gold) if query.shape[0] else gold
    ranks = gather_rows(ranks[:, None])[0].flatten()
    if ranks.numel() == 0:
        return {}
    metrics = {f"{split}/{name}": value for name, value in metrics_from_ranks(ranks).items()}
    if split == "test":
        metrics["test/num_candidates"] = float(target.shape[0])
        metrics.update({f"chance/{name}": value for name, value in chance_metrics(target.shape[0]).items()})
    return metrics
