"""Batching samples into model inputs: image-caption pairs and instruction pairs.

Every query, target and negative goes through ``lame_pl.prompt.PromptProcessor`` (the one
prompt layout, shared with the evaluators); this module decides which instruction each side
gets and what the latent decoder must regenerate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lame_pl.data.text import decoder_token_ids
from lame_pl.prompt import END_OF_TEXT, PromptProcessor, Side

# What the decoder regenerates for an instruction pair: the target's text, or, where the target
# has none (text-to-image, visual documents), the query's text.
DECODER_LABELS = ("target_text", "target_or_query_text")


class _ProcessorCollator:
    """What every collator shares: the prompt processor and the decoder labels.

    ``output_ids`` (None: the whole vocabulary) are the token ids a restricted decoder can emit
    (``decoder.vocab_file``, set through ``ShardDataModule.set_decoder_output_ids``): a row whose
    label needs another token is unlabelled, and listed in ``batch["decoder_unseen"]`` as
    ``(row, detail)`` for ``datamodules.samples.CountedBatches`` to count.
    """

    output_ids: frozenset[int] | None = None

    def __init__(self, processor: Any, max_text_length: int, decoder_max_length: int) -> None:
        if decoder_max_length < 2:
            raise ValueError(f"decoder_max_length must be >= 2 (a token and {END_OF_TEXT}), got {decoder_max_length}")
        self.prompts = PromptProcessor(processor, max_text_length)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.decoder_max_length = decoder_max_length
        self.eos_id = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def _decoder_inputs(self, labels: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], list[tuple[int, str]]]:
        """Right-padded decoder labels, each ending in ``<|endoftext|>``, and which rows have one.

        A row whose label is ``None`` or blank, or needs a token outside ``output_ids``, is
        unlabelled: it carries ``<|endoftext|>`` alone as a placeholder and ``labelled`` is False,
        so the decoder loss can leave it out.

        Returns:
            The decoder inputs, and ``(row, detail)`` for each row unlabelled for an unseen token.
        """
        labelled = [bool(label and label.strip()) for label in labels]
        texts = [label if has else "" for label, has in zip(labels, labelled, strict=True)]
        ids = decoder_token_ids(self.tokenizer, texts)
        # Keep room for <|endoftext|>, so that every labelled row teaches the decoder where to stop.
        ids = [row[: self.decoder_max_length - 1] + [self.eos_id] for row in ids]
        unseen = []
        if self.output_ids is not None:
            for i, row in enumerate(ids):
                missing = sorted({t for t in row if t not in self.output_ids})
                if labelled[i] and missing:
                    # One unseen token costs this row its decoder term, not the run.
                    labelled[i] = False
                    tokens = self.tokenizer.convert_ids_to_tokens(missing[:5])
                    unseen.append((i, f"decoder label token ids {missing[:5]} {tokens} are not in decoder.vocab_file"))
                    ids[i] = [self.eos_id]
        length = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        decoder = {"input_ids": input_ids, "attention_mask": attention_mask,
                   "labelled": torch.tensor(labelled, dtype=torch.bool)}
        return decoder, unseen

    def set_output_ids(self, output_ids: Sequence[int] | None) -> None:
        """The token ids the decoder can emit (None: all); rows needing others become unlabelled."""
        self.output_ids = None if output_ids is None else frozenset(int(i) for i in output_ids)

    def _with_unseen(self, batch: dict[str, Any], unseen: list[tuple[int, str]]) -> dict[str, Any]:
        if unseen:
            batch["decoder_unseen"] = unseen
        return batch


class PairCollator(_ProcessorCollator):
    """Turns a list of ``{"key", "image", "text"}`` samples into model inputs.

    The query is the image and ``query_instruction``; the target is ``target_instruction`` and
    the caption (layout: ``lame_pl.prompt``). The decoder label is the caption, so every row is
    labelled.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        query_instruction: Instruction of every query.
        target_instruction: Instruction of every target.
        max_text_length: Most tokens of an instruction and of a caption (cut separately); image
            tokens never count and are never cut.
        decoder_max_length: Most decoder tokens, ``<|endoftext|>`` included.
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str,
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
    ) -> None:
        super().__init__(processor, max_text_length, decoder_max_length)
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate samples into ``{"query", "target", "decoder", "keys", "texts"}``."""
        texts = [s["text"] for s in samples]
        decoder, unseen = self._decoder_inputs(texts)
        return self._with_unseen({
            "query": self.prompts([Side(self.query_instruction, "", (s["image"],)) for s in samples]),
            "target": self.prompts([Side(self.target_instruction, t) for t in texts]),
            "decoder": decoder,
            "keys": [s["key"] for s in samples],
            "texts": texts,
        }, unseen)


class InstructionCollator(_ProcessorCollator):
    """Turns instruction-pair samples (``datamodules.samples.DecodeInstructionPairs``) into model inputs.

    Each side of a sample is ``{"instruction", "text", "images", "video"}`` (``video`` a list of
    frames or None). A side uses its own instruction; an empty one falls back to
    ``query_instruction`` for a query, ``target_instruction`` for a target, and for a hard
    negative to its sample's target instruction, else ``target_instruction``. Each side (query,
    target, and the hard negatives of all samples flattened into one ``"negative"`` side shared
    by every query, left out when the batch has none) goes through ``lame_pl.prompt``.

    ``batch["decoder"]`` holds ``input_ids``/``attention_mask`` (right-padded, ending in
    ``<|endoftext|>``) and ``labelled``, a ``(B,)`` bool tensor: see ``decoder_label``.
    Instructions are never decoder labels.

    Args:
        processor: A Qwen-VL processor (``lame_pl.backbone.build_processor``).
        query_instruction: Instruction of the queries whose sample gives none.
        target_instruction: Instruction of the targets (and negatives) whose sample gives none.
        max_text_length: Most tokens in each instruction and each side's text (cut separately);
            vision tokens never count and are never cut.
        decoder_max_length: Most decoder tokens, ``<|endoftext|>`` included.
        decoder_label: ``target_text``: the target's text; a row whose target has none is
            unlabelled. ``target_or_query_text``: the target's text, else the query's text, else
            unlabelled.
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str = "",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        decoder_label: str = "target_text",
    ) -> None:
        if decoder_label not in DECODER_LABELS:
            raise ValueError(f"decoder_label must be one of {', '.join(DECODER_LABELS)}; got {decoder_label!r}")
        super().__init__(processor, max_text_length, decoder_max_length)
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction
        self.decoder_label = decoder_label

    def _label(self, sample: dict[str, Any]) -> str | None:
        target = sample["target"]["text"]
        if target.strip() or self.decoder_label == "target_text":
            return target
        return sample["query"]["text"]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate samples into ``{"query", "target", "decoder", "keys", "texts"}`` and ``"negative"`` if any."""
        queries, targets, negatives = [], [], []
        for s in samples:
            queries.append(side(s["query"], self.query_instruction))
            target_instruction = s["target"]["instruction"] or self.target_instruction
            targets.append(side(s["target"], target_instruction))
            negatives += [side(n, target_instruction) for n in s["negatives"]]
        decoder, unseen = self._decoder_inputs([self._label(s) for s in samples])
        batch = {
            "query": self.prompts(queries),
            "target": self.prompts(targets),
            "decoder": decoder,
            "keys": [s["key"] for s in samples],
            "texts": [s["target"]["text"] for s in samples],
        }
        if negatives:
            batch["negative"] = self.prompts(negatives)
        return self._with_unseen(batch, unseen)


def side(record: dict[str, Any], default_instruction: str = "") -> Side:
    """A decoded sample side (``{"instruction", "text", "images", "video"}``) as a ``lame_pl.prompt.Side``.

    Raises:
        ValueError: When a field is missing or a video has no frame.
    """
    missing = [k for k in ("instruction", "text", "images", "video") if k not in record]
    if missing:
        raise ValueError(f"sample side lacks {missing}; it has {sorted(record)}")
    video = record["video"]
    if video is not None and len(video) == 0:
        raise ValueError("sample side has a video with no frame")
    return Side(record["instruction"] or default_instruction, record["text"], tuple(record["images"]),
                None if video is None else tuple(video))
