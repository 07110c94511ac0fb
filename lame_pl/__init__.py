"""LaME: latent-reasoning multimodal embeddings in PyTorch Lightning."""

from lame_pl.backbone import BackboneSpec, DecoderSpec
from lame_pl.module import LaMEModule
from lame_pl.stages import LoraSpec, StageSpec

__all__ = ["BackboneSpec", "DecoderSpec", "LaMEModule", "LoraSpec", "StageSpec"]
