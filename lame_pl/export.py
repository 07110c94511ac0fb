"""The exported folder: a trained LaME model in Hugging Face conventions, written and read here.

Layout of the folder::

    config.json          the backbone's transformers config, plus a "lame" entry (FORMAT)
    model.safetensors    the backbone under Hugging Face's own names (adapters merged; so
                         ``AutoModel.from_pretrained(DIR)`` loads it), LaME's "lame.reason_embeddings",
                         "lame.embed_embedding", "lame.projection.*"; "decoder.*" only with the decoder
    processor and tokenizer files (processor.save_pretrained)
    README.md            a model card generated from the run's hyper-parameters

The "lame" entry holds what rebuilding the encoder and laying out its inputs needs: K, the
encode mode, the embedding width and whether a projection makes it, the bottleneck mask, the
prompt layout version, the training run's text budget and instructions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lame_pl.backbone import build_decoder, default_attn_implementation, dtype_of
from lame_pl.checkpoint import TrainedCheckpoint, read_checkpoint
from lame_pl.model import LaMEEncoder, build_encoder, text_config
from lame_pl.prompt import LAYOUT_VERSION

FORMAT = "lame_pl/2"  # 2: backbone weights under Hugging Face names, LaME's under "lame."
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
DECODER_PREFIX = "decoder."
BACKBONE_PREFIX, LAME_PREFIX = "backbone.", "lame."


def lame_fields(encoder: LaMEEncoder, checkpoint: TrainedCheckpoint) -> dict[str, Any]:
    """The "lame" entry of ``config.json`` for ``encoder``, trained as ``checkpoint`` says."""
    spec = checkpoint.backbone_spec
    lora = checkpoint.lora
    return {
        "format": FORMAT,
        "num_reason_tokens": encoder.num_reason_tokens,
        "encode_mode": encoder.encode_mode,
        "cot_tokens": encoder.settings.cot_tokens,
        "bottleneck_mask": encoder.settings.bottleneck_mask,
        "embed_dim": encoder.embedding_dim,
        "projection": isinstance(encoder.projection, nn.Linear),
        "prompt_layout": LAYOUT_VERSION,
        "max_text_length": checkpoint.max_text_length,
        "instructions": checkpoint.instructions,
        "dtype": str(encoder.backbone.dtype).removeprefix("torch."),
        "attn_implementation": spec.attn_implementation,
        "merged_adapters": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "use_dora": lora.use_dora},
        "trained": {
            "checkpoint": checkpoint.path.name,
            "global_step": checkpoint.global_step,
            "stage": checkpoint.stage,
        },
        "decoder": None,
    }


def decoder_from_checkpoint(checkpoint: TrainedCheckpoint, hidden_size: int) -> nn.Module:
    """The checkpoint's latent decoder with its trained weights (its output ids from the weights)."""
    from lame_pl.decoder import LatentDecoder

    if checkpoint.hparams.get("decoder") is None:
        raise ValueError(f"checkpoint {checkpoint.path} has no latent decoder to export")
    # Stored output ids come with the weights (an older checkpoint's are read from its vocabulary
    # file), and so do all the others: the decoder is built from its config alone.
    backbone = checkpoint.hparams["backbone"]  # not as a spec: its path check would fail where the folder is gone
    attn = backbone.get("attn_implementation") if isinstance(backbone, dict) else backbone.attn_implementation
    decoder = LatentDecoder(build_decoder(checkpoint.decoder_spec, attn, pretrained=False), input_dim=hidden_size)
    decoder.load_state_dict(checkpoint.decoder_state(), strict=True)
    return decoder


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second name of a tied tensor (safetensors stores each storage once)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        if tensor.numel():  # empty tensors (K = 0) share no data
            seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside ``out``; refuses a non-empty ``out`` unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, with_decoder: bool = False, overwrite: bool = False
) -> Path:
    """Writes the folder for a ``lightning fit`` checkpoint of ``LaMEModule``.

    Args:
        checkpoint: The ``.ckpt`` file.
        out: The folder to write (created; replaced only with ``overwrite``).
        with_decoder: Keep the latent decoder (not needed to embed).
        overwrite: Replace a non-empty ``out``.

    Returns:
        ``out``.
    """
    from safetensors.torch import save_file

    from lame_pl.embedder import LaMEEmbedder

    out = Path(out)
    read = read_checkpoint(checkpoint)
    # Plain weights in Hugging Face conventions: adapters merged (in float32 when the backbone is
    # in low precision, so that the merge keeps the adapters' update).
    embedder = LaMEEmbedder.from_checkpoint(read.path, device="cpu", merge_adapters=True)
    encoder = embedder.encoder
    lame = lame_fields(encoder, read)
    weights = hf_names(_unshared(encoder.state_dict()))
    if with_decoder:
        decoder = decoder_from_checkpoint(read, text_config(encoder.backbone).hidden_size)
        lame["decoder"] = {
            "config": decoder.language_model.config.to_dict(),
            "input_dim": text_config(encoder.backbone).hidden_size,
        }
        weights.update({DECODER_PREFIX + k: v for k, v in _unshared(decoder.state_dict()).items()})
    tmp = _prepare_out(out, overwrite)
    try:
        config = encoder.backbone.config.to_dict()
        config["architectures"] = [type(encoder.backbone).__name__]
        config["lame"] = lame
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "lame_format": FORMAT})
        embedder.processor.save_pretrained(str(tmp))
        (tmp / CARD_NAME).write_text(model_card(lame, read))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights under the names a folder holds them: the backbone's as Hugging Face's
    ``AutoModel`` names them (so ``AutoModel.from_pretrained(DIR)`` loads the trained backbone),
    LaME's own (reason and [EMBED] vectors, projection) under ``lame.``."""
    return {
        (k.removeprefix(BACKBONE_PREFIX) if k.startswith(BACKBONE_PREFIX) else LAME_PREFIX + k): v
        for k, v in state.items()
    }


