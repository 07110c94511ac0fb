"""The fixed task instructions and source placeholders of the benchmark and its training data.

One home for these strings. The visual-document instructions are shared by the MMEB-v2 evaluator
and the VisRAG training rows, so that a document task is worded the same in training and in
evaluation; the video ones are VLM2Vec-V2's training wording (its MMEB-v2 video tasks carry
their own instructions in their tables). Light on purpose (no torch): the shard tools import it.
"""

from __future__ import annotations

# Phi-3-V's image placeholder, as MMEB-train and MMEB-v2 store it inside their texts;
# lame_pl.prompt places the vision tokens itself.
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
# LLaVA-Hound's video placeholder inside a conversation turn.
LLAVA_VIDEO_PLACEHOLDER = "<video>"

# VLM2Vec's MMEB-v2 visual-document instructions (src/data/eval_dataset/vidore_dataset.py);
# the VisRAG training rows use them too (ours: VLM2Vec-V2 trains VisRAG with per-source prompts).
VISDOC_QUERY_INSTRUCTION = "Find a document image that matches the given query:"
VISDOC_PAGE_TEXT = "Understand the content of the provided document image."

# VLM2Vec-V2's one-line instructions for its LLaVA-Hound video training sets
# (src/data/dataset/llavahound_dataset_caption.py and _qa.py).
VIDEO_RETRIEVAL_QUERY_INSTRUCTION = "Find a video that contains the following visual content:"
VIDEO_RETRIEVAL_TARGET_INSTRUCTION = "Understand the content of the provided video:"
VIDEO_QA_INSTRUCTION = "Answer a question based on the content of a video."


def strip_mmeb_placeholder(text: str) -> str:
    """``text`` without MMEB's image placeholder and surrounding whitespace."""
    return text.replace(MMEB_IMAGE_PLACEHOLDER, "").strip()
