"""One optimiser step of a fixed global batch through Lightning's Trainer, on one process or as two
ranks (gloo, CPU; DDP, FSDP2 or DeepSpeed ZeRO-2/3) that each hold half of it; rank 0 saves every
trainable parameter's gradient.

    python tests/gradcache_ddp_run.py --devices 2 --strategy fsdp --chunk 2 --out DIR
    python tests/gradcache_ddp_run.py --devices 2 --strategy ddp,fsdp --chunk 2,0 --out DIR  # four runs: OUT/ddp-2 ...

Used by tests/test_gradcache.py and tests/test_deepspeed.py: the gradients of the runs must agree.
DeepSpeed keeps its gradients in its own partitions, so under it the step is SGD with lr 1 and
what is saved is the update (the gradient, through DeepSpeed's own optimiser step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from PIL import Image

from lame_pl import BackboneSpec, DecoderSpec, LaMEModule
from lame_pl.backbone import build_processor
from lame_pl.datamodules.collate import PairCollator
from lame_pl.prompt import PromptProcessor, Side

# Not conftest's: this script also runs where pytest is not installed (tools/device_check.sh).
IMAGE_SIDE = 56
CAPTIONS = [
    "a red circle at the top left",
    "two blue squares in the center",
    "three purple squares on the left",
    "a green triangle at the bottom right and a yellow circle at the top",
]

ROWS = 8
# Rank 1's queries are text: its passes hold no image where rank 0's do (ZeRO-3 then needs the
# same submodules run on both ranks, lame_pl.sharding.uniform_submodules).
TEXT_QUERIES = [False, False, False, False, True, True, True, True]
# Ranks hold different numbers of labelled rows and of hard negatives: the global normalisers
# and the uneven gathers are what this run checks.
LABELLED = [True, True, True, False, False, False, True, False]
# Rank 1 has none: under FSDP2 it must still run as many forwards as rank 0.
NEGATIVES = [["a black hexagon", "nothing at all here", "two red lines"], []]


def random_image(rng: random.Random) -> Image.Image:
    return Image.frombytes("RGB", (IMAGE_SIDE, IMAGE_SIDE), bytes(rng.getrandbits(8) for _ in range(IMAGE_SIDE**2 * 3)))


def rank_batch(rank: int, world: int) -> dict:
    """Rows ``[rank * ROWS / world, (rank + 1) * ROWS / world)`` of the global batch, and that rank's negatives."""
    spec = BackboneSpec(preset="tiny", min_pixels=IMAGE_SIDE * IMAGE_SIDE, max_pixels=IMAGE_SIDE * IMAGE_SIDE)
    processor = build_processor(spec)
    rng = random.Random(0)
    samples = [
        {"key": f"{i}", "image": random_image(rng), "text": CAPTIONS[i % 4] + " and so on" * (i % 3)}
        for i in range(ROWS)
    ]
    size = ROWS // world
    rows = slice(rank * size, (rank + 1) * size)
    batch = PairCollator(processor, "Find the caption of this image.")(samples[rows])
    batch["query"] = PromptProcessor(processor, 64)(
        [
            Side("Find the caption matching this description.", f"picture: {s['text']}")
            if text
            else Side("Find the caption of this image.", "", [s["image"]])
            for s, text in zip(samples[rows], TEXT_QUERIES[rows], strict=True)
        ]
    )
    batch["decoder"]["labelled"] = torch.tensor(LABELLED[rows])
    negatives = [text for part in NEGATIVES[rank * 2 // world : (rank + 1) * 2 // world] for text in part]
    if negatives:
        batch["negative"] = PromptProcessor(processor, 64)([Side("", text) for text in negatives])
    return batch


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy without its CUDA-only checks: DeepSpeed itself runs on gloo ranks."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, optimizer


def deepspeed_strategy(stage: int, accelerator: str) -> DeepSpeedStrategy:
    """ZeRO ``stage``, on the CPU through ``CPUDeepSpeedStrategy``."""
    config = {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": ROWS // 2,
        "zero_allow_untested_optimizer": True,
    }
    return (CPUDeepSpeedStrategy if accelerator == "cpu" else DeepSpeedStrategy)(config=config)


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 parameter (ZeRO-3 holds a partition on each rank)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().clone()
    return param.detach().clone().float()


class SaveUpdate(Callback):
    """Saves, on rank 0, how the step moved each trainable parameter: with SGD at lr 1, its gradient."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = {n: _full(p) for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = {n: self.before[n] - _full(p) for n, p in pl_module.named_parameters() if p.requires_grad}
        if trainer.global_rank == 0:
            torch.save(update, self.path)
            losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")}
            self.path.with_name("losses.json").write_text(json.dumps(losses))


class SaveGradients(Callback):
    """Saves the synchronised gradients after the step (the optimiser does not clear them), on rank 0.

    Not at ``on_before_optimizer_step``: callbacks see it before the module, whose hook averages
    the temperature's gradient under FSDP2.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = {}
        for name, p in pl_module.named_parameters():
            if p.requires_grad:  # FSDP2 holds shards: every rank joins in assembling each gradient
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = grad.detach().clone()
        if trainer.global_rank == 0:
            torch.save(grads, self.path)
            losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")}
            self.path.with_name("losses.json").write_text(json.dumps(losses))


STRATEGIES = ("ddp", "fsdp", "deepspeed2", "deepspeed3")


def strategy_names(text: str) -> list[str]:
    """``"ddp,fsdp"`` -> ``["ddp", "fsdp"]``, each one of ``STRATEGIES``."""
    names = text.split(",")
    for name in names:
        if name not in STRATEGIES:
            raise argparse.ArgumentTypeError(f"--strategy {name!r}: not one of {', '.join(STRATEGIES)}")
    return names


def chunk_sizes(text: str) -> list[int]:
    """``"2,0"`` -> ``[2, 0]``: the GradCache chunk size of each run (0 for the plain step)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunk {text!r}: comma-separated whole numbers, e.g. 2 or 2,0") from None
    if any(size < 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"--chunk {text!r}: a chunk size is 0 (the plain step) or more")
    return sizes


def fit(args: argparse.Namespace, batch: dict, strategy_name: str, chunk: int, out: Path) -> None:
    """``args.steps`` optimiser steps of a freshly seeded module with GradCache chunks of ``chunk``; saves into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = LaMEModule(
        BackboneSpec(preset="tiny", min_pixels=IMAGE_SIDE * IMAGE_SIDE, max_pixels=IMAGE_SIDE * IMAGE_SIDE),
        DecoderSpec(preset="tiny"),
        num_reason_tokens=2,
        stage=2,
        learnable_temperature=True,
        gradcache_chunk_size=chunk or None,
    )
    strategy = "auto" if args.devices == 1 else "ddp"
    save = SaveGradients(out / "grads.pt")
    if strategy_name == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    if strategy_name.startswith("deepspeed"):
        strategy = deepspeed_strategy(int(strategy_name[-1]), args.accelerator)
        module.configure_optimizers = lambda: torch.optim.SGD(
            [p for p in module.parameters() if p.requires_grad], lr=1.0
        )
        save = SaveUpdate(out / "grads.pt")
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[save, ModelCheckpoint(out / "checkpoints", save_last=True, save_top_k=0)],
    )
    loader = torch.utils.data.DataLoader([batch] * args.steps, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, loader, ckpt_path=args.resume)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument(
        "--strategy",
        type=strategy_names,
        default=["ddp"],
        help=f"one of {', '.join(STRATEGIES)}, or several comma-separated (run one after the other)",
    )
    parser.add_argument("--accelerator", default="cpu", help="cpu (the tests) or gpu (tools/device_check.sh)")
    parser.add_argument(
        "--chunk",
        type=chunk_sizes,
        default=[0],
        help="GradCache chunk size; 0 for the plain step; several (2,0) run one after the other in "
        "the same processes, each saving into OUT/<strategy>-<chunk>",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps (the saved update is the last one's)")
    parser.add_argument("--resume", default=None, help="a checkpoint of an earlier run to resume from")
    args = parser.parse_args()
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the child process
    batch = rank_batch(rank, args.devices)
    runs = [(name, chunk) for name in args.strategy for chunk in args.chunk]
    for name, chunk in runs:
        # Later runs reuse the ranks and the process group of the first (Lightning launches once): a
        # process start and its imports cost more than the step itself.
        fit(args, batch, name, chunk, args.out if len(runs) == 1 else args.out / f"{name}-{chunk}")


if __name__ == "__main__":
    main()
