"""``latent_sequential``: K autoregressive latent steps before [EMBED] (PLUME, Coconut).

One pass over the input; then K steps, each feeding the last final hidden state back as the
next position's input vector, over the KV cache; then [EMBED]. Step k's input is the state fed
back plus the learnable reason vector k: the vectors mark the step (like a position) and give
the mode the same trainable input-side parameters as ``lame``, so a stage that freezes the
language model still trains something before the latent chain. With zero vectors it is
Coconut's plain feedback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lame_pl.modes.common import (
    cached_step,
    checkpointing_drops_cache,
    full_pass,
    pooled,
    start_cached,
)

if TYPE_CHECKING:
    from lame_pl.model import LaMEEncoder
    from lame_pl.modes.common import EncoderOutput


def encode_latent_sequential(
    encoder: LaMEEncoder, inputs: dict[str, Any], use_cache: bool | None = None
) -> EncoderOutput:
    """Encodes with K sequential latent steps; trainable (gradients flow through every step).

    Args:
        encoder: The encoder (its K reason vectors and [EMBED] vector are used).
        inputs: Processor outputs, left-padded.
        use_cache: Extend the sequence over a KV cache (the default), or recompute the whole
            growing sequence at every step (the reference computation, and the fallback when
            activation checkpointing is on in training, where transformers drops the cache).

    Returns:
        The output; ``reason_states`` are the K latent positions' final states, each of which
        (bar the last, followed by [EMBED]) is fed back as the next step's input.
    """
    if use_cache is None:
        use_cache = not checkpointing_drops_cache(encoder.backbone)
    step = _cached_steps if use_cache else _recomputed_steps
    reason_states, embed_state = step(encoder, inputs)
    return pooled(encoder, embed_state, reason_states)


def _cached_steps(encoder: LaMEEncoder, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    state, seq = start_cached(encoder, inputs)
    states = []
    for k in range(encoder.num_reason_tokens):
        step_input = state + encoder.reason_embeddings[k].to(state.dtype)
        state = cached_step(encoder, seq, step_input.unsqueeze(1))[:, -1]
        states.append(state)
    embed = encoder.embed_embedding.to(state.dtype).expand(state.shape[0], -1)
    embed_state = cached_step(encoder, seq, embed.unsqueeze(1))[:, -1]
    return torch.stack(states, dim=1), embed_state


def _recomputed_steps(encoder: LaMEEncoder, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, _, _ = full_pass(encoder, inputs)
    state = hidden[:, -1]
    fed: list[torch.Tensor] = []
    states = []
    for k in range(encoder.num_reason_tokens):
        fed.append(state + encoder.reason_embeddings[k].to(state.dtype))
        hidden, _, _ = full_pass(encoder, inputs, appended=torch.stack(fed, dim=1))
        state = hidden[:, -1]
        states.append(state)
    embed = encoder.embed_embedding.to(state.dtype).expand(state.shape[0], -1)
    hidden, _, _ = full_pass(encoder, inputs, appended=torch.stack([*fed, embed], dim=1))
    return torch.stack(states, dim=1), hidden[:, -1]
