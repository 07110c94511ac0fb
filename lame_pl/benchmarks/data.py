"""Data-throughput benchmark: is the input pipeline ever the bottleneck of a training step?

For each worker count it times the training loader of ``datamodules.ImageTextDataModule``
(read shards, shuffle, decode, resize and tokenize through the backbone's processor, collate)
after a few warm-up batches, and reports decoded-and-processed samples per second, per
worker, and the data time per batch. It then times one training step of ``LaMEModule`` in the
demo's stage-2 setting (K=8, vision tower and language model trained, InfoNCE + 0.5 x decoder
loss, gradient clipping at 1.0, AdamW over the trainable parameters) on a fixed batch, and
reports data time per batch / step time: below 1, the loader keeps up.

Both are measured apart, each with the whole machine. With ``--train-steps N`` it also runs N
real steps fed by each loader and reports how long each step waited for its batch; on a
machine with few cores the workers and the step share them, which this figure includes.

    python tools/make_shards.py synthetic --out /tmp/bench_data
    python tools/decoder_vocab.py /tmp/bench_data/train --out /tmp/bench_data/vocab.json
    python tools/bench_data.py --shards /tmp/bench_data/train --decoder-vocab /tmp/bench_data/vocab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lame_pl import BackboneSpec, DecoderSpec, LaMEModule, StageSpec
from lame_pl.backbone import DECODER_PRESETS
from lame_pl.benchmarks import common
from lame_pl.datamodules import ImageTextDataModule


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="training shards: a folder, a glob or a brace pattern")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time (default 0 1 2)"
    )
    parser.add_argument(
        "--batches", type=_positive_int, default=100, help="timed batches per worker count (default 100)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first: worker start-up, buffer fill")
    parser.add_argument("--preset", default="demo", help="backbone preset (default demo)")
    parser.add_argument(
        "--decoder-preset",
        default=None,
        help="decoder preset (default: --preset when it names a decoder preset, else demo)",
    )
    parser.add_argument("--decoder-vocab", default=None, help="decoder.vocab_file (tools/decoder_vocab.py output)")
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        default=112,
        help="image side; min_pixels = max_pixels = side^2 (default 112)",
    )
    parser.add_argument("--shuffle-buffer", type=_positive_int, default=1000, help="shuffle buffer (default 1000)")
    parser.add_argument(
        "--steps", type=_positive_int, default=10, help="timed training steps, median reported (default 10)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="also run this many steps fed by each loader and time the wait for data (default 0)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    return parser


def time_loader(datamodule: ImageTextDataModule, warmup: int, batches: int) -> tuple[float, float]:
    """Seconds for ``batches`` batches after ``warmup`` untimed ones, and the start-up seconds."""
    start = time.perf_counter()
    loader = iter(datamodule.train_dataloader())
    for _ in range(warmup):
        next(loader)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - start
    del loader  # ends the worker processes before the next measurement
    return elapsed, startup


def build_module(args: argparse.Namespace, backbone: BackboneSpec) -> tuple[LaMEModule, torch.optim.Optimizer]:
    """The demo's stage-2 module and its optimiser (AdamW over the trainable parameters)."""
    decoder_preset = args.decoder_preset or (args.preset if args.preset in DECODER_PRESETS else "demo")
    module = LaMEModule(
        backbone,
        DecoderSpec(preset=decoder_preset, vocab_file=args.decoder_vocab),
        num_reason_tokens=8,
        stage=2,
        stage2=StageSpec(
            train_vision_tower=True, train_language_model=True, contrastive_loss_weight=1.0, decoder_loss_weight=0.5
        ),
        temperature=0.05,
        lr=1e-4,
    )
    # configure_optimizers without a trainer gives the demo's AdamW (constant lr, no scheduler).
    return module, module.configure_optimizers()


def train_step(module: LaMEModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    """One forward + backward + optimiser step, as the demo trainer runs it; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss, _, _ = module.model_step(batch, "train")
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return float(loss.detach())


def time_steps(module: LaMEModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any], steps: int) -> list[float]:
    """Seconds per step on one fixed batch, after two untimed steps."""
    for _ in range(2):
        train_step(module, optimizer, batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(module, optimizer, batch)
        times.append(time.perf_counter() - start)
    return times


def time_fed_steps(
    module: LaMEModule, optimizer: torch.optim.Optimizer, datamodule: ImageTextDataModule, steps: int
) -> float:
    """Mean seconds each of ``steps`` training steps waited for its batch, after two untimed steps."""
    loader = iter(datamodule.train_dataloader())
    waited = 0.0
    for i in range(steps + 2):
        start = time.perf_counter()
        batch = next(loader)
        if i >= 2:
            waited += time.perf_counter() - start
        train_step(module, optimizer, batch)
    del loader
    return waited / steps


def machine() -> dict[str, Any]:
    """What the figures were measured on (no device: the loader and the step run on the CPU)."""
    return {k: v for k, v in common.machine("cpu").items() if k != "device"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(w < 0 for w in args.workers):
        parser.error(f"--workers must be >= 0, got {args.workers}")
    torch.manual_seed(0)
    side = args.image_size
    backbone = BackboneSpec(preset=args.preset, min_pixels=side * side, max_pixels=side * side)

    def datamodule(workers: int, batches: int) -> ImageTextDataModule:
        # samples_per_epoch covers every batch asked for: the loader never ends an epoch mid-run.
        return ImageTextDataModule(
            backbone,
            train_shards=args.shards,
            batch_size=args.batch_size,
            num_workers=workers,
            shuffle_buffer=args.shuffle_buffer,
            samples_per_epoch=batches * args.batch_size,
        )

    try:
        fixed_batch = next(iter(datamodule(0, 1).train_dataloader()))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    module, optimizer = build_module(args, backbone)
    step_times = time_steps(module, optimizer, fixed_batch, args.steps)
    step = statistics.median(step_times)

    results = []
    for workers in args.workers:
        elapsed, startup = time_loader(datamodule(workers, args.warmup + args.batches), args.warmup, args.batches)
        per_batch = elapsed / args.batches
        rate = args.batches * args.batch_size / elapsed
        row = {
            "workers": workers,
            "samples_per_s": rate,
            "samples_per_s_per_worker": rate / max(1, workers),
            "data_time_per_batch_s": per_batch,
            "data_to_step_ratio": per_batch / step,
            "startup_s": startup,
        }
        if args.train_steps > 0:
            row["fed_step_wait_s"] = time_fed_steps(
                module, optimizer, datamodule(workers, args.train_steps + 2), args.train_steps
            )
        results.append(row)

    print(
        f"batch {args.batch_size}, {side}x{side} images, backbone preset {args.preset}; "
        f"training step (median of {args.steps}): {step * 1000:.0f} ms"
    )
    header = "| workers | samples/s | samples/s per worker | data ms/batch | data/step |"
    rule = "|--------:|----------:|---------------------:|--------------:|----------:|"
    if args.train_steps > 0:
        header += " wait ms/step in training |"
        rule += "-------------------------:|"
    print(header)
    print(rule)
    for r in results:
        line = (
            f"| {r['workers']:>7} | {r['samples_per_s']:>9.0f} | {r['samples_per_s_per_worker']:>20.0f} | "
            f"{r['data_time_per_batch_s'] * 1000:>13.0f} | {r['data_to_step_ratio']:>9.2f} |"
        )
        if "fed_step_wait_s" in r:
            line += f" {r['fed_step_wait_s'] * 1000:>25.0f} |"
        print(line)
    if args.json is not None:
        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine(),
            "step_time_s": step,
            "step_times_s": step_times,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0
