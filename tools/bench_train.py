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
import ctypes
import ctypes.util
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lame_pl import BackboneSpec, DecoderSpec, LaMEModule, LoraSpec, Stage2Spec
from lame_pl.backbone import BACKBONE_PRESETS, DECODER_PRESETS, build_processor
from lame_pl.benchmarking import machine, prompt_text, synchronize, synthetic_image, training_batch
from lame_pl.data.shard_args import positive_int

MODES = ("plain", "gradcache")
GOAL = 1.5  # the goal for both ratios
MEMORY_KEY = "memory_ratio_gradcache_b{big}_over_plain_b{small}"
HEADLINE_BATCHES = (256, 8)  # GradCache batch, plain batch of the headline memory ratio


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
    parser.add_argument("--preset", default="small", choices=sorted(BACKBONE_PRESETS),
                        help="random-weight backbone preset (default small)")
    parser.add_argument("--decoder-preset", default="demo", choices=sorted(DECODER_PRESETS),
                        help="latent decoder preset (default demo; full Qwen2 vocabulary)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: float32 weights under bfloat16 autocast, as bench_encode (default fp32)")
    parser.add_argument("--recipe", default="dora", choices=["dora", "full"],
                        help="what stage 2 trains: dora (the 2B recipe: DoRA r16 adapters on the language model, "
                             "its embedding table frozen) or full (the whole language model); default dora")
    parser.add_argument("--backbone-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="backbone weights' dtype (the 2B recipe: bfloat16 with dora; default float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (the 2B recipe does)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention (default sdpa)")
    parser.add_argument("-K", "--reason-tokens", type=positive_int, default=8, help="K (default 8)")
    # The defaults are the smallest inputs at which a chunk of 8 rows is matrix work rather than
    # per-call overhead on a 2-core CPU (the recipe's rows are far longer: up to 1,280 image
    # tokens); 112 px and 8 tokens (the demo's images) measure the fixed costs of each chunk.
    parser.add_argument("--image-size", type=positive_int, default=224,
                        help="image side in pixels, a multiple of 28 (default 224: 64 image tokens)")
    parser.add_argument("--text-tokens", type=positive_int, default=32,
                        help="tokens of the query instruction (default 32)")
    parser.add_argument("--plain-batches", type=_flag_batches("--plain-batches"), default=[8, 64],
                        help="comma-separated batch sizes of the plain step (default 8,64; '' skips it)")
    parser.add_argument("--gradcache-batches", type=_flag_batches("--gradcache-batches"), default=[64, 256],
                        help="comma-separated batch sizes of the GradCache step (default 64,256; '' skips it)")
    parser.add_argument("--chunk-size", type=positive_int, default=8,
                        help="GradCache chunk size, rows (default 8)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps after one warm-up (default 3)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice); no more than the idle cores")
    parser.add_argument("--isolate", default=None, choices=["process", "none"],
                        help="process: each configuration in a fresh process of this tool; none: all in this one "
                             "(default: process on cpu, none on cuda)")
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


# ----------------------------------------------------------------------------- memory probes


def _proc_status_mib(field: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this tool measures Linux processes")


def _lifetime_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_high_water_mark() -> bool:
    """Resets ``VmHWM`` to the resident size now; False where ``clear_refs`` is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> bool:
    """Hands freed heap memory back to the kernel (glibc), so that RSS counts what is alive."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    return True


# ----------------------------------------------------------------------------- one configuration


def backbone_spec(args: argparse.Namespace) -> BackboneSpec:
    area = args.image_size * args.image_size
    return BackboneSpec(preset=args.preset, min_pixels=area, max_pixels=area, attn_implementation=args.attn,
                        dtype=args.backbone_dtype)


def _tensor_mib(tree: Any) -> float:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size() / 2**20
    if isinstance(tree, dict):
        return sum(_tensor_mib(v) for v in tree.values())
    return 0.0


def measure(args: argparse.Namespace, mode: str, size: int) -> dict[str, Any]:
    """Builds the module and one batch, runs the warm-up and timed steps of one configuration here."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    spec = backbone_spec(args)
    processor = build_processor(spec)
    text = prompt_text(processor.tokenizer, args.text_tokens)
    chunk = args.chunk_size if mode == "gradcache" else None
    # Under GradCache the Trainer leaves the batch in host memory and moves chunks to the device.
    batch = training_batch(processor, text, synthetic_image(args.image_size), size, "cpu" if chunk else device)
    torch.manual_seed(0)
    stage2 = Stage2Spec(lora=LoraSpec()) if args.recipe == "dora" else Stage2Spec()
    module = LaMEModule(spec, DecoderSpec(preset=args.decoder_preset), num_reason_tokens=args.reason_tokens,
                        stage=2, stage2=stage2, gradcache_chunk_size=chunk,
                        gradient_checkpointing=args.gradient_checkpointing)
    module = module.to(device).train()
    optimizer = module.configure_optimizers()
    autocast = torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    losses: list[float] = []

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.training_step(batch, i)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    with warnings.catch_warnings():
        # training_step logs through self.log, which warns once per call without a Trainer.
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)` but the `self\.trainer` reference")
        step(0)
        optimizer.zero_grad(set_to_none=True)  # the start: weights and AdamW state, no gradients
        gc.collect()
        peak_source = None
        if device == "cuda":
            synchronize(device)
            torch.cuda.empty_cache()
            start_mib = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            trimmed = _malloc_trim()
            start_mib = _proc_status_mib("VmRSS")
            peak_source = "VmHWM after clear_refs" if _reset_high_water_mark() else None
        times, cpu_times = [], []
        for i in range(1, args.steps + 1):
            synchronize(device)
            began, cpu_began = time.perf_counter(), time.process_time()
            step(i)
            synchronize(device)
            times.append(time.perf_counter() - began)
            cpu_times.append(time.process_time() - cpu_began)
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        memory = {"memory_source": "torch.cuda.max_memory_allocated", "allocated_before_steps_mib": start_mib,
                  "peak_allocated_mib": peak_mib, "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    else:
        lifetime = _lifetime_peak_mib()
        if peak_source is None:
            peak_mib = lifetime
            peak_source = ("ru_maxrss: /proc/self/clear_refs is not writable, so this is the process's lifetime "
                           "peak (build and warm-up included)")
        else:
            peak_mib = _proc_status_mib("VmHWM")
        memory = {"memory_source": peak_source, "malloc_trim": trimmed, "rss_before_steps_mib": start_mib,
                  "peak_rss_mib": peak_mib, "lifetime_peak_rss_mib": lifetime}
    seconds = sum(times)
    trainable = [p for p in module.parameters() if p.requires_grad]
    # Positions whose decoder logits (one float32 row over the output vocabulary each) exist at
    # once: the labelled target tokens of the batch, or of the largest GradCache chunk.
    tokens = batch["decoder"]["attention_mask"].sum(dim=1)
    at_once = tokens if chunk is None else torch.stack([t.sum() for t in tokens.split(chunk)])
    head = module.decoder.language_model.get_output_embeddings().weight.shape[0]
    vocab = int(module.decoder.output_ids.numel()) if module.decoder.restricted else head
    logit_rows = int(at_once.sum() if chunk is None else at_once.max())
    return {
        "mode": mode, "batch": size, "chunk": chunk, "steps": args.steps, "seconds": seconds,
        "step_times_s": times, "samples_per_s": size * args.steps / seconds, "s_per_sample": seconds / (size * args.steps),
        # This process's CPU time (all its threads): less sensitive than wall time to other work
        # on the machine when --threads does not exceed the idle cores.
        "cpu_seconds": sum(cpu_times), "cpu_step_times_s": cpu_times,
        "cpu_s_per_sample": sum(cpu_times) / (size * args.steps),
        "peak_mib": peak_mib, "start_mib": start_mib, "peak_over_start_mib": peak_mib - start_mib, **memory,
        "losses": losses, "loss_finite": all(math.isfinite(v) for v in losses),
        "query_tokens": int(batch["query"]["input_ids"].shape[1]),
        "target_tokens": int(batch["target"]["input_ids"].shape[1]),
        "decoder_tokens": int(batch["decoder"]["input_ids"].shape[1]),
        "batch_tensors_mib": _tensor_mib({k: batch[k] for k in ("query", "target", "decoder")}),
        "decoder_vocabulary": vocab, "decoder_logit_positions_at_once": logit_rows,
        "decoder_logits_mib_at_once": logit_rows * vocab * 4 / 2**20,
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_mib": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
    }


def _child(args: argparse.Namespace, mode: str, size: int) -> dict[str, Any]:
    """``measure`` in a fresh process of this tool (its own peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, __file__, "--preset", args.preset, "--decoder-preset", args.decoder_preset,
               "--device", args.device, "--dtype", args.dtype, "--attn", args.attn, "-K", str(args.reason_tokens),
               "--recipe", args.recipe, "--backbone-dtype", args.backbone_dtype,
               "--image-size", str(args.image_size), "--text-tokens", str(args.text_tokens),
               "--chunk-size", str(args.chunk_size), "--steps", str(args.steps), "--only", f"{mode}:{size}",
               "--json", str(out)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"measuring {mode} batch {size} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())["result"]


# ----------------------------------------------------------------------------- report


def _find(results: list[dict], mode: str, size: int) -> dict | None:
    return next((r for r in results if r["mode"] == mode and r["batch"] == size), None)


def ratios(results: list[dict]) -> tuple[dict[str, Any], dict[str, str]]:
    """The headline ratios, and why any of them is null."""
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    big, small = HEADLINE_BATCHES
    key = MEMORY_KEY.format(big=big, small=small)
    cache, plain = _find(results, "gradcache", big), _find(results, "plain", small)
    if cache and plain:
        out[key] = cache["peak_mib"] / plain["peak_mib"]
        out[key + "_over_start"] = cache["peak_over_start_mib"] / plain["peak_over_start_mib"]
    else:
        out[key] = out[key + "_over_start"] = None
        missing = [name for name, found in ((f"gradcache batch {big}", cache), (f"plain batch {small}", plain))
                   if not found]
        reasons[key] = reasons[key + "_over_start"] = f"not run: {' and '.join(missing)}"
    # The same figures for whatever ran: the largest GradCache batch over the smallest plain batch.
    key = "memory_ratio_largest_gradcache_over_smallest_plain"
    caches = [r for r in results if r["mode"] == "gradcache"]
    plains = [r for r in results if r["mode"] == "plain"]
    if caches and plains:
        cache, plain = max(caches, key=lambda r: r["batch"]), min(plains, key=lambda r: r["batch"])
        out[key] = cache["peak_mib"] / plain["peak_mib"]
        out[key + "_over_start"] = cache["peak_over_start_mib"] / plain["peak_over_start_mib"]
        out["memory_ratio_batches"] = {"gradcache": cache["batch"], "plain": plain["batch"]}
    else:
        out[key] = out[key + "_over_start"] = out["memory_ratio_batches"] = None
        reasons[key] = reasons[key + "_over_start"] = "not run: " + ("no GradCache batch" if not caches else "no plain batch")
    common = sorted({r["batch"] for r in caches} & {r["batch"] for r in plains})
    if common:
        size = common[-1]
        out["time_ratio_gradcache_over_plain"] = (_find(results, "gradcache", size)["s_per_sample"]
                                                  / _find(results, "plain", size)["s_per_sample"])
        out["time_ratio_batch"] = size
        out["cpu_time_ratio_gradcache_over_plain"] = (_find(results, "gradcache", size)["cpu_s_per_sample"]
                                                      / _find(results, "plain", size)["cpu_s_per_sample"])
    else:
        out["time_ratio_gradcache_over_plain"] = out["time_ratio_batch"] = None
        out["cpu_time_ratio_gradcache_over_plain"] = None
        reasons["time_ratio_gradcache_over_plain"] = reasons["cpu_time_ratio_gradcache_over_plain"] = (
            "not run: no batch size ran both plain and GradCache")
    return out, reasons


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary."""
    cfg = report["config"]
    cpu = cfg["device"] == "cpu"
    print(f"{cfg['preset']} + decoder {cfg['decoder_preset']} on {cfg['device']} ({cfg['dtype']}), "
          f"stage 2 {cfg['recipe']}, K={cfg['K']}, "
          f"{cfg['image_size']}px images, {cfg['steps']} timed steps after 1 warm-up; "
          f"load average {report['load_average_start']} -> {report['load_average_end']}")
    start, peak = ("RSS before steps", "peak RSS") if cpu else ("allocated before", "peak allocated")
    print(f"| step | batch | chunk | s/step | CPU s/step | samples/s | {start} MiB | {peak} MiB | peak - start MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['mode']} | {r['batch']} | {r['chunk'] or '-'} | {r['seconds'] / r['steps']:.2f} | "
              f"{r['cpu_seconds'] / r['steps']:.2f} | {r['samples_per_s']:.2f} | {r['start_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['peak_over_start_mib']:.0f} |")
    print()
    for key, value in report["ratios"].items():
        if isinstance(value, float):
            print(f"{key}: {value:.3f}")
        elif value is None and key in report["null_reasons"]:
            print(f"{key}: null ({report['null_reasons'][key]})")
    print(f"(goals: memory ratio <= {GOAL}, time ratio <= {GOAL}; the extra encoder forward adds about 1/3 when "
          "the weights train, about 1/2 with adapters on frozen weights)")


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
            print(f"  {mode} batch {size}: failed: {str(err).splitlines()[-1] if str(err) else type(err).__name__}",
                  flush=True)
            continue
        finally:
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(f"  {mode} batch {size}: {result['samples_per_s']:.2f} samples/s, peak {result['peak_mib']:.0f} MiB",
              flush=True)
    figures, reasons = ratios(results)
    for failure in failures:  # a ratio that needed a failed configuration says so
        for key, value in figures.items():
            if value is None and key in reasons:
                reasons[key] += f"; {failure['mode']} batch {failure['batch']} failed"
    report: dict[str, Any] = {
        **{k: v for k, v in figures.items() if k.startswith(("memory_ratio_gradcache_b", "time_ratio", "cpu_time_ratio"))},
        "ratios": figures,
        "null_reasons": reasons,
        "goals": {"memory_ratio_max": GOAL, "time_ratio_max": GOAL,
                  "extra_encoder_forward_approx": {"full": 4 / 3, "dora": 3 / 2}},
        "memory_figure": "process peak RSS (MiB)" if args.device == "cpu" else "torch.cuda.max_memory_allocated (MiB)",
        "config": {"preset": args.preset, "decoder_preset": args.decoder_preset, "device": args.device,
                   "dtype": args.dtype, "attn": args.attn, "recipe": args.recipe,
                   "backbone_dtype": args.backbone_dtype, "gradient_checkpointing": args.gradient_checkpointing, "K": args.reason_tokens, "image_size": args.image_size,
                   "text_tokens": args.text_tokens, "plain_batches": args.plain_batches,
                   "gradcache_batches": args.gradcache_batches, "chunk_size": args.chunk_size, "steps": args.steps,
                   "threads": args.threads, "isolate": args.isolate, "stage": 2},
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
