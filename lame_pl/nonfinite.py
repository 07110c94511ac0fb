"""Non-finite guard: a step whose loss or gradient is not finite changes no weight, and a run of them stops.

The decision is taken in ``LightningModule.on_before_optimizer_step``, where the gradient of the
whole optimiser step exists: after every micro-batch of an accumulation cycle and, under GradCache,
after the chunks that ``training_step`` back-propagates itself. Returning ``None`` from
``training_step`` (Lightning's own skip) cannot do this: GradCache's chunks are already in the
gradients by then, an accumulation cycle would still step on its other micro-batches, and under
DDP a rank that skips its backward leaves the others waiting in its all-reduce. A skipped step
drops every gradient (``grad = None``), so that AdamW leaves the weights and its state (moments,
step count) as they were; Lightning still counts the step (``global_step``) and steps the learning
rate schedule.

What it covers: a non-finite loss term; a gradient whose norm is not finite (a NaN or inf entry,
or a norm past float range); and a dead step, whose whole gradient is exactly zero while its loss
is not. The last is how a diverging learning rate shows with the backbone frozen: the first huge
update saturates the model, the loss then stays constant with a zero gradient, and AdamW's
momentum keeps growing the weights (by ~lr a step) without one. Weights that grow large with a
finite, non-zero gradient are not caught here.

Under a ``GradScaler`` (``precision: 16-mixed``) an inf gradient is the scaler's own overflow
signal (it skips that step and lowers the scale), so only the loss is checked there. Under
DeepSpeed the engine steps on gradient partitions of its own, which this guard cannot drop: the
first bad loss stops the run instead. A checkpoint is refused (``check_finite_weights``) when any
weight is not finite, whatever put it there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lame_pl.distributed import world_size

#: Checkpoint keys of the cumulative counts, so that a resumed run keeps counting.
NONFINITE_KEY = "lame_nonfinite_steps"
ZERO_GRADIENT_KEY = "lame_zero_gradient_steps"

# Parameter-name segments of wrappers (FSDP, torch.compile, PEFT) that say nothing about the part.
_WRAPPERS = {"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module", "base_model", "module"}


class NonFiniteError(RuntimeError):
    """A run stopped for non-finite losses or gradients, or a checkpoint refused for non-finite weights."""


def part_of(name: str) -> str:
    """The top-level part a parameter belongs to, e.g. ``encoder.backbone.visual`` or ``decoder.projector``."""
    parts = [p for p in name.split(".") if p not in _WRAPPERS]
    depth = 3 if parts[:2] == ["encoder", "backbone"] else 2
    return ".".join(parts[:depth])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (FSDP2's DTensor, ZeRO-3's partition), or the tensor itself."""
    # Take it before detach(): a detached ZeRO-3 parameter no longer carries its partition (ds_tensor).
    if hasattr(t, "to_local"):
        return t.to_local()
    partition = getattr(t, "ds_tensor", None)  # ZeRO-3 leaves an empty placeholder in the parameter
    return partition if isinstance(partition, torch.Tensor) else t


