"""How the module is spread over ranks beyond DDP: FSDP2 sharding, and what each strategy supports.

Lightning's ``ModelParallelStrategy`` calls ``LaMEModule.configure_model``, which shards with
FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block of the backbone's language
model and of the decoder (the blocks transformers itself never splits, ``_no_split_modules``)
becomes a unit, then the encoder (vision tower, embeddings, reason vectors, projection) and the
decoder; the temperature stays whole on every rank, its gradient averaged. Every rank must run
the same units as often as the others (each forward gathers a unit's shards, each backward
reduce-scatters its gradients): hence the vision tower in the encoder's unit (ranks differ in
which chunks hold images) with every parameter in the reduce-scatter, and ranks short of hard
negatives run zero-weighted forwards (``lockstep``). Ranks may hold different numbers of
evaluation batches, so validation, test and predict are refused on several FSDP2 ranks
(evaluate the single-file checkpoint under DDP or with the evaluators). FSDP2 keeps each parameter's dtype and ``requires_grad``, so a stage's freezing
holds; it needs one dtype per unit, so the backbone is loaded in float32 (``bf16-mixed``
computes in bfloat16).

GradCache back-propagates chunks inside ``training_step``; Lightning's ``FSDPStrategy`` (FSDP1)
runs ``training_step`` inside its root unit's forward and asserts on that (seen on a CPU probe),
so it is refused with GradCache. DeepSpeed ZeRO-2 takes GradCache's chunks off its accumulation
boundary (``lame_pl.gradcache._backward``) and then gives DDP's gradients.

DeepSpeed ZeRO-3 gathers each submodule's parameters around its own forward and backward, so
every rank must run the same submodules in the same order at every step. Ranks run as many
forwards of each kind as each other (``lockstep``, as under FSDP2), and every encoder pass runs
the vision tower, on a blank image where its rows have none (``uniform_submodules``,
``LaMEEncoder.idle_vision``): a rank of text-only rows would otherwise skip the tower that
another rank's images run. As under FSDP2, evaluation loops on several ranks are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lame_pl.distributed import world_size

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

    from lame_pl.module import LaMEModule


def check_strategy(strategy: Strategy, gradcache_chunk_size: int | None) -> None:
    """Raises when the strategy cannot run what the module is configured to do."""
    from lightning.pytorch.strategies import FSDPStrategy

    if gradcache_chunk_size is None:
        return
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "model.gradcache_chunk_size is set but the trainer's strategy is FSDPStrategy (FSDP1), whose gradients "
            "GradCache cannot accumulate; use DDP, DeepSpeed ZeRO-2 or ModelParallelStrategy (FSDP2, "
            "configs/strategy/fsdp.yaml) with GradCache, or set model.gradcache_chunk_size null"
        )


def zero3(strategy: Strategy | None) -> bool:
    """Whether ``strategy`` is DeepSpeed at ZeRO stage 3, which gathers each submodule's parameters in its forward."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    return (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage") == 3


def uniform_submodules(module: LaMEModule) -> None:
    """Under ZeRO-3 on several ranks, makes every encoder pass run the vision tower (see the module docstring)."""
    module.encoder.vision_every_pass = world_size() > 1 and zero3(module.trainer.strategy)


def _gathers_per_forward(module: LaMEModule) -> bool:
    """Whether each forward gathers parameters on every rank: FSDP2 or ZeRO-3, on several ranks."""
    if world_size() == 1:
        return False
    return module.device_mesh is not None or (module._trainer is not None and zero3(module.trainer.strategy))


def _language_blocks(module: LaMEModule) -> list[nn.Module]:
    """The transformer blocks of the backbone's language model and of the decoder.

    The vision tower's blocks stay in the encoder's unit: a rank whose chunk has no image skips
    them, and a unit that one rank runs and another does not would desynchronise the gathers.
    """
    models = [module.encoder.backbone.language_model]
    if module.decoder is not None:
        models.append(module.decoder.language_model)
    names = set()
    for model in (module.encoder.backbone, *models[1:]):
        names.update(getattr(model, "_no_split_modules", None) or ())
    return [block for model in models for block in model.modules() if type(block).__name__ in names]


