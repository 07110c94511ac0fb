"""Data pipelines: WebDataset shards to collated model inputs."""

from datamodules.collate import InstructionCollator, PairCollator
from datamodules.image_text import ImageTextDataModule, ShardDataModule
from datamodules.pairs import InstructionPairDataModule

__all__ = ["ImageTextDataModule", "InstructionCollator", "InstructionPairDataModule", "PairCollator", "ShardDataModule"]
