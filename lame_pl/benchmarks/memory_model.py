"""Peak GPU memory of one LaME training step on one device, computed, and the model compared with a CPU step.

No GPU has been lent to this project, so the single-GPU recipe (``configs/qwen2vl-2b/single_gpu*.yaml``)
is sized from this memory model rather than measured. The model, in bytes, for a step of the 2B
recipe (bf16 backbone, bf16-mixed autocast, gradient checkpointing, GradCache in chunks of C rows,
AdamW on what the stage trains):

* **static**: backbone weights (their dtype); each trained float32 parameter 16 bytes (weight,
  gradient, AdamW's two moments); autocast's cache of their bf16 copies, 2 bytes each, alive for
  the whole ``training_step`` (every GradCache chunk runs inside one autocast region).
* **per chunk** (n = C x S tokens of the longest row S; one graph per side encoded with a graph:
  the query in stage 1, query and target in stage 2):
  - the checkpointed inputs of each language-model layer, bf16: ``sides x L x n x H x 2``;
  - the final norm and output outside the checkpoints: ``sides x n x H x 10``;
  - one layer recomputed and back-propagated: ``n x (a H + b I + c) + f H I``, with a, b, c, f
    measured through the same code (``calibrate``: one Qwen2-VL layer with the recipe's DoRA
    adapters, forward and backward under bf16 autocast, at four small shapes and two lengths);
  - the decoder's logits over its vocabulary V for the chunk's label tokens P (bf16 logits, float32
    log-softmax and their gradients): ``P x V x 16``; its own layers (checkpointed, K + label
    tokens a row) are small beside them;
  - the frozen vision tower keeps no graph; its forward runs on C images at once while the other
    side's graph is alive: ``C x patches x E x 28`` (a rough figure, not measured).
* **optimiser step**: the activations are gone; foreach AdamW adds one float32 copy of the trained
  parameters (``sqrt`` of the second moment): ``4`` bytes each.

The peak is the larger of the backward phase and the optimiser phase; a card needs the peak plus
1 GiB (CUDA context, cuBLAS workspaces) plus 15% (allocator fragmentation) of it. ``--validate``
runs the real GradCache step (``LaMEModule.training_step``) on the CPU at small size under a
tracker of live tensor storages (what ``torch.cuda.max_memory_allocated`` counts on a GPU) and
compares the peak with this model at that shape.

    python tools/estimate_memory.py                       # the 2B recipe: chunks that fit 24/48/80 GB
    python tools/estimate_memory.py --validate --json OUT.json   # the model against a measured CPU step
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lame_pl.benchmarks.memory_probe import calibrate, measure_step

GiB = 2**30
# One layer's recompute + backward per token: a * hidden + b * intermediate + c bytes, plus f bytes
# per hidden x intermediate element (DoRA's transient weight-sized tensors). Measured by
# `calibrate()` on this project's 2-core CPU (torch 2.14, transformers 5.24, peft 0.21): the slope
# model reproduces a fourth shape within 3%; f varies from 36 to 49 over the shapes (the larger
# is used).
LAYER_COEFFICIENTS = {"a": 69.6, "b": 22.2, "c": 10040.0, "f": 49.0}
CONTEXT_BYTES = 1 * GiB  # CUDA context and library workspaces, outside the allocator's count
FRAGMENTATION = 0.15  # the caching allocator reserves more than it hands out
TIERS_GB = (24, 48, 80)  # cards as sold: 10^9 bytes (a "24 GB" card reports 22.4 to 24 GiB)


@dataclass(frozen=True)
class Shapes:
    """What the memory model needs to know about a run (the 2B recipe's by default).

    Args:
        hidden, intermediate, layers: The backbone's language model.
        vision_embed, merge: The vision tower's width and spatial merge (tokens are merge^2 patches).
        decoder_hidden, decoder_intermediate, decoder_layers: The latent decoder.
        vocab: The decoder's output vocabulary (its softmax runs over it).
        backbone_params, decoder_params: Parameter counts (``parameter_counts`` finds them).
        lora_params: Adapter parameters (0 without LoRA).
        extra_params: What LaME adds and trains in stage 2: reason and [EMBED] vectors, projection.
        projector_params: The decoder's projector (trained with the decoder).
        backbone_bytes: Bytes per backbone weight (2 for bf16).
        reason_tokens: K.
        label_tokens: Decoder label tokens a row (``decoder_max_length``).
    """

    hidden: int = 1536
    intermediate: int = 8960
    layers: int = 28
    vision_embed: int = 1280
    merge: int = 2
    decoder_hidden: int = 1024
    decoder_intermediate: int = 3072
    decoder_layers: int = 28
    vocab: int = 151936
    backbone_params: int = 2_208_985_600
    decoder_params: int = 596_049_920
    lora_params: int = 19_109_888
    extra_params: int = 1536 * 3584 + 3584 + 9 * 1536
    projector_params: int = 1536 * 1024 + 1024 + 1024 * 1024 + 1024
    backbone_bytes: int = 2
    reason_tokens: int = 8
    label_tokens: int = 32


def trained_params(shapes: Shapes, stage: int) -> int:
    """Float32 parameters AdamW updates: the decoder and its projector in both stages (and the
    reason vectors); in stage 2 also the adapters, [EMBED] and the projection."""
    if stage == 1:
        return shapes.decoder_params + shapes.projector_params + shapes.reason_tokens * shapes.hidden
    return shapes.decoder_params + shapes.projector_params + shapes.lora_params + shapes.extra_params


def estimate(
    shapes: Shapes, stage: int, chunk: int, seq: int, image_tokens: int, coefficients: dict[str, float] | None = None
) -> dict[str, float]:
    """Peak bytes of one training step, by part.

    Args:
        shapes: The run's shapes.
        stage: 1 (query side only, no contrastive pass) or 2 (query and target).
        chunk: GradCache chunk size C (rows encoded with a graph at once).
        seq: Tokens of the chunk's longest row (padding included), K + 1 appended ones included.
        image_tokens: Merged image tokens a row (its vision-tower work).
        coefficients: One layer's recompute figures (``LAYER_COEFFICIENTS`` by default).

    Returns:
        Bytes of each part, ``peak`` (the allocator's high-water mark) and ``card`` (what a card
        needs: the peak, fragmentation and the CUDA context).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if chunk < 1 or seq < 1 or image_tokens < 0:
        raise ValueError(f"need chunk >= 1, seq >= 1 and image_tokens >= 0, got {chunk}, {seq}, {image_tokens}")
    k = coefficients or LAYER_COEFFICIENTS
    s = shapes
    trained = trained_params(s, stage)
    sides = 1 if stage == 1 else 2
    n = chunk * seq
    parts = {
        "backbone_weights": s.backbone_params * s.backbone_bytes,
        "trained_weights_grads_adamw": 16 * trained,
        "autocast_cache": 2 * trained,
        "checkpointed_layer_inputs": sides * s.layers * n * s.hidden * 2,
        "final_norm_and_output": sides * n * s.hidden * 10,
        "one_layer_recompute": n * (k["a"] * s.hidden + k["b"] * s.intermediate + k["c"])
        + k["f"] * s.hidden * s.intermediate,
        "decoder_logits": chunk * s.label_tokens * s.vocab * 16,
        "decoder_layers": chunk * (s.reason_tokens + s.label_tokens) * s.decoder_hidden * 2 * s.decoder_layers
        + chunk * (s.reason_tokens + s.label_tokens) * (k["a"] * s.decoder_hidden + k["b"] * s.decoder_intermediate),
        "vision_forward": chunk * image_tokens * s.merge**2 * s.vision_embed * 28,
    }
    static = parts["backbone_weights"] + parts["trained_weights_grads_adamw"]
    graphs = sum(
        parts[name]
        for name in ("checkpointed_layer_inputs", "final_norm_and_output", "decoder_logits", "decoder_layers")
    )
    # The backward of one layer, or the other side's vision forward while one graph is alive.
    backward = static + parts["autocast_cache"] + graphs + parts["one_layer_recompute"]
    vision = static + parts["autocast_cache"] + graphs / sides + parts["vision_forward"]
    optimiser = static + 4 * trained
    peak = max(backward, vision, optimiser)
    return {
        **{name: float(v) for name, v in parts.items()},
        "backward_phase": float(backward),
        "vision_phase": float(vision),
        "optimiser_phase": float(optimiser),
        "peak": float(peak),
        "card": float(peak * (1 + FRAGMENTATION) + CONTEXT_BYTES),
    }


def largest_chunk(shapes: Shapes, stage: int, seq: int, image_tokens: int, capacity: float, limit: int = 1024) -> int:
    """The largest power-of-two chunk whose ``card`` figure fits ``capacity`` bytes (0: none fits)."""
    best, chunk = 0, 1
    while chunk <= limit and estimate(shapes, stage, chunk, seq, image_tokens)["card"] <= capacity:
        best, chunk = chunk, chunk * 2
    return best


def parameter_counts(backbone_preset: str, decoder_preset: str) -> dict[str, int]:
    """Backbone, decoder and LoRA parameter counts of presets, built on the meta device (no memory)
    through the project's own builders and ``add_lora`` with the recipe's ``LoraSpec``."""
    from lame_pl.backbone import BackboneSpec, DecoderSpec, build_backbone, build_decoder
    from lame_pl.stages import LoraSpec, add_lora

    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(preset=backbone_preset, attn_implementation="sdpa"))
        decoder = build_decoder(DecoderSpec(preset=decoder_preset), "sdpa")
        before = sum(p.numel() for p in backbone.parameters())
        add_lora(backbone.language_model, LoraSpec())
    return {
        "backbone": before,
        "decoder": sum(p.numel() for p in decoder.parameters()),
        "lora": sum(p.numel() for p in backbone.parameters()) - before,
    }


