"""Memory of a backbone in a weight dtype: weight bytes and the peak RSS of building it plus one forward.

One build per process, so that one dtype's peak cannot hide in another's: with several
``--dtype`` values the tool runs itself once per dtype, in a fresh process, and writes their
figures side by side. The forward is ``lame``'s (K reason tokens and [EMBED]) at batch 1 on one
image and a short text, without gradients, in the weights' dtype.

    python tools/bench_memory.py --preset qwen2vl-2b-shape --dtype float32,bfloat16 --json mem_2b.json

Peak RSS (``ru_maxrss``) is the process's high-water mark: it includes Python, torch and the
processor (``baseline_rss_mib``, measured before the build), and on a CPU the activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lame_pl import BackboneSpec
from lame_pl.backbone import BACKBONE_PRESETS, build_backbone, build_processor
from lame_pl.benchmarks.common import encode_inputs, prompt_text, synthetic_image
from lame_pl.benchmarks.process_memory import lifetime_peak_rss_mib, proc_status_mib
from lame_pl.model import LaMEEncoder

DTYPES = ("float32", "bfloat16", "float16")


def _dtypes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--dtype takes a comma-separated list of {', '.join(DTYPES)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2vl-2b-shape", choices=sorted(BACKBONE_PRESETS))
    parser.add_argument(
        "--dtype",
        type=_dtypes,
        default=["float32", "bfloat16"],
        help="comma-separated weight dtypes, one process each (default float32,bfloat16)",
    )
    parser.add_argument("-K", "--reason-tokens", type=int, default=8, help="K (default 8)")
    parser.add_argument("--image-size", type=int, default=112, help="image side in pixels (default 112: 16 tokens)")
    parser.add_argument("--text-tokens", type=int, default=16, help="text tokens after the image (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    return parser


def measure(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """Builds the backbone in ``dtype`` and runs one forward, in this process."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    area = args.image_size * args.image_size
    spec = BackboneSpec(preset=args.preset, min_pixels=area, max_pixels=area, attn_implementation="sdpa", dtype=dtype)
    processor = build_processor(spec)
    inputs = encode_inputs(
        processor, prompt_text(processor.tokenizer, args.text_tokens), synthetic_image(args.image_size), 1, "cpu"
    )
    baseline = proc_status_mib("VmRSS")
    start = time.perf_counter()
    torch.manual_seed(0)
    backbone = build_backbone(spec).eval()
    build_s = time.perf_counter() - start
    after_build = proc_status_mib("VmRSS")
    encoder = LaMEEncoder(backbone, num_reason_tokens=args.reason_tokens).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        out = encoder(**inputs)
    forward_s = time.perf_counter() - start
    tensors = [*backbone.parameters(), *backbone.buffers()]
    return {
        "dtype": dtype,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "weight_gib": sum(t.numel() * t.element_size() for t in tensors) / 2**30,
        "baseline_rss_mib": baseline,
        "rss_after_build_mib": after_build,
        "peak_rss_mib": lifetime_peak_rss_mib(),
        "build_s": build_s,
        "forward_s": forward_s,
        "input_tokens": int(inputs["input_ids"].shape[1]),
        "embedding_finite": bool(torch.isfinite(out.embedding).all()),
    }


def _child(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """``measure`` in a fresh process (its own peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [
            sys.executable,
            "-m",
            "lame_pl.benchmarks.memory",
            "--preset",
            args.preset,
            "--dtype",
            dtype,
            "-K",
            str(args.reason_tokens),
            "--image-size",
            str(args.image_size),
            "--text-tokens",
            str(args.text_tokens),
            "--json",
            str(out),
        ]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"measuring {dtype} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())[dtype]


def main(argv: list[str] | None = None) -> int:
    """Measure each dtype (in its own process when there are several), print and write the figures."""
    args = build_parser().parse_args(argv)
    if len(args.dtype) == 1:
        results = {args.dtype[0]: measure(args, args.dtype[0])}
    else:
        results = {dtype: _child(args, dtype) for dtype in args.dtype}
    report: dict[str, Any] = {
        **results,
        "config": {
            "preset": args.preset,
            "K": args.reason_tokens,
            "image_size": args.image_size,
            "text_tokens": args.text_tokens,
            "batch_size": 1,
            "threads": args.threads if args.threads is not None else torch.get_num_threads(),
        },
    }
    if "float32" in results and "bfloat16" in results:
        fp32, bf16 = results["float32"], results["bfloat16"]
        report["bfloat16_over_float32"] = {
            "weight_bytes": bf16["weight_bytes"] / fp32["weight_bytes"],
            "peak_rss": bf16["peak_rss_mib"] / fp32["peak_rss_mib"],
            "peak_rss_above_baseline": (bf16["peak_rss_mib"] - bf16["baseline_rss_mib"])
            / (fp32["peak_rss_mib"] - fp32["baseline_rss_mib"]),
        }
    for dtype, r in results.items():
        print(
            f"{args.preset} {dtype}: {r['parameters'] / 1e9:.3f}B parameters, weights {r['weight_gib']:.2f} GiB, "
            f"peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB (baseline {r['baseline_rss_mib'] / 1024:.2f} GiB), "
            f"build {r['build_s']:.1f} s, forward {r['forward_s']:.2f} s"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["embedding_finite"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
