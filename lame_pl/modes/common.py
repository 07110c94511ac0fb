"""What the four encode modes share: the encoder's output, forward passes and step positions.

Every mode reads a left-padded processor batch, so that whatever a mode appends (reason
tokens, fed-back states, generated tokens, [EMBED]) sits at the same positions in every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

if TYPE_CHECKING:
    from lame_pl.model import LaMEEncoder


class EncoderOutput(NamedTuple):
    """What one encoder pass yields.

    A ``NamedTuple``, not a dataclass: DeepSpeed ZeRO-3 looks for a module's output tensors in
    tuples, lists and dicts only, and gathers the encoder's own parameters (the reason and [EMBED]
    vectors) for the backward through hooks on those tensors.

    Attributes:
        embedding: L2-normalised embedding from the [EMBED] state, ``(B, D)``, float32.
        projected: The vector normalised into ``embedding``: the [EMBED] state after the optional
            projection, ``(B, D)``, float32 (its norm is what normalisation discards).
        embed_state: The [EMBED] final hidden state before projection and normalisation, ``(B, H)``.
        reason_states: Final hidden states of the K reason positions, ``(B, K, H)``; ``K`` may be 0.
        generated_ids: ``explicit_cot`` only: the generated token ids, ``(B, T)``; ``None`` otherwise.
    """

    embedding: torch.Tensor
    projected: torch.Tensor
    embed_state: torch.Tensor
    reason_states: torch.Tensor
    generated_ids: torch.Tensor | None = None


def text_config(backbone: nn.Module):
    """The language-model config of a Qwen-VL backbone (``config.text_config`` or the config itself)."""
    config = backbone.config
    return getattr(config, "text_config", config)


def pooled(
    encoder: LaMEEncoder,
    embed_state: torch.Tensor,
    reason_states: torch.Tensor,
    generated_ids: torch.Tensor | None = None,
) -> EncoderOutput:
    """The encoder's output: [EMBED]'s state projected, then L2-normalised in float32 into the embedding.

    The projection runs in its own weights' dtype with autocast off, so a bf16 backbone gives the
    same embedding with or without mixed precision (and never a dtype mismatch).
    """
    weight = getattr(encoder.projection, "weight", None)
    state = embed_state.to(torch.float32 if weight is None else weight.dtype)
    with torch.autocast(embed_state.device.type, enabled=False):
        projected = encoder.projection(state).float()
    return EncoderOutput(F.normalize(projected, dim=-1), projected, embed_state, reason_states, generated_ids)


def full_pass(
    encoder: LaMEEncoder,
    inputs: dict[str, Any],
    appended: torch.Tensor | None = None,
    bottleneck: bool = False,
    cache: DynamicCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass over the input followed by ``appended`` input vectors.

    Args:
        encoder: The encoder whose backbone runs.
        inputs: Processor outputs (``input_ids``, ``attention_mask``, optional ``mm_token_type_ids``,
            ``pixel_values``, ``image_grid_thw`` and other extras the backbone takes).
        appended: ``(B, n, H)`` or ``(n, H)`` vectors placed after the input, as text tokens.
        bottleneck: Apply the encoder's bottleneck mask (the last row sees only the appended rows).
        cache: A KV cache to fill, for steps that continue the sequence.

    Returns:
        The final hidden states ``(B, L, H)``, the extended attention mask ``(B, L)`` and the
        rotary position of the next token after the sequence, ``(B,)``.
    """
    inputs = dict(inputs)
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    mm_token_type_ids = inputs.pop("mm_token_type_ids", None)
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
    if appended is None:
        appended = encoder.embed_embedding[:0]
    if appended.dim() == 2:
        appended = appended.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    input_ids, attention_mask, mm_token_type_ids, inputs_embeds = encoder.extend_inputs(
        input_ids, attention_mask, mm_token_type_ids, appended
    )
    # Rotary positions from the ids (images get 3-D positions), computed here so that the same
    # positions serve with or without a custom mask, and the steps after this pass continue them.
    position_ids, deltas = encoder.backbone.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, **grids
    )
    if encoder.vision_every_pass:
        inputs_embeds, inputs = encoder.vision_first(inputs_embeds, inputs)
    mask = encoder.bottleneck_attention(inputs_embeds, attention_mask) if bottleneck else attention_mask
    # Only the embeddings go in: the backbone finds image positions by comparing them with the
    # image token's embedding (Qwen3-VL refuses ids and embeddings together).
    hidden = encoder.backbone(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        mm_token_type_ids=mm_token_type_ids,
        cache=cache,
        use_cache=cache is not None,
        **inputs,
    ).last_hidden_state
    # get_rope_index's delta is (largest position + 1) - (real tokens): the next text token of a
    # row sits one past the row's largest position, as in transformers' own generation.
    next_position = deltas.view(-1).to(attention_mask.device) + attention_mask.sum(dim=1)
    return hidden, attention_mask, next_position


@dataclass
class CachedSequence:
    """A sequence being extended one step at a time over a KV cache.

    Attributes:
        cache: Keys and values of every position so far.
        attention_mask: ``(B, L)``, 1 where a position is real.
        next_position: ``(B,)`` rotary position of each row's next real token.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor


def start_cached(encoder: LaMEEncoder, inputs: dict[str, Any]) -> tuple[torch.Tensor, CachedSequence]:
    """The prefix pass over the input alone: its last hidden state ``(B, H)`` and the filled cache."""
    cache = DynamicCache(config=text_config(encoder.backbone))
    hidden, mask, next_position = full_pass(encoder, inputs, cache=cache)
    return hidden[:, -1], CachedSequence(cache, mask, next_position)


def cached_step(
    encoder: LaMEEncoder, seq: CachedSequence, inputs_embeds: torch.Tensor, real: torch.Tensor | None = None
) -> torch.Tensor:
    """Runs ``(B, s, H)`` new input vectors over the cache and returns their final states.

    Args:
        encoder: The encoder whose backbone runs.
        seq: The sequence so far; extended in place.
        inputs_embeds: The new positions' input vectors.
        real: ``(B, s)`` 1 where a new position is real, 0 where it is padding (a row that
            stopped generating); all real when ``None``.
    """
    batch, steps = inputs_embeds.shape[:2]
    mask = seq.attention_mask
    if real is None:
        real = mask.new_ones(batch, steps)
    # Text positions advance by one per real token, the same on all three rotary axes.
    offsets = real.long().cumsum(dim=1) - real.long()
    positions = (seq.next_position.unsqueeze(1) + offsets).unsqueeze(0).expand(3, -1, -1)
    seq.attention_mask = torch.cat([mask, real.to(mask.dtype)], dim=1)
    seq.next_position = seq.next_position + real.long().sum(dim=1)
    return encoder.backbone(
        inputs_embeds=inputs_embeds,
        attention_mask=seq.attention_mask,
        position_ids=positions,
        cache=seq.cache,
        use_cache=True,
    ).last_hidden_state


def checkpointing_drops_cache(backbone: nn.Module) -> bool:
    """Whether a training forward would drop the KV cache (transformers does under activation checkpointing).

    Decided by the training mode alone, not by whether gradients are on: GradCache's first pass
    runs without them, and must take the same path, with the same dropout draws, as its second.
    """
    if not backbone.training:
        return False
    return any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules())
