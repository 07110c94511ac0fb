"""Fixed inputs for the benchmarks: a prompt of an exact token count, a random image, processor batches,
and what machine the figures were measured on."""

from __future__ import annotations

import os
import platform
import random
from typing import Any

import torch
from PIL import Image

from lame_pl.datamodules.collate import PairCollator

# Plain words that the Qwen2 BPE keeps one token each (with their leading space), so that the
# prompt has exactly the asked number of text tokens.
WORDS = "the a red blue green small large circle square left right top bottom of and in on".split()


def prompt_text(tokenizer: Any, tokens: int) -> str:
    """Text of exactly ``tokens`` tokens (checked)."""
    rng = random.Random(0)
    text = "".join(" " + rng.choice(WORDS) for _ in range(tokens))
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if count != tokens:
        raise RuntimeError(f"the benchmark prompt has {count} tokens, not {tokens}")
    return text


def synthetic_image(side: int) -> Image.Image:
    """A fixed random RGB image (its pixels do not change the cost)."""
    rng = random.Random(0)
    return Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))


def encode_inputs(processor: Any, text: str, image: Image.Image, batch: int, device: str) -> dict[str, torch.Tensor]:
    """A batch of identical image+text inputs, as the processor makes them."""
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    prompt = f"<|vision_start|>{image_token}<|vision_end|>{text}"
    out = processor(images=[image] * batch, text=[prompt] * batch, padding=True, return_tensors="pt")
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: out[k].to(device) for k in keys if k in out}


def synchronize(device: str) -> None:
    """Waits for the queued CUDA work, so that a timer reads the work done (nothing to wait for on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def training_batch(processor: Any, text: str, image: Image.Image, batch: int, device: str) -> dict[str, Any]:
    """A stage-2 batch: image+text queries, caption targets, decoder labels."""
    captions = [f"{random.Random(i).choice(WORDS)} shape number {i}" for i in range(batch)]
    collate = PairCollator(processor, query_instruction=text, max_text_length=len(text.split()) + 8)
    samples = [{"key": str(i), "image": image, "text": captions[i]} for i in range(batch)]
    collated = collate(samples)
    for side in ("query", "target", "decoder"):
        collated[side] = {k: v.to(device) for k, v in collated[side].items()}
    return collated


def machine(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
