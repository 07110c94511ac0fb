"""Encode-speed benchmark: the four encode modes on one backbone, the same weights and inputs.

Times ``discriminative`` (one pass, K=0), ``lame`` (K reason tokens in the same pass),
``latent_sequential`` (K fed-back steps over the KV cache) and ``explicit_cot`` (T greedy tokens
over the KV cache), and transformers' own ``generate`` of T tokens on the same model as the
reference for the cost of a generated token. Every mode encodes the same batch of image+text
inputs; each batch size runs the modes round-robin (warm-up rounds, then ``--repeats`` timed
rounds) so that a change in machine load touches every mode alike, and reports the median
time per mode, the ratios of those medians (the JSON's headline keys, at the first batch size)
and, less sensitive to drifting load, the median over rounds of each round's own ratio.
It also times stage-2 training steps (``LaMEModule.model_step`` + backward + AdamW) for
``lame`` with its latent decoder against ``discriminative`` without one.

The ``clip`` row is the CLIP anchor's cost on the same image and text (``--clip-arch``, an
open_clip architecture at ``--image-size``, random weights): its vision tower on the image plus
its text tower on the text, cut at its context length (77 tokens for the built-in
architectures), fused as ``lame_pl.clip_anchor.CLIPAnchor`` fuses a side. ``--clip-arch none``
leaves it out.

    python tools/bench_encode.py --preset small --json /tmp/bench_small.json
    python tools/bench_encode.py --preset qwen2vl-2b-shape --device cuda --dtype bf16 --json OUT.json

The FLOP floor of ``lame`` over ``discriminative`` is ``(N+K+1)/(N+1)`` for N input tokens
(image tokens included): the language model's cost grows at least linearly with the tokens.
On a CPU shared with other work, pass ``--threads`` no larger than the idle cores: with more
threads than free cores, torch's thread team waits on descheduled threads (measured here: a
pass of the ``small`` preset took 6.5 s with 2 threads on 2 busy cores, 0.5 s with 1 thread).

Peak memory is CUDA's ``max_memory_allocated`` per mode; on a CPU there is no per-mode figure
(the process's peak RSS can only grow), so it is reported as null, with the whole run's peak RSS
beside it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from lame_pl import BackboneSpec
from lame_pl.backbone import BACKBONE_PRESETS, DECODER_PRESETS, build_backbone, build_processor
from lame_pl.benchmarks.common import encode_inputs, machine, prompt_text, synthetic_image, training_batch
from lame_pl.benchmarks.encode_timing import (
    CLIP,
    DTYPES,
    HF_GENERATE,
    build_runners,
    clip_inputs,
    clip_runner,
    parameter_counts,
    time_modes,
    time_training,
)
from lame_pl.benchmarks.process_memory import lifetime_peak_rss_mib
from lame_pl.modes import MODES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        default="small",
        choices=sorted(BACKBONE_PRESETS),
        help="random-weight backbone preset (default small)",
    )
    source.add_argument("--backbone", default=None, help="a local Hugging Face Qwen-VL checkpoint directory instead")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations (default fp32)"
    )
    parser.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention implementation (default sdpa)",
    )
    parser.add_argument("-K", "--reason-tokens", type=_positive_int, default=8, help="K (default 8)")
    parser.add_argument(
        "-T",
        "--cot-tokens",
        type=_positive_int,
        default=100,
        help="T, tokens explicit_cot and generate produce (default 100)",
    )
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        default=392,
        help="image side in pixels, a multiple of 28 (default 392: 196 image tokens)",
    )
    parser.add_argument(
        "--text-tokens", type=_positive_int, default=100, help="text tokens after the image (default 100)"
    )
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8], help="comma-separated (default 1,8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every mode first (default 1)")
    parser.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds, median reported (default 5)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=3,
        help="timed stage-2 training steps per mode, after one untimed (default 3; 0 skips)",
    )
    parser.add_argument("--train-batch-size", type=_positive_int, default=8, help="training batch size (default 8)")
    parser.add_argument(
        "--decoder-preset",
        default="demo",
        choices=sorted(DECODER_PRESETS),
        help="latent decoder of the lame training step (default demo; full Qwen2 vocabulary)",
    )
    parser.add_argument(
        "--clip-arch",
        default="ViT-B-32",
        help="open_clip architecture of the clip row (default ViT-B-32; 'none' leaves the row out)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses settings that cannot run here, naming them."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            parser.error("--attn flash_attention_2: the flash_attn package is not importable (pip install -e '.[gpu]')")
        if args.device != "cuda":
            parser.error("--attn flash_attention_2 needs --device cuda")
    if args.image_size % 28:
        parser.error(f"--image-size must be a multiple of 28 (Qwen2-VL's merged patch), got {args.image_size}")
    if args.warmup < 0 or args.train_steps < 0:
        parser.error(f"--warmup and --train-steps must be >= 0, got {args.warmup} and {args.train_steps}")
    if args.backbone is not None and not Path(args.backbone).is_dir():
        parser.error(f"--backbone {args.backbone!r} is not a directory")
    if args.clip_arch != "none":
        import open_clip

        if open_clip.get_model_config(args.clip_arch) is None:
            parser.error(f"--clip-arch {args.clip_arch!r} is not a built-in open_clip architecture (or 'none')")


def backbone_spec(args: argparse.Namespace) -> BackboneSpec:
    """The backbone the run measures, with images fixed at ``--image-size`` squared."""
    area = args.image_size * args.image_size
    dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    if args.backbone is not None:
        return BackboneSpec(
            path=args.backbone, min_pixels=area, max_pixels=area, attn_implementation=args.attn, dtype=dtype
        )
    return BackboneSpec(preset=args.preset, min_pixels=area, max_pixels=area, attn_implementation=args.attn)


def encode_ratios(results: dict[str, dict], n_tokens: int, k: int) -> dict[str, float]:
    """The headline ratios, from one batch size's timings."""
    t = {name: r["median_s"] for name, r in results.items()}
    return {
        "ratio_explicit_cot_over_lame": t["explicit_cot"] / t["lame"],
        "ratio_latent_sequential_over_lame": t["latent_sequential"] / t["lame"],
        "ratio_lame_over_discriminative": t["lame"] / t["discriminative"],
        "flop_floor_lame_over_discriminative": (n_tokens + k + 1) / (n_tokens + 1),
        # Both runs share the prefill and generate the same T tokens, so the ratio of totals is
        # the ratio per generated token; explicit_cot also feeds the last token with [EMBED].
        "ratio_cot_token_over_hf_generate_token": t["explicit_cot"] / t[HF_GENERATE],
    }


