"""What a LaME module trains, part by part: counts for the log at the start of each stage."""

from __future__ import annotations

from torch import nn

# (name prefix, part); the first match wins, so longer prefixes come first.
PARTS = (
    ("encoder.backbone.visual.", "vision tower"),
    ("encoder.backbone.language_model.", "language model"),
    ("encoder.backbone.", "backbone (other)"),
    ("encoder.reason_embeddings", "reason tokens"),
    ("encoder.embed_embedding", "[EMBED] token"),
    ("encoder.projection.", "[EMBED] projection"),
    ("log_logit_scale", "logit scale"),
    ("decoder.projector.", "decoder projector"),
    ("decoder.", "decoder LM"),
)
LOW_PRECISION = ("bfloat16", "float16")
ORDER = (
    "vision tower",
    "language model",
    "LoRA adapters",
    "backbone (other)",
    *(part for _, part in PARTS[3:]),
    "other",
)


def part_of(name: str) -> str:
    """The part a parameter belongs to, by its name in the module (adapters count apart)."""
    if "lora_" in name:
        return "LoRA adapters"
    return next((part for prefix, part in PARTS if name.startswith(prefix)), "other")


def trainable_counts(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{part: (trainable elements, all elements)}``, backbone first, parts without parameters left out."""
    counts: dict[str, list[int]] = {}
    for name, param in module.named_parameters():  # tied weights come once
        count = counts.setdefault(part_of(name), [0, 0])
        count[0] += param.numel() if param.requires_grad else 0
        count[1] += param.numel()
    return {part: (counts[part][0], counts[part][1]) for part in ORDER if part in counts}


def _short(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def trainable_summary(module: nn.Module, title: str) -> str:
    """One line: ``"<title> trains 1.2M of 25.0M parameters: vision tower 0/5.0M, ..."``."""
    counts = trainable_counts(module)
    trained = sum(t for t, _ in counts.values())
    total = sum(n for _, n in counts.values())
    parts = ", ".join(f"{part} {_short(t)}/{_short(n)}" for part, (t, n) in counts.items())
    return f"{title} trains {_short(trained)} of {_short(total)} parameters: {parts}"


def low_precision_trainable(module: nn.Module) -> str:
    """The parts whose trainable parameters are stored in bfloat16 or float16, with counts ("" if none)."""
    counts: dict[str, int] = {}
    for name, param in module.named_parameters():
        if param.requires_grad and str(param.dtype).removeprefix("torch.") in LOW_PRECISION:
            key = f"{part_of(name)} in {str(param.dtype).removeprefix('torch.')}"
            counts[key] = counts.get(key, 0) + param.numel()
    return ", ".join(f"{key}: {_short(n)}" for key, n in counts.items())
