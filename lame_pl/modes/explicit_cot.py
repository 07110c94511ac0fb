"""``explicit_cot``: greedy generation of T text tokens over the KV cache, then [EMBED] (UME-R1).

Inference only. The backbone is a base Qwen-VL model without an LM head, so the logits come
from the input-embedding matrix used as a tied head (``hidden @ embed_tokens.weight.T``).
Qwen2-VL-2B ties its embeddings, so for it this is the real head; checkpoints with an untied
head (Qwen2-VL-7B) would generate different text, at the same cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lame_pl.modes.common import cached_step, pooled, start_cached, text_config

if TYPE_CHECKING:
    from lame_pl.model import LaMEEncoder
    from lame_pl.modes.common import EncoderOutput


@torch.no_grad()
def encode_explicit_cot(encoder: LaMEEncoder, inputs: dict[str, Any]) -> EncoderOutput:
    """Generates ``encoder.settings.cot_tokens`` tokens greedily, then reads [EMBED]'s state.

    A row stops early at one of ``encoder.cot_stop_token_ids`` (the stop token is kept, the
    rest of the row is masked padding); with no stop ids every row gets exactly T tokens.
    The last generated token and [EMBED] go through the backbone together, in one step.
    """
    if encoder.training:
        raise RuntimeError(
            "encode_mode 'explicit_cot' is inference only (greedy generation has no gradient): "
            "call .eval() to encode, or train in another mode"
        )
    table = encoder.backbone.get_input_embeddings()
    state, seq = start_cached(encoder, inputs)
    batch = state.shape[0]
    stop_ids = torch.tensor(list(encoder.cot_stop_token_ids), dtype=torch.long, device=state.device)
    pad_id = encoder.placeholder_token_id
    stopped = torch.zeros(batch, dtype=torch.bool, device=state.device)
    generated = []
    embed = encoder.embed_embedding.to(state.dtype).expand(batch, -1).unsqueeze(1)
    steps = encoder.settings.cot_tokens
    for t in range(steps):
        token = tied_logits(state, table.weight).argmax(dim=-1)
        real = ~stopped
        token = torch.where(real, token, torch.full_like(token, pad_id))
        generated.append(token)
        stopped = stopped | torch.isin(token, stop_ids)
        if t == steps - 1 or bool(stopped.all()):
            break
        state = cached_step(encoder, seq, table(token).unsqueeze(1), real.long().unsqueeze(1))[:, -1]
    last = table(generated[-1]).unsqueeze(1)
    real = torch.stack([real, torch.ones_like(real)], dim=1)
    embed_state = cached_step(encoder, seq, torch.cat([last, embed], dim=1), real.long())[:, -1]
    reason_states = embed_state.new_zeros(batch, 0, embed_state.shape[-1])
    return pooled(encoder, embed_state, reason_states, torch.stack(generated, dim=1))


def tied_logits(hidden: torch.Tensor, embedding_table: torch.Tensor) -> torch.Tensor:
    """Next-token logits from final states with the input-embedding table as the head."""
    return hidden @ embedding_table.T


def unties_head(backbone: nn.Module) -> bool:
    """Whether the backbone was loaded from a checkpoint that declares an LM head separate from its embeddings.

    Random presets have no head at all, so for them the tied head is the only one.
    """
    config = backbone.config
    if not getattr(config, "_name_or_path", ""):
        return False
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(text_config(backbone), "tie_word_embeddings", True)
    return not tied


def hf_generation_model(backbone: nn.Module) -> nn.Module:
    """transformers' own generation model around ``backbone``, with the same tied head.

    Shares every weight with ``backbone`` (nothing is copied), so that ``generate`` can be
    compared with ``explicit_cot`` on the same model.
    """
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(backbone.config)
    table = backbone.get_input_embeddings()
    model.model = backbone
    model.lm_head = nn.Linear(table.weight.shape[1], table.weight.shape[0], bias=False, device="meta")
    model.lm_head.weight = table.weight
    return model.eval() if not backbone.training else model
