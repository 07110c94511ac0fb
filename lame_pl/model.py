"""The LaME encoder: ``[input][REASON]×K[EMBED]`` through a Qwen-VL backbone in one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask


@dataclass
class EncoderOutput:
    """What one encoder pass yields.

    Attributes:
        embedding: L2-normalised embedding from the [EMBED] state, ``(B, D)``.
        embed_state: The [EMBED] final hidden state before projection and normalisation, ``(B, H)``.
        reason_states: Final hidden states of the K reason tokens, ``(B, K, H)``; ``K`` may be 0.
    """

    embedding: torch.Tensor
    embed_state: torch.Tensor
    reason_states: torch.Tensor


def text_config(backbone: nn.Module):
    """The language-model config of a Qwen-VL backbone (``config.text_config`` or the config itself)."""
    config = backbone.config
    return getattr(config, "text_config", config)


class LaMEEncoder(nn.Module):
    """Appends K learnable reason vectors and one [EMBED] vector to a left-padded input.

    The inputs come from the Qwen-VL processor, left-padded so that the appended tokens sit at the
    same positions for every row: reason tokens at ``[-K-1, -1)`` and [EMBED] at ``-1``. Their
    token ids in ``input_ids`` are the pad id (only their embeddings matter); they are text tokens
    for the multimodal rotary positions.

    Args:
        backbone: A Qwen-VL base model (``Qwen2VLModel`` and relatives) with ``language_model``.
        num_reason_tokens: K; 0 gives the discriminative baseline (one pass, [EMBED] only).
        bottleneck_mask: If True, [EMBED] attends only to the reason tokens and itself, so all
            information about the input must pass through the K reason states.
        embed_dim: Output width of a linear projection after [EMBED]; ``None`` keeps the hidden size.
        placeholder_token_id: Id written into ``input_ids`` at the appended positions.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_reason_tokens: int = 8,
        bottleneck_mask: bool = False,
        embed_dim: int | None = None,
        placeholder_token_id: int = 0,
    ) -> None:
        super().__init__()
        if num_reason_tokens < 0:
            raise ValueError(f"num_reason_tokens must be >= 0, got {num_reason_tokens}")
        if bottleneck_mask and num_reason_tokens == 0:
            raise ValueError("bottleneck_mask=True needs num_reason_tokens > 0: [EMBED] would see nothing")
        attn = getattr(text_config(backbone), "_attn_implementation", None)
        if bottleneck_mask and attn == "flash_attention_2":
            raise ValueError(
                "bottleneck_mask needs an arbitrary attention mask, which flash_attention_2 cannot take; "
                "set backbone.attn_implementation to 'sdpa' or 'eager'"
            )
        self.backbone = backbone
        self.num_reason_tokens = num_reason_tokens
        self.bottleneck_mask = bottleneck_mask
        self.placeholder_token_id = placeholder_token_id
        hidden = text_config(backbone).hidden_size
        table = backbone.get_input_embeddings().weight
        # Start the new vectors at the scale of real token embeddings, whatever the checkpoint.
        std = float(table.detach().float().std())
        self.reason_embeddings = nn.Parameter(torch.randn(num_reason_tokens, hidden) * std)
        self.embed_embedding = nn.Parameter(torch.randn(1, hidden) * std)
        self.projection = nn.Linear(hidden, embed_dim) if embed_dim else nn.Identity()

    @property
    def embedding_dim(self) -> int:
        """Width of the output embedding."""
        if isinstance(self.projection, nn.Linear):
            return self.projection.out_features
        return text_config(self.backbone).hidden_size

    @property
    def num_appended(self) -> int:
        """How many tokens the encoder appends to each input (K reason + 1 [EMBED])."""
        return self.num_reason_tokens + 1

    def append_latent_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extends ids, mask and token types by K+1 positions and builds the input embeddings."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "encoder inputs must be left-padded (attention_mask[:, -1] all ones); "
                "set the tokenizer's padding_side='left'"
            )
        batch, n = input_ids.shape[0], self.num_appended
        extra_ids = input_ids.new_full((batch, n), self.placeholder_token_id)
        input_ids = torch.cat([input_ids, extra_ids], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n)], dim=1)
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids)
        else:
            mm_token_type_ids = torch.cat([mm_token_type_ids, mm_token_type_ids.new_zeros(batch, n)], dim=1)
        token_embeds = self.backbone.get_input_embeddings()(input_ids[:, :-n])
        latent = torch.cat([self.reason_embeddings, self.embed_embedding]).to(token_embeds.dtype)
        inputs_embeds = torch.cat([token_embeds, latent.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        return input_ids, attention_mask, mm_token_type_ids, inputs_embeds

    def _bottleneck_attention(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Causal + padding mask in which the last row ([EMBED]) sees only the K reason tokens and itself."""
        length = inputs_embeds.shape[1]
        first_reason = length - self.num_appended

        def embed_sees_reason_only(batch_idx, head_idx, q_idx, kv_idx):
            return (q_idx != length - 1) | (kv_idx >= first_reason)

        # A prepared 4-D mask in the attention implementation's own format; the language
        # model passes such a mask through unchanged.
        return create_causal_mask(
            config=text_config(self.backbone),
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            and_mask_function=embed_sees_reason_only,
            allow_is_causal_skip=False,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **processor_extras: torch.Tensor,
    ) -> EncoderOutput:
        """Encodes one batch of processor outputs (text and/or images) in a single pass."""
        input_ids, attention_mask, mm_token_type_ids, inputs_embeds = self.append_latent_tokens(
            input_ids, attention_mask, mm_token_type_ids
        )
        # Rotary positions from the ids (images get 3-D positions), computed here so that the
        # same positions serve whether or not the attention mask is customised.
        position_ids, _ = self.backbone.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        mask = self._bottleneck_attention(inputs_embeds, attention_mask) if self.bottleneck_mask else attention_mask
        # Only the embeddings go in: the backbone finds image positions by comparing them with
        # the image token's embedding (Qwen3-VL refuses ids and embeddings together).
        hidden = self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            **processor_extras,
        ).last_hidden_state
        embed_state = hidden[:, -1]
        reason_states = hidden[:, hidden.shape[1] - self.num_appended : -1]
        embedding = F.normalize(self.projection(embed_state).float(), dim=-1)
        return EncoderOutput(embedding=embedding, embed_state=embed_state, reason_states=reason_states)
