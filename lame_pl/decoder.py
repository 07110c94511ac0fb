"""The latent decoder: regenerates the target's text from the K reason states alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lame_pl.losses import IGNORE_INDEX, DecoderLogits

# Where a restricted decoder keeps its output ids in a module's state dict (and so in a checkpoint):
# restoring reads them from there, not from the vocabulary file the run was configured with.
OUTPUT_IDS = "output_ids"


class LatentDecoder(nn.Module):
    """A projector into a small causal LM that reads the K reason states as a prefix.

    Trained with teacher-forced cross-entropy on the target's text (``lame_pl.losses``); never
    used to embed.

    Args:
        language_model: A causal LM (e.g. ``Qwen3ForCausalLM``) that accepts ``inputs_embeds``.
        input_dim: Hidden size of the encoder's reason states.
        output_ids: Token ids the softmax runs over; ``None`` is the whole vocabulary. A corpus
            with a small vocabulary (the synthetic demo) trains ~4x faster on a CPU with
            the softmax restricted to its own tokens; the loss is then exact over that support.
    """

    def __init__(self, language_model: nn.Module, input_dim: int, output_ids: list[int] | None = None) -> None:
        super().__init__()
        self.language_model = language_model
        width = language_model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(input_dim, width), nn.GELU(), nn.Linear(width, width))
        self.restricted = False
        if output_ids is not None:
            self.set_output_ids(output_ids)

    def set_output_ids(self, output_ids: list[int] | torch.Tensor) -> None:
        """Restricts the softmax to ``output_ids`` (kept in the state dict as ``output_ids``)."""
        vocab = self.language_model.get_output_embeddings().weight.shape[0]
        ids = torch.as_tensor(output_ids, dtype=torch.long).flatten().unique(sorted=True)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"decoder output ids must be non-empty and within [0, {vocab}), got {ids.tolist()[:10]}")
        device = self.projector[0].weight.device
        position = torch.full((vocab,), -1, dtype=torch.long)
        position[ids] = torch.arange(ids.numel())
        # Persistent, so that a checkpoint carries them; the positions follow from them.
        self.register_buffer(OUTPUT_IDS, ids.to(device), persistent=True)
        self.register_buffer("output_position", position.to(device), persistent=False)
        self.restricted = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Stored ids win over those the decoder was built with (or their absence): their number
        # may differ, so they are adopted here rather than copied into the current buffer.
        stored = state_dict.get(prefix + OUTPUT_IDS)
        if stored is not None:
            self.set_output_ids(stored)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        reason_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> DecoderLogits:
        """Predicts the labelled rows' target text, teacher-forced, from the reason-state prefix.

        The cross-entropy itself is ``lame_pl.losses.LaMELoss.decoder``'s.

        Args:
            reason_states: ``(B, K, H)`` final states of the reason tokens.
            input_ids: ``(B, T)`` right-padded target token ids.
            attention_mask: ``(B, T)``, 1 on real target tokens.
            labelled: ``(B,)`` bool, True where a row has a label (an image-only target carries a
                placeholder that must not be learnt); ``None`` means every row.

        Returns:
            Logits and class indices of the labelled rows' real tokens. With no labelled row,
            one position of one row, computed through the projector, the LM and its head and
            marked ``IGNORE_INDEX``, so that every decoder weight and the reason states get a
            (zero) gradient, as DDP needs every rank to use the same parameters.
        """
        batch, k = reason_states.shape[:2]
        if k == 0:
            raise ValueError("the latent decoder needs num_reason_tokens > 0")
        if labelled is None:
            rows = None
        else:
            if labelled.shape != (batch,):
                raise ValueError(f"decoder labelled mask must have shape ({batch},), got {tuple(labelled.shape)}")
            rows = labelled.to(device=input_ids.device, dtype=torch.bool).nonzero().flatten()
            if rows.numel() == 0:
                return self._connected_placeholder(reason_states[:1], input_ids[:1], attention_mask[:1])
            if rows.numel() == batch:
                rows = None
        if rows is not None:  # the unlabelled rows cost nothing
            reason_states = reason_states[rows.to(reason_states.device)]
            input_ids, attention_mask = input_ids[rows], attention_mask[rows]
        hidden = self._hidden(reason_states, input_ids, attention_mask)
        # Position k-1+t predicts target token t. Only real target tokens go through the LM
        # head: over a 150k vocabulary the logits are most of the decoder's cost.
        predicts = hidden[:, k - 1 : -1][attention_mask.bool()]
        targets = input_ids[attention_mask.bool()]
        if self.restricted:
            positions = self.output_position[targets]
            if bool((positions < 0).any()):
                missing = sorted(set(targets[positions < 0].tolist()))
                raise ValueError(f"target token ids {missing[:10]} are not in the decoder's output vocabulary file")
            targets = positions
        return DecoderLogits(self._logits(predicts), targets)

    @torch.no_grad()
    def generate(
        self, reason_states: torch.Tensor, max_tokens: int = 32, stop_id: int | None = None
    ) -> list[list[int]]:
        """Greedy text from each row's reason states alone: what the bottleneck carries.

        The whole prefix is recomputed at every step (no KV cache): the texts are short, and a
        decoder built with activation checkpointing keeps no cache.

        Args:
            reason_states: ``(B, K, H)`` final states of the reason tokens.
            max_tokens: Most tokens per row.
            stop_id: A row ends at this token, left out of its result (training labels end in
                ``<|endoftext|>``).

        Returns:
            Each row's token ids (of the whole vocabulary).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        batch, k = reason_states.shape[:2]
        if k == 0:
            raise ValueError("the latent decoder needs num_reason_tokens > 0")
        device = reason_states.device
        ids = torch.zeros(batch, 0, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(max_tokens):
            hidden = self._hidden(reason_states, ids, torch.ones_like(ids))
            chosen = self._logits(hidden[:, -1]).argmax(dim=-1)
            if self.restricted:
                chosen = self.output_ids[chosen]
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            if stop_id is not None:
                done |= chosen == stop_id
                if bool(done.all()):
                    break
        rows = ids.tolist()
        return [row[: row.index(stop_id)] if stop_id in row else row for row in rows]

    def _hidden(
        self, reason_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The LM's final states over ``[projected reason states][target tokens]``."""
        batch, k = reason_states.shape[:2]
        embeddings = self.language_model.get_input_embeddings()
        prefix = self.projector(reason_states.to(self.projector[0].weight.dtype)).to(embeddings.weight.dtype)
        inputs_embeds = torch.cat([prefix, embeddings(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1)
        return self.language_model.base_model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits, over the output vocabulary only when it is restricted."""
        head = self.language_model.get_output_embeddings()
        if not self.restricted:
            return head(hidden)
        bias = None if head.bias is None else head.bias[self.output_ids]
        return F.linear(hidden, head.weight[self.output_ids], bias)

    def _connected_placeholder(
        self, reason_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> DecoderLogits:
        """One ignored prediction from one row, through the projector, the LM and its head: the last
        position attends to the prefix and the row's real tokens, so every decoder weight is in the graph."""
        hidden = self._hidden(reason_states, input_ids, attention_mask)
        return DecoderLogits(self._logits(hidden[:, -1]), input_ids.new_full((1,), IGNORE_INDEX))