def shapes_of(
    backbone_preset: str,
    decoder_preset: str,
    embed_dim: int | None,
    reason_tokens: int,
    label_tokens: int,
    vocab: int | None = None,
) -> Shapes:
    """``Shapes`` of two presets (the 2B recipe: ``qwen2vl-2b-shape``, ``qwen3-0.6b-shape``, 3584)."""
    from lame_pl.backbone import BACKBONE_PRESETS, DECODER_PRESETS, QWEN2_VOCAB_SIZE

    text, vision = BACKBONE_PRESETS[backbone_preset]["text"], BACKBONE_PRESETS[backbone_preset]["vision"]
    dec = DECODER_PRESETS[decoder_preset]
    counts = parameter_counts(backbone_preset, decoder_preset)
    hidden, width = text["hidden_size"], dec["hidden_size"]
    projection = hidden * embed_dim + embed_dim if embed_dim else 0
    return Shapes(
        hidden=hidden,
        intermediate=text["intermediate_size"],
        layers=text["num_hidden_layers"],
        vision_embed=vision["embed_dim"],
        decoder_hidden=width,
        decoder_intermediate=dec["intermediate_size"],
        decoder_layers=dec["num_hidden_layers"],
        vocab=vocab or QWEN2_VOCAB_SIZE,
        backbone_params=counts["backbone"],
        decoder_params=counts["decoder"],
        lora_params=counts["lora"],
        extra_params=projection + (reason_tokens + 1) * hidden,
        projector_params=hidden * width + width + width * width + width,
        reason_tokens=reason_tokens,
        label_tokens=label_tokens,
    )


