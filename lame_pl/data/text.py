"""The one normalisation of caption and label text, shared by training and ``tools/decoder_vocab.py``.

A decoder whose softmax runs over a vocabulary file (``decoder.vocab_file``) must have seen every
token the collator will ask it for; both sides therefore read and tokenize text here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def caption_text(data: bytes | str) -> str:
    """A shard's caption member as training reads it: UTF-8 (a stray byte replaced), stripped.

    A stray byte should not cost a caption, and a trailing newline (editors add one) is not part
    of it.
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return text.strip()


def decoder_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of decoder labels, as the collator builds them: normalised, no special tokens added."""
    return tokenizer([caption_text(t) for t in texts], add_special_tokens=False)["input_ids"]
