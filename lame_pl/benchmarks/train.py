"""Training-step benchmark: the plain step against the GradCache step, throughput and peak memory.

A step is what Lightning does, without Lightning: ``optimizer.zero_grad()``, ``loss =
module.training_step(batch, i)``, ``loss.backward()``, ``optimizer.step()`` on a stage-2
``LaMEModule`` (K reason tokens, latent decoder, InfoNCE) with AdamW; by default stage 2 as the
2B recipe trains it (``--recipe dora``: DoRA adapters on the language model, its embedding table
frozen), ``--recipe full`` trains the whole language model. Each backward of a trained embedding
table fills and adds its dense gradient (vocabulary x hidden), a fixed cost per GradCache chunk. The plain step
(``gradcache_chunk_size=None``) encodes each side of the batch in one piece; the GradCache step
(``gradcache_chunk_size=C``) encodes it in chunks of C rows, back-propagating all chunks but the
last inside ``training_step`` and returning the last chunk's graph, which the caller's
``backward`` completes. Batches are real processor batches (``PairCollator``) of a synthetic
image and captions of a few words, built once outside the timed region. Each configuration runs
one warm-up step, then ``--steps`` timed steps; samples/s = batch * steps / seconds.

    python tools/bench_train.py --preset small --threads 2 --json /tmp/bench_train_small.json
    python tools/bench_train.py --preset qwen2vl-2b-shape --device cuda --dtype bf16 --json OUT.json

Peak memory. On a CPU every configuration runs in a fresh process of this tool (one
configuration's peak cannot hide another's); after the warm-up step the gradients are dropped,
freed heap memory is handed back (``malloc_trim``), the resident size is read
(``rss_before_steps_mib``: weights, AdamW state, the batch, the runtime) and the kernel's
high-water mark is reset (``5`` into ``/proc/self/clear_refs``); ``peak_rss_mib`` is ``VmHWM``
after the timed steps and ``peak_over_start_mib`` what the steps added. Where ``clear_refs`` is
not writable, the peak is the process's lifetime ``ru_maxrss`` (build and warm-up included) and
the JSON says so. On CUDA the configurations share one process by default: the peak is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, the start
``memory_allocated`` after the warm-up step.

Ratios (null, with the reason in ``null_reasons``, when a configuration they need did not run):
``memory_ratio_gradcache_b256_over_plain_b8`` (peaks) and ``..._over_start`` (what the steps
added), and ``time_ratio_gradcache_over_plain``, seconds per sample of GradCache over those of
the plain step at the largest batch both ran (``time_ratio_batch``). With a contrastive loss,
GradCache runs the encoder forward once more: that adds about a third of the encoder's cost when
its weights train (a backward costs about two forwards) and about a half with frozen base
weights and adapters (the backward skips the weight gradients), less for the whole step, whose
decoder and optimiser run once. On CUDA a GradCache batch is built in host memory, as the
Trainer leaves it (``LaMEModule.transfer_batch_to_device``), and its chunks move to the device.
A configuration that fails (out of memory) is recorded with its error; the others still report.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lame_pl.backbone import BACKBONE_PRESETS, DECODER_PRESETS
from lame_pl.benchmarks.common import machine
from lame_pl.benchmarks.train_report import GOAL, print_table, ratios
from lame_pl.benchmarks.train_step import measure
from lame_pl.data.shard_args import positive_int

MODES = ("plain", "gradcache")


def _flag_batches(flag: str):
    def parse(text: str) -> list[int]:
        if not text.strip():
            return []  # an empty list skips that mode
        try:
            sizes = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated integers, got {text!r}") from None
        if min(sizes) < 1:
            raise argparse.ArgumentTypeError(f"{flag} batch sizes must be >= 1, got {text!r}")
        return sorted(set(sizes))

    return parse


def _only(text: str) -> tuple[str, int]:
    mode, _, size = text.partition(":")
    if mode not in MODES or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"--only takes MODE:BATCH with MODE one of {', '.join(MODES)}, got {text!r}")
    return mode, int(size)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        default="small",
        choices=sorted(BACKBONE_PRESETS),
        help="random-weight backbone preset (default small)",
    )
    parser.add_argument(
        "--decoder-preset",
        default="demo",
        choices=sorted(DECODER_PRESETS),
        help="latent decoder preset (default demo; full Qwen2 vocabulary)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: float32 weights under bfloat16 autocast, as bench_encode (default fp32)",
    )
    parser.add_argument(
        "--recipe",
        default="dora",
        choices=["dora", "full"],
        help="what stage 2 trains: dora (the 2B recipe: DoRA r16 adapters on the language model, "
        "its embedding table frozen) or full (the whole language model); default dora",
    )
    parser.add_argument(
        "--backbone-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="backbone weights' dtype (the 2B recipe: bfloat16 with dora; default float32)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (the 2B recipe does)",
    )
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention (default sdpa)")
    parser.add_argument("-K", "--reason-tokens", type=positive_int, default=8, help="K (default 8)")
    # The defaults are the smallest inputs at which a chunk of 8 rows is matrix work rather than
    # per-call overhead on a 2-core CPU (the recipe's rows are far longer: up to 1,280 image
    # tokens); 112 px and 8 tokens (the demo's images) measure the fixed costs of each chunk.
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=224,
        help="image side in pixels, a multiple of 28 (default 224: 64 image tokens)",
    )
    parser.add_argument(
        "--text-tokens", type=positive_int, default=32, help="tokens of the query instruction (default 32)"
    )
    parser.add_argument(
        "--plain-batches",
        type=_flag_batches("--plain-batches"),
        default=[8, 64],
        help="comma-separated batch sizes of the plain step (default 8,64; '' skips it)",
    )
    parser.add_argument(
        "--gradcache-batches",
        type=_flag_batches("--gradcache-batches"),
        default=[64, 256],
        help="comma-separated batch sizes of the GradCache step (default 64,256; '' skips it)",
    )
    parser.add_argument("--chunk-size", type=positive_int, default=8, help="GradCache chunk size, rows (default 8)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps after one warm-up (default 3)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice); no more than the idle cores",
    )
    parser.add_argument(
        "--isolate",
        default=None,
        choices=["process", "none"],
        help="process: each configuration in a fresh process of this tool; none: all in this one "
        "(default: process on cpu, none on cuda)",
    )
    parser.add_argument("--only", type=_only, default=None, help=argparse.SUPPRESS)  # one configuration (a child)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses settings that cannot run here, naming the flag."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.image_size % 28:
        parser.error(f"--image-size must be a multiple of 28 (Qwen2-VL's merged patch), got {args.image_size}")
    if args.only is None and not args.plain_batches and not args.gradcache_batches:
        parser.error("--plain-batches and --gradcache-batches are both empty: nothing to measure")
    if args.isolate is None:
        args.isolate = "process" if args.device == "cpu" else "none"


def _child(args: argparse.Namespace, mode: str, size: int) -> dict[str, Any]:
    """``measure`` in a fresh process of this benchmark (its own peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [
            sys.executable,
            "-m",
            "lame_pl.benchmarks.train",
            "--preset",
            args.preset,
            "--decoder-preset",
            args.decoder_preset,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--attn",
            args.attn,
            "-K",
            str(args.reason_tokens),
            "--recipe",
            args.recipe,
            "--backbone-dtype",
            args.backbone_dtype,
            "--image-size",
            str(args.image_size),
            "--text-tokens",
            str(args.text_tokens),
            "--chunk-size",
            str(args.chunk_size),
            "--steps",
            str(args.steps),
            "--only",
            f"{mode}:{size}",
            "--json",
            str(out),
        ]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"measuring {mode} batch {size} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())["result"]


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration, print the table, write the JSON; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.only is not None:  # a child: one configuration, in this process
        result = measure(args, *args.only)
        if args.json is not None:
            args.json.write_text(json.dumps({"result": result}, indent=1) + "\n")
        return 0 if result["loss_finite"] else 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    plan = [("plain", b) for b in args.plain_batches] + [("gradcache", b) for b in args.gradcache_batches]
    results, failures = [], []
    for mode, size in plan:
        try:
            if args.isolate == "process":
                result = _child(args, mode, size)
            else:
                result = measure(args, mode, size)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. out of memory: the others still run
            failures.append({"mode": mode, "batch": size, "error": str(err)[-2000:]})
            print(
                f"  {mode} batch {size}: failed: {str(err).splitlines()[-1] if str(err) else type(err).__name__}",
                flush=True,
            )
            continue
        finally:
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(
            f"  {mode} batch {size}: {result['samples_per_s']:.2f} samples/s, peak {result['peak_mib']:.0f} MiB",
            flush=True,
        )
    figures, reasons = ratios(results)
    for failure in failures:  # a ratio that needed a failed configuration says so
        for key, value in figures.items():
            if value is None and key in reasons:
                reasons[key] += f"; {failure['mode']} batch {failure['batch']} failed"
    report: dict[str, Any] = {
        **{
            k: v
            for k, v in figures.items()
            if k.startswith(("memory_ratio_gradcache_b", "time_ratio", "cpu_time_ratio"))
        },
        "ratios": figures,
        "null_reasons": reasons,
        "goals": {
            "memory_ratio_max": GOAL,
            "time_ratio_max": GOAL,
            "extra_encoder_forward_approx": {"full": 4 / 3, "dora": 3 / 2},
        },
        "memory_figure": "process peak RSS (MiB)" if args.device == "cpu" else "torch.cuda.max_memory_allocated (MiB)",
        "config": {
            "preset": args.preset,
            "decoder_preset": args.decoder_preset,
            "device": args.device,
            "dtype": args.dtype,
            "attn": args.attn,
            "recipe": args.recipe,
            "backbone_dtype": args.backbone_dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
            "K": args.reason_tokens,
            "image_size": args.image_size,
            "text_tokens": args.text_tokens,
            "plain_batches": args.plain_batches,
            "gradcache_batches": args.gradcache_batches,
            "chunk_size": args.chunk_size,
            "steps": args.steps,
            "threads": args.threads,
            "isolate": args.isolate,
            "stage": 2,
        },
        "machine": machine(args.device),
        "results": results,
        "failures": failures,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(r["loss_finite"] for r in results) and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
