"""What the ranks of a distributed run exchange for the loss: rows of every rank, and global counts.

``torch.distributed`` directly, not the strategy's ``all_gather``: the loss object runs the same
under DDP and FSDP2, and ranks may hold different numbers of rows, which Lightning's gather
(equal shapes) does not allow. The whole-split retrieval metrics gather through torchmetrics
instead (``lame_pl.retrieval_metric.SplitRetrieval``).
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