# ----------------------------------------------------------------------------- the model against the CPU


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """The model against measured steps at small size: each chunk size and image size, and the
    growth from the smallest chunk (what the activations add), predicted against measured."""
    base = shapes_of(args.preset, args.decoder_preset, args.embed_dim, args.reason_tokens, 32)
    rows = []
    for image_size in args.image_sizes:
        for chunk in args.chunks:
            got = measure_step(
                args.preset,
                args.decoder_preset,
                args.stage,
                chunk,
                max(args.validate_batch, chunk),
                image_size,
                args.text_tokens,
                args.reason_tokens,
                args.embed_dim,
            )
            shapes = Shapes(**{**asdict(base), "label_tokens": got["label_tokens"]})
            model = estimate(shapes, args.stage, chunk, got["seq"], got["image_tokens"])
            # What the tracker sees: the step's allocations (gradients, autocast's cache,
            # activations, AdamW's temporaries), not the weights and AdamW state made before it.
            before = shapes.backbone_params * shapes.backbone_bytes + 12 * trained_params(shapes, args.stage)
            predicted = model["peak"] - before
            rows.append(
                {
                    "image_size": image_size,
                    "chunk": chunk,
                    "seq": got["seq"],
                    "measured_mib": got["peak_bytes"] / 2**20,
                    "predicted_mib": predicted / 2**20,
                    "ratio": predicted / got["peak_bytes"],
                }
            )
            print(
                f"  {image_size}px chunk {chunk} ({got['seq']} tokens a row): measured "
                f"{got['peak_bytes'] / 2**20:.0f} MiB, model {predicted / 2**20:.0f} MiB",
                flush=True,
            )
    return {"rows": rows, "worst_ratio_error": max(abs(r["ratio"] - 1) for r in rows)}