def encoder_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_names`` (the decoder's ``decoder.`` weights left out)."""
    return {
        (k.removeprefix(LAME_PREFIX) if k.startswith(LAME_PREFIX) else BACKBONE_PREFIX + k): v
        for k, v in state.items()
        if not k.startswith(DECODER_PREFIX)
    }


def read_lame_config(directory: str | Path) -> dict[str, Any]:
    """The folder's ``config.json`` (checked to be one this module writes)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: {directory} is not an exported LaME folder")
    config = json.loads(path.read_text())
    lame = config.get("lame")
    if not isinstance(lame, dict) or lame.get("format") != FORMAT:
        found = lame.get("format") if isinstance(lame, dict) else None
        raise ValueError(f"{path}: 'lame.format' is {found!r}, expected {FORMAT!r}")
    if lame.get("prompt_layout") != LAYOUT_VERSION:
        raise ValueError(f"{path}: prompt layout {lame.get('prompt_layout')!r} is not this code's {LAYOUT_VERSION!r}")
    return config


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    return load_file(str(path))


def read_folder(directory: str | Path) -> tuple[LaMEEncoder, Any, dict[str, Any]]:
    """The encoder (eval mode, CPU), the processor and the "lame" entry of an exported folder."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    directory = Path(directory)
    config = read_lame_config(directory)
    lame = config["lame"]
    attn = lame.get("attn_implementation") or default_attn_implementation()
    if lame["bottleneck_mask"] and attn == "flash_attention_2":
        attn = "sdpa"  # the bottleneck mask needs an arbitrary mask
    backbone_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    backbone = AutoModel.from_config(backbone_config, dtype=dtype_of(lame["dtype"]), attn_implementation=attn)
    encoder = build_encoder(
        backbone,
        num_reason_tokens=lame["num_reason_tokens"],
        bottleneck_mask=lame["bottleneck_mask"],
        embed_dim=lame["embed_dim"] if lame["projection"] else None,
        encode_mode=lame["encode_mode"],
        cot_tokens=lame["cot_tokens"],
    )
    encoder.load_state_dict(encoder_names(_weights(directory)), strict=True)
    processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
    return encoder.eval(), processor, lame


def read_decoder(directory: str | Path) -> nn.Module:
    """The latent decoder of a folder exported ``--with-decoder`` (eval mode, CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lame_pl.decoder import LatentDecoder

    directory = Path(directory)
    lame = read_lame_config(directory)["lame"]
    if not lame.get("decoder"):
        raise ValueError(f"{directory} was exported without the decoder (tools/export.py --with-decoder keeps it)")
    settings = dict(lame["decoder"]["config"])
    lm_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    decoder = LatentDecoder(AutoModelForCausalLM.from_config(lm_config), input_dim=lame["decoder"]["input_dim"])
    state = {k.removeprefix(DECODER_PREFIX): v for k, v in _weights(directory).items() if k.startswith(DECODER_PREFIX)}
    result = decoder.load_state_dict(state, strict=False)
    decoder.language_model.tie_weights()
    # Only the second name of a tied weight may be absent; it is the first one's tensor.
    tied = {name for name in result.missing_keys if name.endswith("lm_head.weight") and lm_config.tie_word_embeddings}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(
            f"{directory}: decoder weights do not match its config "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return decoder.eval()


def _plain(value: Any) -> Any:
    """Spec objects as dicts, for the card."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    return value


def model_card(lame: dict[str, Any], checkpoint: TrainedCheckpoint) -> str:
    """The folder's ``README.md``: what the model is, how to load it, and how it was trained."""
    hparams = json.dumps(_plain(checkpoint.hparams), indent=2, sort_keys=True, default=str)
    data = json.dumps(_plain(checkpoint.data_hparams), indent=2, sort_keys=True, default=str)
    instructions = lame["instructions"] or {}
    rows = [
        ("reason tokens (K)", lame["num_reason_tokens"]),
        ("encode mode", lame["encode_mode"]),
        ("embedding width", lame["embed_dim"]),
        ("bottleneck mask", lame["bottleneck_mask"]),
        ("adapters merged", lame["merged_adapters"] or "none"),
        ("prompt layout", lame["prompt_layout"]),
        ("text budget (tokens)", lame["max_text_length"] or "not recorded"),
        ("query instruction", repr(instructions.get("query", "not recorded"))),
        ("target instruction", repr(instructions.get("target", "not recorded"))),
        ("latent decoder", "included" if lame["decoder"] else "left out"),
        ("trained", f"{lame['trained']['global_step']} steps, saved in stage {lame['trained']['stage']}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    query = instructions.get("query", "")
    return f"""# LaME embedding model

A LaME encoder (latent-reasoning multimodal embeddings) exported by `lame_pl` from
`{lame["trained"]["checkpoint"]}`: a Qwen-VL backbone that reads the input, {lame["num_reason_tokens"]}
learnable reason tokens and an [EMBED] token in one forward pass, embedding at [EMBED].

| setting | value |
|---|---|
{table}

## Use

```python
from lame_pl import LaMEEmbedder

model = LaMEEmbedder.from_pretrained("path/to/this/folder")
texts = model.encode(texts=["a red circle", "two blue squares"])
images = model.encode(images=["photo.png"], instructions={query!r})
scores = images @ texts.T  # rows are L2-normalised: cosine similarities
```

Inputs are laid out as in training (`lame_pl.prompt`, layout `{lame["prompt_layout"]}`); use the
instructions the model was trained with.

## Training hyper-parameters

```json
{hparams}
```

## Data hyper-parameters

```json
{data}
```
"""
