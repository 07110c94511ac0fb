"""The token ids that a shard set's decoder labels use, for ``decoder.vocab_file``.

A decoder whose softmax runs over these ids only computes the exact cross-entropy over that
support, many times faster than over Qwen2's 151k tokens: the CPU demo uses it; real runs keep
the whole vocabulary. Captions (``KEY.txt``) and instruction pairs' texts (``KEY.json``: the
target's and the query's, either of which ``data.decoder_label`` may pick) are normalised and
tokenized as the training collator does (``lame_pl.data.text``), so every label it builds is covered.
``tools/decoder_vocab.py`` is the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from lame_pl.backbone import qwen2_tokenizer
from lame_pl.data.instruction_pairs import parse_pair_json
from lame_pl.data.text import caption_text, decoder_token_ids


def caption_token_ids(shard_dirs: list[Path]) -> list[int]:
    """Sorted token ids of every decoder label in the folders' shards, plus the end-of-text id."""
    shards = []
    for folder in shard_dirs:
        found = sorted(str(p) for p in folder.glob("*.tar"))
        if not found:
            raise ValueError(f"{folder} holds no .tar shard")
        shards += found
    tokenizer = qwen2_tokenizer()
    ids = {tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        texts = []
        if "txt" in sample:
            texts.append(caption_text(sample["txt"]))
        if "json" in sample:
            try:
                pair = parse_pair_json(sample["json"])
            except ValueError:
                pair = None  # an image-caption sample's metadata, or a pair training skips as bad_json
            if pair is not None:
                texts += [pair["target"]["text"], pair["query"]["text"]]
        for row in decoder_token_ids(tokenizer, [t for t in texts if t]):
            ids.update(row)
    return sorted(ids)


def write_decoder_vocab(shard_dirs: list[Path], out: Path) -> list[int]:
    """Writes ``caption_token_ids(shard_dirs)`` to ``out`` as a JSON list and returns it."""
    ids = caption_token_ids(shard_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ids))
    return ids
