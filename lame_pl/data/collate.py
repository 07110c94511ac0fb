"""What every format's collator shares: the prompt processor and the latent decoder's labels.

A format module subclasses ``ProcessorCollator`` with its ``__call__`` (decoded samples to
``{"query", "target", "decoder", "keys", "texts"}``, plus ``"negative"`` when it has hard
negatives). Every query, target and negative goes through ``lame_pl.prompt.PromptProcessor`` (the
one prompt layout, shared with the evaluators); a format decides which instruction each side gets
and what the latent decoder must regenerate. torch and ``lame_pl.prompt`` are imported when a
collator is made or used, so that the shard writers beside the formats start without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lame_pl.data.text import decoder_token_ids


class ProcessorCollator:
    """What every collator shares: the prompt processor and the decoder labels.

    ``output_ids`` (None: the whole vocabulary) are the token ids a restricted decoder can emit
    (``decoder.vocab_file``, set through ``ShardDataModule.set_decoder_output_ids``): a row whose
    label needs another token is unlabelled, and listed in ``batch["decoder_unseen"]`` as
    ``(row, detail)`` for ``lame_pl.datamodules.tar_reading.CountedBatches`` to count.
    """

    output_ids: frozenset[int] | None = None

    def __init__(self, processor: Any, max_text_length: int, decoder_max_length: int) -> None:
        from lame_pl.prompt import END_OF_TEXT, PromptProcessor

        if decoder_max_length < 2:
            raise ValueError(f"decoder_max_length must be >= 2 (a token and {END_OF_TEXT}), got {decoder_max_length}")
        self.prompts = PromptProcessor(processor, max_text_length)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.decoder_max_length = decoder_max_length
        self.eos_id = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def _decoder_inputs(self, labels: Sequence[str | None]) -> tuple[dict[str, Any], list[tuple[int, str]]]:
        """Right-padded decoder labels, each ending in ``<|endoftext|>``, and which rows have one.

        A row whose label is ``None`` or blank, or needs a token outside ``output_ids``, is
        unlabelled: it carries ``<|endoftext|>`` alone as a placeholder and ``labelled`` is False,
        so the decoder loss can leave it out.

        Returns:
            The decoder inputs, and ``(row, detail)`` for each row unlabelled for an unseen token.
        """
        import torch

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
        decoder = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labelled": torch.tensor(labelled, dtype=torch.bool),
        }
        return decoder, unseen

    def set_output_ids(self, output_ids: Sequence[int] | None) -> None:
        """The token ids the decoder can emit (None: all); rows needing others become unlabelled."""
        self.output_ids = None if output_ids is None else frozenset(int(i) for i in output_ids)

    def _with_unseen(self, batch: dict[str, Any], unseen: list[tuple[int, str]]) -> dict[str, Any]:
        if unseen:
            batch["decoder_unseen"] = unseen
        return batch
