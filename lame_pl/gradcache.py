"""GradCache (Gao et al., 2021): the gradient of a full-batch contrastive loss at the memory of a chunk.

InfoNCE couples every query with every target of the (global) batch, so its gradient cannot be
had by accumulating small batches. GradCache splits the step in two passes:

1. Encode every chunk of queries, targets and hard negatives *without* a graph, and keep only
   the embeddings; compute InfoNCE over the whole batch (gathered across ranks) on them and take
   its gradient with respect to each embedding (and the learnable temperature).
2. Encode each chunk again, *with* a graph, under the random state of its first pass (same
   dropout), and back-propagate ``<embedding, cached gradient>``; the decoder term, which
   depends on a row alone, is added to the query chunks here. Chunk i of the queries, of the
   targets and of the negatives go back together: a chunk holds what a plain step of
   ``chunk_size`` rows holds, and each backward costs a fixed amount (a trained embedding
   table's dense gradient is filled and added whole every time).

The parameters' gradients are those of the full batch; only one chunk's activations are alive
at a time. VLM2Vec trains its 2B models with a global batch of 1024 in chunks of 8 this way.

Inside Lightning's automatic optimisation, the chunks but the last are back-propagated during
``training_step`` (through the strategy's own ``backward``, so that its precision plugin scales
them as it scales a loss), and the last chunk's graph is what ``training_step`` returns:
Lightning back-propagates it, which is where DDP all-reduces the gradients accumulated over all
chunks (DeepSpeed's engine is told that the chunks before it are off its accumulation boundary,
and ZeRO-3's that each of them ends a micro-step).
Gradient accumulation, clipping, schedulers, logging and checkpoints stay Lightning's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lame_pl.distributed import global_count, world_size
from lame_pl.row_chunks import first_row, split_rows
from lame_pl.sharding import lockstep

if TYPE_CHECKING:
    from lame_pl.module import LaMEModule


@dataclass
class RandomState:
    """The CPU and CUDA generators' state before a forward pass, to replay its dropout masks."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        """The generators' state now (CUDA's only for ``device``, the one the pass runs on)."""
        cuda = {}
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda[index] = torch.cuda.get_rng_state(index)
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Runs the block from this state, then puts the generators back where they were."""
        with torch.random.fork_rng(devices=list(self.cuda), device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for index, state in self.cuda.items():
                torch.cuda.set_rng_state(state, index)
            yield


class HostBatch(Mapping):
    """A training batch left in host memory, read-only, that ``DistributedDataParallel`` passes as is.

    With ``device_ids`` set (every GPU run), DDP moves its forward's inputs to its device before
    calling the module, descending into tensors, lists, tuples and dicts: the whole batch, which
    GradCache exists not to hold there. DDP has no switch for this, and a ``Mapping`` that is not
    a ``dict`` is one of the types it leaves alone. Code that reads the batch (``batch["query"]``,
    ``batch.get("skipped")``, ``"decoder" in batch``) reads it as before.
    """

    __slots__ = ("_batch",)

    def __init__(self, batch: Mapping[str, Any]) -> None:
        self._batch = batch

    def __getitem__(self, key: str) -> Any:
        return self._batch[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._batch)

    def __len__(self) -> int:
        return len(self._batch)

    def __repr__(self) -> str:
        return f"HostBatch({sorted(self._batch)})"


def _rows(inputs: dict[str, torch.Tensor], start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value[start:stop].to(device, non_blocking=True) for key, value in inputs.items()}


def _to(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One chunk on the device (the batch stays where the data loader left it: ``LaMEModule.transfer_batch_to_device``)."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }


def _labelled_tokens(labels: dict[str, torch.Tensor]) -> int:
    """Real target tokens of the rows that carry a decoder label (every row when unmarked)."""
    mask = labels["attention_mask"]
    labelled = labels.get("labelled")
    return int(mask.sum() if labelled is None else mask[labelled.to(mask.device).bool()].sum())


def _anchor(module: LaMEModule) -> torch.Tensor:
    """0, in the graph of every parameter the stage trains.

    DDP all-reduces a parameter's gradient only when the synced backward reaches it; the last
    chunk's graph may miss some (a text-only chunk misses the vision tower) whose gradients the
    earlier chunks accumulated. With this term each one is reduced, and reduced once.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return sum((p.reshape(-1)[:1].sum() for p in params), torch.zeros((), device=module.device)) * 0.0


def _needs_anchor(module: LaMEModule) -> bool:
    if module._trainer is None or world_size() == 1:
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module.trainer.strategy.model, DistributedDataParallel)