def _any_rank(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` OR-ed over all ranks (the same decision everywhere, or the ranks' weights part)."""
    if world_size() > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def _format(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in values.items())


class NonFiniteGuard:
    """Skips and counts optimiser steps with a non-finite loss or gradient norm (or a dead gradient); stops a run of them.

    A dead step is one whose whole gradient is exactly zero while its loss is not: a saturated
    model (seen after a diverging learning rate, with the loss then constant), which AdamW's
    momentum would otherwise keep moving without a gradient.

    Args:
        limit: Consecutive skipped steps at which the run stops (``model.max_nonfinite_steps``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0  # cumulative, logged as train/nonfinite_steps
        self.dead = 0  # cumulative, logged as train/zero_gradient_steps
        self.in_a_row = 0
        # The micro-batches' loss terms since the last optimiser step, kept on the device: read
        # only when the step is skipped, so that a good step costs one synchronisation.
        self._terms: list[dict[str, torch.Tensor]] = []

    def watch(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """Keeps one micro-batch's loss and terms for the check at the optimiser step."""
        self._terms.append({"loss": loss.detach(), **{name: value.detach() for name, value in terms.items()}})

    def check(
        self, named: Iterable[tuple[str, nn.Parameter]], step: int, check_gradients: bool = True, can_skip: bool = True
    ) -> bool:
        """Whether the step about to be taken is to be skipped; if so, drops the gradients of ``named``.

        Every rank must call it (it reduces the decision across ranks).

        Args:
            named: The optimiser's parameters with their names.
            step: The step, for messages.
            check_gradients: Check the gradient norm too (not under a ``GradScaler``, whose own
                overflow check skips steps with an inf gradient).
            can_skip: Whether dropping ``named``'s gradients skips the step. Under DeepSpeed the
                engine steps on gradient partitions of its own, so a bad step stops the run at once.

        Raises:
            NonFiniteError: This is the ``limit``-th skipped step in a row, or a bad step that
                cannot be skipped.
        """
        named = [(name, p) for name, p in named if p.grad is not None and _local(p.grad).numel()]
        terms, self._terms = self._terms, []
        device = named[0][1].device if named else torch.device("cpu")
        values = torch.cat(
            [torch.stack([v.float().reshape(()) for v in batch.values()]).to(device) for batch in terms]
            or [torch.zeros(1, device=device)]
        )
        norms = torch._foreach_norm([_local(p.grad) for _, p in named]) if named else []
        # (.to: a part offloaded to another device has its norm there.)
        total = (
            torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))
            if norms
            else torch.zeros((), device=device)
        )
        flags = torch.stack([~torch.isfinite(values).all(), ~torch.isfinite(total), total > 0, (values != 0).any()])
        bad_loss, bad_grad, moving, has_loss = (bool(f) for f in _any_rank(flags.float()).tolist())
        bad_grad = bad_grad and check_gradients
        dead = check_gradients and bool(named) and not moving and has_loss and not bad_loss
        if not (bad_loss or bad_grad or dead):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if dead:
            self.dead += 1
        else:
            self.total += 1
        detail = self._detail(named, norms, terms, bad_loss, bad_grad)
        if not can_skip:
            raise NonFiniteError(f"stopping at step {step}: under DeepSpeed a step cannot be skipped, {detail}")
        for _, p in named:
            p.grad = None
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"stopping at step {step} after {self.in_a_row} skipped steps in a row "
                f"(model.max_nonfinite_steps={self.limit}), {detail}"
            )
        rank_zero_warn(
            f"step {step} skipped ({self.in_a_row} in a row; {self.total} non-finite, "
            f"{self.dead} with a zero gradient in all), {detail}"
        )
        return True

    @staticmethod
    def _detail(
        named: list[tuple[str, nn.Parameter]],
        norms: list[torch.Tensor],
        terms: list[dict[str, torch.Tensor]],
        bad_loss: bool,
        bad_grad: bool,
    ) -> str:
        """What went wrong: the loss terms, and the largest gradient norms and weights by part."""
        batches = [{k: float(v) for k, v in batch.items()} for batch in terms]
        shown = next((b for b in batches if not all(map(math.isfinite, b.values()))), batches[-1] if batches else {})
        grad_norm: dict[str, float] = {}
        weight: dict[str, float] = {}
        for (name, p), norm in zip(named, norms, strict=True):
            part = part_of(name)
            grad_norm[part] = math.hypot(grad_norm.get(part, 0.0), float(norm))
            peak, seen = float(_local(p).detach().abs().max()), weight.get(part, 0.0)
            weight[part] = seen if not math.isfinite(seen) or seen >= peak else peak  # NaN sticks

        def largest(values: dict[str, float]) -> str:  # non-finite first, then the largest
            ranked = sorted(values.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf, reverse=True)
            return _format(dict(ranked[:4])) or "none"

        what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradient norm", bad_grad)) if bad)
        what = f"non-finite {what}" if what else "zero gradient with a non-zero loss (a saturated model)"
        return (
            f"{what}: {_format(shown) or 'no loss terms'}; largest gradient norms: {largest(grad_norm)}; "
            f"largest weights: {largest(weight)}"
        )


def check_finite_weights(module: nn.Module, step: int) -> None:
    """Raises, naming the first non-finite parameter or buffer, rather than let a checkpoint of it be written.

    Every rank must call it (it reduces across ranks).
    """
    named = [
        (n, t)
        for n, t in (*module.named_parameters(), *module.named_buffers())
        if t.is_floating_point() and _local(t).numel()
    ]
    if not named:
        return
    # The largest magnitude of each tensor: NaN propagates through max, inf is inf.
    norms = torch._foreach_norm([_local(t).detach() for _, t in named], ord=math.inf)
    peaks = torch.stack([n.float().to(norms[0].device) for n in norms])
    finite = torch.isfinite(peaks)
    if bool(_any_rank((~finite.all()).float().reshape(1)).item()):
        bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        where = bad[0] if bad else "a parameter on another rank"
        raise NonFiniteError(f"refusing to save a checkpoint at step {step}: {where} is not finite")
