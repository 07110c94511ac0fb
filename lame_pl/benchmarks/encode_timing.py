"""What the encode-speed benchmark times: the encode modes, ``generate`` and CLIP, round-robin, and training steps.

One runner per encode mode, transformers' ``generate`` and the CLIP anchor, on the same inputs; stage-2
training steps of ``lame`` (with its decoder) against ``discriminative``. ``lame_pl.benchmarks.encode`` is
the command line and the report.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from lame_pl import BackboneSpec, DecoderSpec, LaMEModule
from lame_pl.benchmarks.common import synchronize
from lame_pl.model import LaMEEncoder
from lame_pl.modes import MODES, hf_generation_model

HF_GENERATE = "hf_generate"
CLIP = "clip"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_call(fn: Callable[[], Any], device: str) -> tuple[float, float | None]:
    """Seconds one call takes, and its peak CUDA memory in MiB (``None`` on a CPU)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return elapsed, peak


def build_runners(backbone: torch.nn.Module, args: argparse.Namespace) -> dict[str, Callable[[dict], Any]]:
    """One callable per mode (and ``generate``), all on ``backbone``."""
    dtype = DTYPES[args.dtype]
    K, T = args.reason_tokens, args.cot_tokens
    settings = {
        "discriminative": dict(num_reason_tokens=0),
        "lame": dict(num_reason_tokens=K),
        "latent_sequential": dict(num_reason_tokens=K),
        "explicit_cot": dict(num_reason_tokens=0, cot_tokens=T),
    }
    runners: dict[str, Callable[[dict], Any]] = {}
    for mode in MODES:
        encoder = LaMEEncoder(backbone, encode_mode=mode, **settings[mode]).to(args.device, dtype).eval()
        runners[mode] = encoder
    generator = hf_generation_model(backbone)
    pad = generator.generation_config.pad_token_id
    pad = pad if pad is not None else runners["lame"].placeholder_token_id

    def generate(inputs: dict) -> Any:
        # Greedy, exactly T new tokens: EOS is suppressed until then, as explicit_cot never stops early here.
        return generator.generate(**inputs, max_new_tokens=T, min_new_tokens=T, do_sample=False, pad_token_id=pad)

    def run(module: Any) -> Callable[[dict], Any]:
        return lambda inputs: module(**inputs)

    out = {mode: run(encoder) for mode, encoder in runners.items()}
    out[HF_GENERATE] = generate
    return out


def clip_runner(args: argparse.Namespace) -> tuple[Callable[[dict], Any], dict[str, Any]]:
    """The clip row's runner (given a batch size's CLIP inputs) and what it measures, for the report."""
    from lame_pl.clip_anchor import CLIPAnchor
    from lame_pl.clip_spec import CLIPSpec

    spec = CLIPSpec(arch=args.clip_arch, image_size=args.image_size)
    module = CLIPAnchor(spec).to(args.device, DTYPES[args.dtype]).eval()
    params = sum(p.numel() for p in module.clip.parameters())
    return module.encode, {"arch": args.clip_arch, "parameters": params, "context_length": spec.text_length}


def clip_inputs(text: str, image: Image.Image, batch: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A batch of the same image and text as CLIP inputs (open_clip's transform and tokenizer)."""
    from lame_pl.clip_spec import CLIPSpec
    from lame_pl.datamodules.clip import CLIPProcessor

    processor = CLIPProcessor(CLIPSpec(arch=args.clip_arch, image_size=args.image_size))
    return {
        "image": processor.images([image] * batch).to(args.device, DTYPES[args.dtype]),
        "text": processor.texts([text] * batch).to(args.device),
    }


def time_modes(runners: dict[str, Callable[[dict], Any]], inputs: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Round-robin timing of every runner on ``inputs``: median seconds and peak memory per runner."""
    batch = int(inputs["input_ids"].shape[0])
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, float | None] = {name: None for name in runners}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            for name, runner in runners.items():
                elapsed, peak = time_call(lambda runner=runner: runner(inputs), args.device)
                if round_ >= args.warmup:
                    times[name].append(elapsed)
                    if peak is not None:
                        peaks[name] = max(peaks[name] or 0.0, peak)
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {
            "batch_size": batch,
            "median_s": median,
            "times_s": values,
            "ms_per_sample": 1000 * median / batch,
            "samples_per_s": batch / median,
            "peak_memory_mib": peaks[name],
        }
    return results


def time_training(spec: BackboneSpec, batch: dict[str, Any], args: argparse.Namespace) -> dict[str, dict]:
    """Samples per second of stage-2 steps for ``lame`` (with its decoder) and ``discriminative``."""
    results = {}
    for mode in ("discriminative", "lame"):
        k = args.reason_tokens if mode == "lame" else 0
        decoder = DecoderSpec(preset=args.decoder_preset) if mode == "lame" else None
        torch.manual_seed(0)
        module = LaMEModule(spec, decoder, num_reason_tokens=k, encode_mode=mode, stage=2, lr=1e-5)
        module = module.to(args.device).train()
        optimizer = module.configure_optimizers()
        autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

        def step(module=module, optimizer=optimizer, autocast=autocast) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss, _, _ = module.model_step(batch, "train")
            loss.backward()
            optimizer.step()

        time_call(step, args.device)
        times, peak = [], None
        for _ in range(args.train_steps):
            elapsed, p = time_call(step, args.device)
            times.append(elapsed)
            peak = p if p is None else max(peak or 0.0, p)
        size = len(batch["keys"])
        median = statistics.median(times)
        results[mode] = {
            "batch_size": size,
            "median_step_s": median,
            "step_times_s": times,
            "samples_per_s": size / median,
            "peak_memory_mib": peak,
            "decoder": args.decoder_preset if decoder else None,
        }
        del module, optimizer
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def parameter_counts(backbone: torch.nn.Module) -> dict[str, int]:
    """Parameters of the backbone: all, the token table, the vision tower."""
    total = sum(p.numel() for p in backbone.parameters())
    table = backbone.get_input_embeddings().weight.numel()
    vision = sum(p.numel() for p in getattr(backbone, "visual", torch.nn.Module()).parameters())
    return {
        "total": total,
        "token_embedding": table,
        "vision_tower": vision,
        "language_model_without_embedding": total - table - vision,
    }