def shard(module: LaMEModule) -> None:
    """Applies FSDP2 to ``module`` over its data-parallel mesh (``ModelParallelStrategy``); a no-op elsewhere."""
    mesh = module.device_mesh
    if mesh is None:
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module.encoder, FSDPModule):  # configure_model runs again on a later fit
        return
    if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "lame_pl shards with FSDP2 only: set the ModelParallelStrategy's tensor_parallel_size to 1 and "
            f"data_parallel_size to the number of devices (got a tensor-parallel size of {mesh['tensor_parallel'].size()})"
        )
    data_parallel = mesh["data_parallel"] if "data_parallel" in mesh.mesh_dim_names else mesh
    dtypes = {p.dtype for p in module.parameters()}
    if len(dtypes) > 1:
        raise ValueError(
            f"FSDP2 needs one parameter dtype per unit, but the module holds {sorted(str(d) for d in dtypes)}: load "
            "backbone and decoder in float32 (backbone.dtype, decoder.dtype) and train under precision bf16-mixed"
        )
    blocks = _language_blocks(module)
    if not blocks:
        raise ValueError("no transformer block (the models' _no_split_modules) found in the language models to shard")
    for block in blocks:
        fully_shard(block, mesh=data_parallel)
    # The encoder and the decoder are the outer units: Lightning calls training_step, never the
    # LightningModule's forward, so a unit around the whole module would never gather its shards.
    fully_shard(module.encoder, mesh=data_parallel)
    if module.decoder is not None:
        fully_shard(module.decoder, mesh=data_parallel)
    # A unit reduce-scatters the gradients its parameters received; a trained vision tower gets
    # none on a rank whose chunk has no image, so every parameter takes part (zeros) to keep the
    # ranks' reduce-scatters the same size.
    for unit in (module.encoder, module.decoder):
        if unit is not None:
            unit.set_reduce_scatter_unused_params(True)


def average_unsharded_gradients(module: LaMEModule) -> None:
    """Averages, over the ranks, the gradients of what no FSDP2 unit holds (the temperature).

    FSDP2 reduces only its units' gradients; the module's own parameters (one number) stay whole
    on every rank. Called before each optimiser step, on every rank, as DDP would average them.
    """
    if module.device_mesh is None:
        return
    import torch.distributed as dist

    mesh = module.device_mesh
    group = (mesh["data_parallel"] if "data_parallel" in mesh.mesh_dim_names else mesh).get_group()
    for param in module.parameters(recurse=False):
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG, group=group)


def lockstep(module: LaMEModule, counts: dict[str, int]) -> dict[str, int]:
    """How many forwards of each kind every rank runs: the most over ranks under FSDP2 and ZeRO-3, else this rank's.

    Each FSDP2 unit (ZeRO-3 submodule) gathers its shards in every forward, so ranks must run as
    many forwards as each other; a rank short of some (fewer hard negatives, or none) runs
    zero-weighted ones.
    """
    import torch.distributed as dist

    if not _gathers_per_forward(module):
        return counts
    most = torch.tensor(list(counts.values()), device=module.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return dict(zip(counts, most.tolist(), strict=True))


def check_evaluation(module: LaMEModule, what: str) -> None:
    """Raises before an evaluation loop on several FSDP2 or ZeRO-3 ranks, which could hang (uneven batch counts)."""
    if not _gathers_per_forward(module):
        return
    name = "ModelParallelStrategy (FSDP2)" if module.device_mesh is not None else "DeepSpeed ZeRO-3"
    raise ValueError(
        f"{what} under {name} on several ranks is not supported: ranks may hold different numbers of batches, and "
        "each forward gathers shards on every rank; set trainer.limit_val_batches 0 (or no val_shards) for fit, and "
        "evaluate the checkpoint (one file) under DDP or with tools/eval_mmeb.py"
    )
