"""One configuration of the training-step benchmark, measured in this process: time and peak memory.

Builds the module and one batch, runs a warm-up step, then the timed steps; reports their time, peak memory
and what the batch and the decoder's logits hold. ``lame_pl.benchmarks.train`` is the command line.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch

from lame_pl import BackboneSpec, DecoderSpec, LaMEModule, LoraSpec, Stage2Spec
from lame_pl.backbone import build_processor
from lame_pl.benchmarks.common import prompt_text, synchronize, synthetic_image, training_batch
from lame_pl.benchmarks.process_memory import (
    lifetime_peak_rss_mib,
    malloc_trim,
    proc_status_mib,
    reset_high_water_mark,
)


def backbone_spec(args: argparse.Namespace) -> BackboneSpec:
    """The backbone the run measures, with images fixed at ``--image-size`` squared."""
    area = args.image_size * args.image_size
    return BackboneSpec(
        preset=args.preset, min_pixels=area, max_pixels=area, attn_implementation=args.attn, dtype=args.backbone_dtype
    )


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
    module = LaMEModule(
        spec,
        DecoderSpec(preset=args.decoder_preset),
        num_reason_tokens=args.reason_tokens,
        stage=2,
        stage2=stage2,
        gradcache_chunk_size=chunk,
        gradient_checkpointing=args.gradient_checkpointing,
    )
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
            trimmed = malloc_trim()
            start_mib = proc_status_mib("VmRSS")
            peak_source = "VmHWM after clear_refs" if reset_high_water_mark() else None
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
        memory = {
            "memory_source": "torch.cuda.max_memory_allocated",
            "allocated_before_steps_mib": start_mib,
            "peak_allocated_mib": peak_mib,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        }
    else:
        lifetime = lifetime_peak_rss_mib()
        if peak_source is None:
            peak_mib = lifetime
            peak_source = (
                "ru_maxrss: /proc/self/clear_refs is not writable, so this is the process's lifetime "
                "peak (build and warm-up included)"
            )
        else:
            peak_mib = proc_status_mib("VmHWM")
        memory = {
            "memory_source": peak_source,
            "malloc_trim": trimmed,
            "rss_before_steps_mib": start_mib,
            "peak_rss_mib": peak_mib,
            "lifetime_peak_rss_mib": lifetime,
        }
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
        "mode": mode,
        "batch": size,
        "chunk": chunk,
        "steps": args.steps,
        "seconds": seconds,
        "step_times_s": times,
        "samples_per_s": size * args.steps / seconds,
        "s_per_sample": seconds / (size * args.steps),
        # This process's CPU time (all its threads): less sensitive than wall time to other work
        # on the machine when --threads does not exceed the idle cores.
        "cpu_seconds": sum(cpu_times),
        "cpu_step_times_s": cpu_times,
        "cpu_s_per_sample": sum(cpu_times) / (size * args.steps),
        "peak_mib": peak_mib,
        "start_mib": start_mib,
        "peak_over_start_mib": peak_mib - start_mib,
        **memory,
        "losses": losses,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "query_tokens": int(batch["query"]["input_ids"].shape[1]),
        "target_tokens": int(batch["target"]["input_ids"].shape[1]),
        "decoder_tokens": int(batch["decoder"]["input_ids"].shape[1]),
        "batch_tensors_mib": _tensor_mib({k: batch[k] for k in ("query", "target", "decoder")}),
        "decoder_vocabulary": vocab,
        "decoder_logit_positions_at_once": logit_rows,
        "decoder_logits_mib_at_once": logit_rows * vocab * 4 / 2**20,
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_mib": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
    }
