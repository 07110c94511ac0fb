"""Where [EMBED] looks: the last layer's attention probabilities, captured for one diagnostic forward.

The encoder runs SDPA or flash attention, which return no attention weights. For the diagnostic
forward only, the language model is switched to eager attention (which returns them from every
attention module) and a forward hook on the last decoder layer's attention records them; both
are undone afterwards, also on an error. The vision tower keeps its own implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lame_pl.modes import TokenLayout


def _language_model(backbone: nn.Module) -> nn.Module:
    language_model = getattr(backbone, "language_model", None)
    if (
        language_model is None
        or not hasattr(language_model, "layers")
        or not hasattr(language_model, "set_attn_implementation")
    ):
        raise ValueError(
            f"{type(backbone).__name__} has no transformers language_model with layers: cannot probe its attention"
        )
    return language_model


@contextmanager
def last_layer_attention(backbone: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``backbone`` appends its last layer's ``(B, heads, Lq, Lk)`` probabilities.

    Raises:
        RuntimeError: When the attention module returns no weights despite eager attention.
    """
    language_model = _language_model(backbone)
    attention = language_model.layers[-1].self_attn
    previous = language_model.config._attn_implementation
    records: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, output: tuple) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention weights under eager attention")
        records.append(weights.detach())

    language_model.set_attn_implementation("eager")
    handle = attention.register_forward_hook(record)
    try:
        yield records
    finally:
        handle.remove()
        language_model.set_attn_implementation(previous)


def embed_attention_shares(weights: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """How the last query position ([EMBED]) splits its attention between the spans of the layout.

    Args:
        weights: ``(B, heads, Lq, Lk)`` attention probabilities of the pass whose last query and
            key are [EMBED] (the keys are the whole sequence: the input, then the mode's middle
            positions, then [EMBED]).
        layout: Where the spans sit (``EncodeSettings.layout``).

    Returns:
        ``{"input", layout.middle_name, "embed"}``: per-sample shares ``(B,)``, averaged over
        heads; they sum to 1.
    """
    if weights.ndim != 4:
        raise ValueError(f"attention of shape {tuple(weights.shape)} is not (batch, heads, queries, keys)")
    row = weights[:, :, -1, :].double().mean(1)
    return {name: row[:, span].sum(-1) for name, span in layout.spans(weights.shape[-1]).items()}