def gradcache_step(
    module: LaMEModule, batch: Mapping[str, Any], chunk_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step of ``module`` on ``batch`` in chunks of ``chunk_size`` rows.

    Returns:
        The tensor for Lightning to back-propagate (the step's loss in value, the last chunk's
        graph in gradient), and the unweighted terms (detached) for logging.
    """
    spec = module.stage_spec
    contrastive = spec.contrastive_loss_weight > 0
    decodes = module.decodes and spec.decoder_loss_weight > 0
    merge = module.encoder.spatial_merge_size
    names = ["query", "target", "negative"] if contrastive else ["query"]
    chunks = {name: split_rows(batch[name], chunk_size, merge) if name in batch else [] for name in names}
    runs = lockstep(module, {name: len(parts) for name, parts in chunks.items()})
    # What a rank short of chunks encodes to keep in step with the others (its first query row).
    idle = first_row(batch["query"], merge) if runs != {n: len(c) for n, c in chunks.items()} else None
    terms: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    states: dict[str, list[RandomState]] = {}
    scale_grad = None
    if contrastive:  # pass 1: the loss over the whole batch on embeddings without a graph
        embeddings: dict[str, torch.Tensor | None] = {}
        with torch.no_grad():
            for name in names:
                states[name], parts = [], []
                for i in range(runs[name]):
                    states[name].append(RandomState.capture(module.device))
                    out = module.encode(_to(chunks[name][i] if i < len(chunks[name]) else idle, module.device))
                    if i < len(chunks[name]):
                        parts.append(out.embedding)
                embeddings[name] = torch.cat(parts).detach().requires_grad_() if parts else None
        value = module.criterion.contrastive(
            embeddings["query"], embeddings["target"], embeddings["negative"], module.logit_scale, gather=True
        )
        leaves = [name for name in names if embeddings[name] is not None]
        learns_scale = module.log_logit_scale.requires_grad
        found = torch.autograd.grad(
            spec.contrastive_loss_weight * value,
            [embeddings[name] for name in leaves] + ([module.log_logit_scale] if learns_scale else []),
        )
        grads = dict(zip(leaves, found[: len(leaves)], strict=True))
        scale_grad = found[-1] if learns_scale else None
        terms["contrastive"] = value.detach()
    labels = batch.get("decoder")
    if decodes:
        # Chunks' decoder terms are sums over their tokens divided by the batch's (global) count,
        # computed here once: no collective may run per chunk (ranks may hold different counts).
        tokens = global_count(_labelled_tokens(labels), module.device) / world_size()
        decoder_sum = torch.zeros((), device=module.device)
    # Pass 2: chunk i of every side together (its queries, targets and negatives, as a plain step
    # of chunk_size rows holds them), each back-propagated on its own but the last.
    steps = max(runs.values())
    accumulate = module.trainer.accumulate_grad_batches if module._trainer is not None else 1
    final = None
    for i in range(steps):
        surrogate = torch.zeros((), device=module.device)
        for name in names:
            if i >= runs[name]:  # more chunks of negatives than of rows
                continue
            with states[name][i].replay() if contrastive else nullcontext():
                out = module.encode(_to(chunks[name][i] if i < len(chunks[name]) else idle, module.device))
            if i >= len(chunks[name]):  # in step with the other ranks, adding nothing
                surrogate = surrogate + out.embedding.sum() * 0.0
                if name == "query" and decodes:  # the decoder's units run as often as on the others
                    filler = module.decoder(out.reason_states, **_rows(labels, 0, 1, module.device))
                    surrogate = surrogate + module.criterion.decoder(filler, num_tokens=1) * 0.0
                continue
            start = i * chunk_size
            stop = start + out.embedding.shape[0]
            if contrastive:
                surrogate = surrogate + (out.embedding * grads[name][start:stop]).sum()
            if name == "query" and decodes:
                predicted = module.decoder(out.reason_states, **_rows(labels, start, stop, module.device))
                term = module.criterion.decoder(predicted, num_tokens=tokens)
                surrogate = surrogate + spec.decoder_loss_weight * term
                decoder_sum = decoder_sum + term.detach()
        if i < steps - 1:
            _backward(module, surrogate / accumulate)
            continue
        if scale_grad is not None:
            surrogate = surrogate + (module.log_logit_scale * scale_grad).sum()
        if _needs_anchor(module):
            surrogate = surrogate + _anchor(module)
        final = surrogate
    if decodes:
        terms["decoder"] = decoder_sum
    loss = module.weighted(terms)
    # The value of the step's loss, the gradient of the last chunk's surrogate.
    return final - final.detach() + loss, terms


def _backward(module: LaMEModule, surrogate: torch.Tensor) -> None:
    """Back-propagates one chunk's surrogate the way Lightning back-propagates a loss."""
    if module._trainer is None:
        surrogate.backward()
        return
    strategy = module.trainer.strategy
    optimizer = module.trainer.optimizers[0] if module.trainer.optimizers else None
    engine = strategy.model
    managed = getattr(engine, "managed_gradient_accumulation", lambda: True)
    if not hasattr(engine, "set_gradient_accumulation_boundary") or not managed():
        strategy.backward(surrogate, optimizer)
        return
    # DeepSpeed: each backward on the engine's accumulation boundary (every backward when
    # accumulate_grad_batches is 1) makes ZeRO-2 rebuild its gradient partition from that
    # backward alone, dropping the chunks before it. The chunks inside the step are marked
    # off the boundary; Lightning's backward of the last chunk keeps the engine's own count.
    saved = engine._is_gradient_accumulation_boundary
    engine.set_gradient_accumulation_boundary(False)
    try:
        strategy.backward(surrogate, optimizer)
    finally:
        engine._is_gradient_accumulation_boundary = saved
    if engine.zero_optimization_partition_weights():
        # ZeRO-3 copies (rather than adds) a backward's gradient partitions until it has counted a
        # micro-step, which it does at the engine's next forward; the chunks all run inside one
        # forward, so each would overwrite the one before. This one is counted now.
        engine.optimizer.clear_backward_seen_flag()