# ----------------------------------------------------------------------------- the 2B table


def recipe_table(seq: int, image_tokens: int, batch: int) -> list[dict[str, Any]]:
    """For each card, stage and chunk size in powers of two: the model's figures, and the largest
    chunk that fits (the 2B recipe's shapes)."""
    shapes = Shapes()
    out = []
    for stage in (1, 2):
        for gb in TIERS_GB:
            chunk = largest_chunk(shapes, stage, seq, image_tokens, gb * 1e9)
            figures = estimate(shapes, stage, max(chunk, 1), seq, image_tokens)
            out.append(
                {
                    "card_gb": gb,
                    "stage": stage,
                    "largest_chunk": chunk,
                    "peak_gib": figures["peak"] / GiB,
                    "card_gib": figures["card"] / GiB,
                    "chunks_per_step": math.ceil(batch / chunk) if chunk else None,
                }
            )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seq",
        type=int,
        default=1536,
        help="tokens of the longest row of a chunk (default 1536: 1,280 image tokens, 247 text, K+1)",
    )
    parser.add_argument("--image-tokens", type=int, default=1280, help="merged image tokens a row (default 1280)")
    parser.add_argument("--batch", type=int, default=1024, help="global batch for the chunk count (default 1024)")
    parser.add_argument("--chunks-table", action="store_true", help="print every part for chunks 1 to 64")
    parser.add_argument("--validate", action="store_true", help="measure steps at small size on the CPU and compare")
    parser.add_argument("--calibrate", action="store_true", help="re-measure LAYER_COEFFICIENTS (about a minute)")
    parser.add_argument("--preset", default="small", help="--validate: backbone preset (default small)")
    parser.add_argument("--decoder-preset", default="demo", help="--validate: decoder preset (default demo)")
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2], help="--validate: stage (default 2)")
    parser.add_argument(
        "--chunks",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[2, 4, 8],
        help="--validate: chunk sizes (default 2,4,8)",
    )
    parser.add_argument(
        "--image-sizes",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[112, 224],
        help="--validate: image sides, multiples of 28 (default 112,224)",
    )
    parser.add_argument("--validate-batch", type=int, default=16, help="--validate: rows a step (default 16)")
    parser.add_argument("--text-tokens", type=int, default=16, help="--validate: instruction tokens (default 16)")
    parser.add_argument("--reason-tokens", type=int, default=8, help="--validate: K (default 8)")
    parser.add_argument("--embed-dim", type=int, default=None, help="--validate: projection width (default none)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the 2B table (and, if asked, the calibration and the validation); write the JSON."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "seq": args.seq,
        "image_tokens": args.image_tokens,
        "coefficients": LAYER_COEFFICIENTS,
        "context_gib": CONTEXT_BYTES / GiB,
        "fragmentation": FRAGMENTATION,
    }
    if args.calibrate:
        report["calibration"] = calibrate()
        print("calibration:", json.dumps(report["calibration"]))
    if args.validate:
        if any(size % 28 for size in args.image_sizes):
            raise SystemExit(f"--image-sizes must be multiples of 28, got {args.image_sizes}")
        report["validation"] = validate(args)
        print(f"worst |model / measured - 1|: {report['validation']['worst_ratio_error']:.3f}")
    batch = args.batch
    table = recipe_table(args.seq, args.image_tokens, batch)
    report["recipe"] = table
    print(f"2B recipe, rows of {args.seq} tokens ({args.image_tokens} image tokens), global batch {batch}:")
    print("| stage | card | largest chunk | allocator peak GiB | card needs GiB | chunks a step |")
    print("|---|---|---:|---:|---:|---:|")
    for row in table:
        print(
            f"| {row['stage']} | {row['card_gb']} GB | {row['largest_chunk'] or 'none'} | {row['peak_gib']:.1f} | "
            f"{row['card_gib']:.1f} | {row['chunks_per_step'] or '-'} |"
        )
    if args.chunks_table:
        shapes = Shapes()
        report["parts"] = {}
        for stage in (1, 2):
            for chunk in (1, 2, 4, 8, 16, 32, 64):
                parts = estimate(shapes, stage, chunk, args.seq, args.image_tokens)
                report["parts"][f"stage{stage}_chunk{chunk}"] = {k: v / GiB for k, v in parts.items()}
                print(f"stage {stage} chunk {chunk}: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0