def paired_ratios(results: dict[str, dict]) -> dict[str, float]:
    """Median over rounds of each round's ratio: modes timed back to back share the load of the moment."""

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(results[a]["times_s"], results[b]["times_s"], strict=True))

    return {
        "ratio_explicit_cot_over_lame": paired("explicit_cot", "lame"),
        "ratio_latent_sequential_over_lame": paired("latent_sequential", "lame"),
        "ratio_lame_over_discriminative": paired("lame", "discriminative"),
        "ratio_cot_token_over_hf_generate_token": paired("explicit_cot", HF_GENERATE),
    }


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary."""
    cfg = report["config"]
    sizes = cfg["batch_sizes"]
    head = report["encode"][str(sizes[0])]
    print(
        f"{cfg['backbone']} on {cfg['device']} ({cfg['dtype']}, {cfg['attn']}), N={cfg['input_tokens']} input tokens "
        f"({cfg['image_tokens']} image), K={cfg['K']}, T={cfg['T']}, median of {cfg['repeats']} "
        f"after {cfg['warmup']} warm-up; load average {report['load_average_start']} -> {report['load_average_end']}"
    )
    cols = "".join(f" ms/sample b{b} | samples/s b{b} |" for b in sizes)
    print(f"| mode              | appended |{cols} peak MiB b{sizes[-1]} | time / lame b{sizes[0]} |")
    print("|" + "---|" * (4 + 2 * len(sizes)))
    appended = {
        "discriminative": "1",
        "lame": f"{cfg['K']}+1",
        "latent_sequential": f"{cfg['K']}+1 seq",
        "explicit_cot": f"{cfg['T']}+1 seq",
        HF_GENERATE: f"{cfg['T']} seq",
        CLIP: "dual",
    }
    for name in (*MODES, HF_GENERATE, *([CLIP] if CLIP in head else [])):
        cells = "".join(
            f" {report['encode'][str(b)][name]['ms_per_sample']:>14.1f} | {report['encode'][str(b)][name]['samples_per_s']:>13.2f} |"
            for b in sizes
        )
        peak = report["encode"][str(sizes[-1])][name]["peak_memory_mib"]
        peak_text = f"{peak:.0f}" if peak is not None else "n/a"
        ratio = head[name]["median_s"] / head["lame"]["median_s"]
        print(f"| {name:<17} | {appended[name]:>8} |{cells} {peak_text:>12} | {ratio:>14.3f} |")
    print()
    for key in (
        "ratio_explicit_cot_over_lame",
        "ratio_latent_sequential_over_lame",
        "ratio_lame_over_discriminative",
        "flop_floor_lame_over_discriminative",
        "ratio_cot_token_over_hf_generate_token",
    ):
        cells = [f"b{b} {report['ratios_by_batch'][str(b)][key]:.3f}" for b in sizes]
        cells += [
            f"b{b} paired {report['paired_ratios_by_batch'][str(b)][key]:.3f}"
            for b in sizes
            if key in report["paired_ratios_by_batch"][str(b)]
        ]
        print(f"{key:<42} " + "  ".join(cells))
    print("(ratios of medians; 'paired': median over rounds of the ratio within each round)")
    if report.get("clip"):
        clip = report["clip"]
        print(
            f"clip: open_clip {clip['arch']} ({clip['parameters'] / 1e6:.1f}M parameters, random weights) at the same "
            f"image size; its text cut at {clip['context_length']} tokens; image and text towers, fused"
        )
    print(f"lame / discriminative over the FLOP floor: {report['lame_over_floor']:.3f} (goal <= 1.02)")
    if report["train"]:
        print()
        print("| stage-2 training step | batch | median s/step | samples/s | peak MiB |")
        print("|---|---|---|---|---|")
        for mode, r in report["train"].items():
            peak = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/a"
            label = f"{mode} (decoder {r['decoder']})" if r["decoder"] else mode
            print(f"| {label} | {r['batch_size']} | {r['median_step_s']:.3f} | {r['samples_per_s']:.2f} | {peak} |")
    if cfg["device"] == "cpu":
        print(f"\npeak memory: none per mode on a CPU; whole run's peak RSS {report['peak_rss_mib']:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(0)
    spec = backbone_spec(args)
    processor = build_processor(spec)
    backbone = build_backbone(spec).to(args.device, DTYPES[args.dtype]).eval()
    parameters = parameter_counts(backbone)
    text = prompt_text(processor.tokenizer, args.text_tokens)
    image = synthetic_image(args.image_size)
    runners = build_runners(backbone, args)
    clip_info: dict[str, Any] | None = None
    if args.clip_arch != "none":
        encode_clip, clip_info = clip_runner(args)

    encode: dict[str, dict] = {}
    ratios: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    n_tokens = image_tokens = 0
    for batch in args.batch_sizes:
        inputs = encode_inputs(processor, text, image, batch, args.device)
        n_tokens = int(inputs["input_ids"].shape[1])
        image_tokens = int((inputs["mm_token_type_ids"][0] == 1).sum())
        timed = runners
        if clip_info is not None:
            batch_clip = clip_inputs(text, image, batch, args)
            # time_modes hands every runner the LaME inputs; the clip row encodes its own.
            timed = {**runners, CLIP: lambda _inputs, batch_clip=batch_clip: encode_clip(batch_clip)}
        encode[str(batch)] = time_modes(timed, inputs, args)
        ratios[str(batch)] = encode_ratios(encode[str(batch)], n_tokens, args.reason_tokens)
        paired[str(batch)] = paired_ratios(encode[str(batch)])

    train: dict[str, dict] = {}
    if args.train_steps > 0:
        del runners, backbone, timed
        if clip_info is not None:
            del encode_clip
        gc.collect()
        batch = training_batch(processor, text, image, args.train_batch_size, args.device)
        train = time_training(spec, batch, args)

    headline = ratios[str(args.batch_sizes[0])]
    report: dict[str, Any] = {
        **headline,
        "lame_over_floor": headline["ratio_lame_over_discriminative"] / headline["flop_floor_lame_over_discriminative"],
        "ratios_by_batch": ratios,
        "paired_ratios_by_batch": paired,
        "headline_batch_size": args.batch_sizes[0],
        "config": {
            "backbone": args.backbone or f"preset {args.preset}",
            "device": args.device,
            "dtype": args.dtype,
            "attn": args.attn,
            "K": args.reason_tokens,
            "T": args.cot_tokens,
            "input_tokens": n_tokens,
            "image_tokens": image_tokens,
            "text_tokens": args.text_tokens,
            "image_size": args.image_size,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "train_steps": args.train_steps,
            "train_batch_size": args.train_batch_size,
            "decoder_preset": args.decoder_preset,
            "decoder_vocabulary": "full (151,936 tokens)",
        },
        "parameters": parameters,
        "clip": clip_info,
        "encode": encode,
        "train": train,
        "machine": machine(args.device),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        # A process-lifetime high-water mark, not per mode.
        "peak_rss_mib": lifetime_peak_rss_mib(),
        "peak_memory_note": None
        if args.device == "cuda"
        else "per-mode peak memory is null on a CPU: the process's peak RSS can only grow, so it cannot be split by mode",
    }
    if train:
        report["train_samples_per_s_lame"] = train["lame"]["samples_per_s"]
        report["train_samples_per_s_discriminative"] = train["discriminative"]["samples_per_s"]
    bad = [k for k, v in headline.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise RuntimeError(f"non-positive or non-finite ratios: {bad}")
    print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0
