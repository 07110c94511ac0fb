"""The LaME encoder: a Qwen-VL backbone, K reason vectors and [EMBED], run in one of four modes.

The modes themselves live in ``lame_pl.modes`` (one module each); this class holds what they
share: the backbone, the learnable vectors, the input layout and the bottleneck mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from lame_pl.modes import ENCODERS, EncodeMode, EncodeSettings, check_left_padded
from lame_pl.modes.common import EncoderOutput, text_config
from lame_pl.modes.explicit_cot import unties_head

__all__ = ["EncoderOutput", "LaMEEncoder", "build_encoder", "merge_lora", "text_config"]


class LaMEEncoder(nn.Module):
    """Embeds a left-padded processor batch through a Qwen-VL backbone in one of four modes.

    The inputs come from the Qwen-VL processor, left-padded so that whatever a mode appends
    sits at the same positions in every row; in ``lame``, reason tokens at ``[-K-1, -1)`` and
    [EMBED] at ``-1``. Appended positions carry the placeholder id in ``input_ids`` (only their
    input vectors matter) and are text tokens for the multimodal rotary positions.

    Args:
        backbone: A Qwen-VL base model (``Qwen2VLModel`` and relatives) with ``language_model``.
        num_reason_tokens: K (8 when not given); 0 gives the discriminative baseline (one pass,
            [EMBED] only).
        bottleneck_mask: If True, [EMBED] attends only to the reason tokens and itself, so all
            information about the input must pass through the K reason states (``lame`` only;
            False when not given).
        embed_dim: Output width of a linear projection after [EMBED]; ``None`` keeps the hidden size.
        placeholder_token_id: Id written into ``input_ids`` at the appended positions.
        encode_mode: ``discriminative``, ``lame``, ``latent_sequential`` or ``explicit_cot``
            (see ``lame_pl.modes``); ``None`` is ``lame`` when K > 0, else ``discriminative``.
            ``explicit_cot`` does not use the reason vectors.
        cot_tokens: T, the tokens ``explicit_cot`` generates (required by it, refused by the others).
        cot_stop_token_ids: Ids at which ``explicit_cot`` stops a row early; empty (the default)
            generates exactly T tokens per row, as the speed benchmark needs.
        settings: The four mode settings above already checked (``EncodeSettings.resolve``), in
            their place; the training module passes these.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_reason_tokens: int | None = None,
        bottleneck_mask: bool | None = None,
        embed_dim: int | None = None,
        placeholder_token_id: int = 0,
        encode_mode: EncodeMode | None = None,
        cot_tokens: int | None = None,
        cot_stop_token_ids: Sequence[int] = (),
        settings: EncodeSettings | None = None,
    ) -> None:
        super().__init__()
        one_by_one = (encode_mode, num_reason_tokens, bottleneck_mask, cot_tokens)
        if settings is None:
            k = 8 if num_reason_tokens is None else num_reason_tokens
            settings = EncodeSettings.resolve(encode_mode, k, bool(bottleneck_mask), cot_tokens)
        elif any(value is not None for value in one_by_one):
            # Two sources of one setting would leave one of them silently unused.
            raise TypeError("LaMEEncoder takes settings or the mode settings one by one, not both")
        self.settings = settings
        num_reason_tokens = settings.num_reason_tokens
        attn = getattr(text_config(backbone), "_attn_implementation", None)
        if settings.bottleneck_mask and attn == "flash_attention_2":
            raise ValueError(
                "bottleneck_mask needs an arbitrary attention mask, which flash_attention_2 cannot take; "
                "set backbone.attn_implementation to 'sdpa' or 'eager'"
            )
        if self.encode_mode == "explicit_cot" and unties_head(backbone):
            warnings.warn(
                "explicit_cot generates with the input embeddings as a tied LM head, but this checkpoint "
                "declares an untied head: the generated text differs from the model's own (the cost does not)",
                stacklevel=2,
            )
        self.backbone = backbone
        self.placeholder_token_id = placeholder_token_id
        self.cot_stop_token_ids = tuple(cot_stop_token_ids)
        hidden = text_config(backbone).hidden_size
        table = backbone.get_input_embeddings().weight
        # Start the new vectors at the scale of real token embeddings, whatever the checkpoint.
        std = _std(table.detach())
        self.reason_embeddings = nn.Parameter(torch.randn(num_reason_tokens, hidden) * std)
        self.embed_embedding = nn.Parameter(torch.randn(1, hidden) * std)
        self.projection = nn.Linear(hidden, embed_dim) if embed_dim else nn.Identity()
        # Set by the module under DeepSpeed ZeRO-3 (lame_pl.sharding.uniform_submodules): every
        # pass runs the vision tower before the backbone, on blanks where the rows have no media.
        self.vision_every_pass = False

    @property
    def embedding_dim(self) -> int:
        """Width of the output embedding."""
        if isinstance(self.projection, nn.Linear):
            return self.projection.out_features
        return text_config(self.backbone).hidden_size

    @property
    def spatial_merge_size(self) -> int:
        """Patches merged into one vision token along each side (Qwen-VL's vision config; 2 in every release)."""
        vision = getattr(self.backbone.config, "vision_config", None)
        return int(getattr(vision, "spatial_merge_size", 2))

    # The settings in force, read where the mode matters (``settings`` is their one home).
    @property
    def encode_mode(self) -> str:
        """The encode mode in force."""
        return self.settings.mode

    @property
    def num_reason_tokens(self) -> int:
        """K, the learnable reason vectors (``explicit_cot`` keeps but does not use them)."""
        return self.settings.num_reason_tokens

    def extend_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None,
        appended: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extends ids, mask and token types by ``appended``'s ``(B, n, H)`` vectors and builds the input embeddings."""
        batch, n = appended.shape[:2]
        extra_ids = input_ids.new_full((batch, n), self.placeholder_token_id)
        token_embeds = self.backbone.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([token_embeds, appended.to(token_embeds.dtype)], dim=1)
        input_ids = torch.cat([input_ids, extra_ids], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n)], dim=1)
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids)
        else:
            mm_token_type_ids = torch.cat([mm_token_type_ids, mm_token_type_ids.new_zeros(batch, n)], dim=1)
        return input_ids, attention_mask, mm_token_type_ids, inputs_embeds

    def vision_first(self, inputs_embeds: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Runs the vision tower on the images and on the video, or on a blank one of each, before the backbone.

        For a strategy that needs every rank to run the same submodules in the same order (DeepSpeed
        ZeRO-3 gathers each one's parameters around its forward and backward): the tower then runs
        twice in every pass, whatever the rows hold, and the backbone receives the features
        (``mm_encoder_outputs``, transformers' own input for precomputed ones) rather than pixels.
        A blank's features fill no position and join the graph with weight 0, so the embedding is
        unchanged and the tower's gradient from it is zero.

        Returns:
            ``inputs_embeds`` (tied to any blank's features) and ``inputs`` with the pixels replaced
            by ``mm_encoder_outputs``.
        """
        inputs = dict(inputs)
        encoded = {}
        for kind, pixels_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            pixels, grid = inputs.pop(pixels_key, None), inputs.get(grid_key)
            blank = pixels is None
            if blank:
                vision = self.backbone.visual.config
                merge = self.spatial_merge_size
                width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
                pixels = inputs_embeds.new_zeros(merge * merge, width)
                grid = torch.tensor([[1, merge, merge]], device=inputs_embeds.device)
            features = getattr(self.backbone, f"get_{kind}_features")(pixels, grid, return_dict=True)
            if blank:
                rows = torch.cat(features.pooler_output)
                features.pooler_output = (rows[:0],)
                inputs_embeds = inputs_embeds + 0.0 * rows.sum().to(inputs_embeds.dtype)
            encoded[kind] = features
        inputs["mm_encoder_outputs"] = encoded
        return inputs_embeds, inputs

    def bottleneck_attention(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Causal + padding mask in which the last row ([EMBED]) sees only the K reason tokens and itself."""
        length = inputs_embeds.shape[1]
        first_reason = self.settings.layout().spans(length)["reason"].start

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
        """Encodes one batch of processor outputs (text, images and/or videos) in the mode in force.

        Extras such as ``pixel_values_videos``/``video_grid_thw`` pass through to the backbone and,
        with ``image_grid_thw``, to its rotary index (``lame_pl.modes.common.full_pass``).
        """
        check_left_padded(attention_mask)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **processor_extras)
        if mm_token_type_ids is not None:
            inputs["mm_token_type_ids"] = mm_token_type_ids
        if pixel_values is not None:
            inputs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        return ENCODERS[self.encode_mode](self, inputs)


def build_encoder(
    backbone: nn.Module, embed_dim: int | None = None, settings: EncodeSettings | None = None, **mode_settings: Any
) -> LaMEEncoder:
    """A ``LaMEEncoder`` on ``backbone`` with the placeholder and stop ids that backbone's config names.

    The one place the training module, the embedder and the exported folder build an encoder.

    Args:
        backbone: The Qwen-VL base model.
        embed_dim: Width of the optional projection.
        settings: The mode settings, checked (``EncodeSettings.resolve``); or else
        **mode_settings: ``num_reason_tokens``, ``bottleneck_mask``, ``encode_mode``, ``cot_tokens``.
    """
    return LaMEEncoder(
        backbone,
        embed_dim=embed_dim,
        placeholder_token_id=pad_token_id(backbone),
        cot_stop_token_ids=stop_token_ids(backbone),
        settings=settings,
        **mode_settings,
    )


def pad_token_id(backbone: nn.Module) -> int:
    """The backbone config's pad id, else the Qwen2 tokenizer's."""
    pad = getattr(text_config(backbone), "pad_token_id", None)
    if pad is not None:
        return pad
    from lame_pl.backbone import qwen2_tokenizer

    return qwen2_tokenizer().pad_token_id


def stop_token_ids(backbone: nn.Module) -> tuple[int, ...]:
    """Where ``explicit_cot`` stops a row: the checkpoint's end-of-sequence ids, else Qwen2's."""
    eos = getattr(text_config(backbone), "eos_token_id", None)
    if eos is not None:
        return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    from lame_pl.backbone import qwen2_tokenizer

    tokenizer = qwen2_tokenizer()
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))


def merge_lora(module: nn.Module) -> int:
    """Merges every LoRA/DoRA adapter of ``module`` into its base layer (peft's ``merge``) and
    puts the base layer back in the adapter's place, in place; returns how many were merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [name for name, child in module.named_modules() if isinstance(child, BaseTunerLayer)]
    # Outermost first; a layer nested inside another adapter goes with it.
    outer = [name for name in adapted if not any(name.startswith(other + ".") for other in adapted)]
    for name in outer:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = parent.get_submodule(child_name)
        layer.merge()
        setattr(parent, child_name, layer.get_base_layer())
    return len(outer)


def _std(table: torch.Tensor, rows: int = 8192) -> float:
    """Standard deviation of all entries, accumulated in float64 over blocks of rows, so that a
    bf16 table of 150k rows is never copied whole into float32."""
    total = total_sq = 0.0
    for block in table.split(rows):
        block = block.double()
        total += float(block.sum())
        total_sq += float((block * block).sum())
    n = table.numel()
    return ((total_sq - total * total / n) / (n - 1)) ** 0.5
