"""Peak memory measured on the CPU, to check the memory model (``lame_pl.benchmarks.memory_model``).

A tracker of live tensor storages (what ``torch.cuda.max_memory_allocated`` counts on a GPU), one layer's
recompute and backward (``calibrate``, the model's per-layer coefficients) and one real training step
(``measure_step``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of tensor storages created inside the block and still alive, and their peak: on the
    CPU, the figure ``torch.cuda.max_memory_allocated`` gives on a GPU (no allocator rounding)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._sizes:  # a new storage (views and in-place ops add none)
                self._sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _one_layer_peak(hidden: int, intermediate: int, seq: int, rows: int = 2) -> int:
    """Peak live bytes of one Qwen2-VL language-model layer with the recipe's DoRA adapters, forward
    and backward under bf16 autocast (what the backward of one checkpointed layer holds)."""
    import transformers
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    from lame_pl.stages import LoraSpec, add_lora

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=1,
            num_attention_heads=hidden // 128,
            num_key_value_heads=2,
            vocab_size=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=hidden),
    )
    config.text_config._attn_implementation = "sdpa"
    model = Qwen2VLTextModel._from_config(config.text_config, dtype=torch.bfloat16)
    add_lora(model, LoraSpec())
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    model.train()
    inputs = torch.randn(rows, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    tracker = LiveTensorMemory()
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inputs_embeds=inputs).last_hidden_state
        out.float().sum().backward()
    return tracker.peak


def calibrate(short: int = 64, long: int = 192, rows: int = 2) -> dict[str, float]:
    """Measures ``memory_model.LAYER_COEFFICIENTS``: one layer's peak at two lengths gives bytes per token and a
    fixed part, at (H, I) = (256, 704), (256, 1408), (512, 704); (512, 1408) checks the fit."""
    shapes = [(256, 704), (256, 1408), (512, 704), (512, 1408)]
    slopes, fixed = {}, {}
    for h, i in shapes:
        low, high = _one_layer_peak(h, i, short, rows), _one_layer_peak(h, i, long, rows)
        slopes[h, i] = (high - low) / (rows * (long - short))
        fixed[h, i] = low - slopes[h, i] * rows * short
    b = (slopes[256, 1408] - slopes[256, 704]) / 704
    a = (slopes[512, 704] - slopes[256, 704]) / 256
    c = slopes[256, 704] - a * 256 - b * 704
    check = a * 512 + b * 1408 + c
    return {
        "a": a,
        "b": b,
        "c": c,
        "f": max(fixed[s] / (s[0] * s[1]) for s in shapes),
        "check_error": check / slopes[512, 1408] - 1,
        "slopes": {f"{h}x{i}": v for (h, i), v in slopes.items()},
    }


def measure_step(
    preset: str,
    decoder_preset: str,
    stage: int,
    chunk: int,
    batch: int,
    image_size: int,
    text_tokens: int,
    reason_tokens: int = 8,
    embed_dim: int | None = None,
) -> dict[str, Any]:
    """Peak live bytes of one real training step (``LaMEModule.training_step`` with GradCache, its
    backward and AdamW's step) on the CPU, in the 2B recipe's form: bf16 backbone under bf16
    autocast, gradient checkpointing, DoRA in stage 2, float32 decoder. What exists before the step
    (weights, AdamW state after a warm-up step) is not counted, as the model's static part is not."""
    import warnings

    from lame_pl import BackboneSpec, DecoderSpec, LaMEModule, LoraSpec, Stage1Spec, Stage2Spec
    from lame_pl.backbone import build_processor
    from lame_pl.benchmarks.common import prompt_text, synthetic_image, training_batch

    area = image_size * image_size
    spec = BackboneSpec(preset=preset, min_pixels=area, max_pixels=area, attn_implementation="sdpa", dtype="bfloat16")
    processor = build_processor(spec)
    data = training_batch(
        processor, prompt_text(processor.tokenizer, text_tokens), synthetic_image(image_size), batch, "cpu"
    )
    torch.manual_seed(0)
    module = LaMEModule(
        spec,
        DecoderSpec(preset=decoder_preset),
        num_reason_tokens=reason_tokens,
        embed_dim=embed_dim,
        stage=stage,
        stage1=Stage1Spec(),
        stage2=Stage2Spec(lora=LoraSpec()),
        gradcache_chunk_size=chunk,
        gradient_checkpointing=True,
    ).train()
    optimizer = module.configure_optimizers()

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step(data, i)
        loss.backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)` but the `self\.trainer` reference")
        step(0)  # AdamW's state exists from here on, as in every step after the first
        optimizer.zero_grad(set_to_none=True)
        tracker = LiveTensorMemory()
        with tracker:
            step(1)
    seq = int(max(data["query"]["input_ids"].shape[1], data["target"]["input_ids"].shape[1])) + reason_tokens + 1
    labels = int(data["decoder"]["input_ids"].shape[1])
    image_tokens = int(data["query"]["image_grid_thw"].prod(dim=1).max()) // 4
    return {
        "peak_bytes": tracker.peak,
        "seq": seq,
        "label_tokens": labels,
        "image_tokens": image_tokens,
        "trained_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }
