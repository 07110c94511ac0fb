"""LaME: latent-reasoning multimodal embeddings in PyTorch Lightning.

The exports load on first use, so that light parts of the package (the shard writers in
``lame_pl.data``, ``lame_pl.media``) do not pull in torch, Lightning and transformers, and
``LaMEEmbedder`` (a trained model's embedder) does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BackboneSpec": "lame_pl.backbone",
    "DecoderSpec": "lame_pl.backbone",
    "LaMEEmbedder": "lame_pl.embedder",
    "LaMEModule": "lame_pl.module",
    "LoraSpec": "lame_pl.stages",
    "Stage1Spec": "lame_pl.stages",
    "Stage2Spec": "lame_pl.stages",
    "StageSpec": "lame_pl.stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lame_pl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
