"""Data pipelines: WebDataset shards to collated model inputs; a user's own corpus to embed."""

from datamodules.collate import InstructionCollator, PairCollator
from datamodules.corpus import CorpusDataModule
from datamodules.image_text import ImageTextDataModule, ShardDataModule
from datamodules.pairs import InstructionPairDataModule

__all__ = ["CorpusDataModule", "ImageTextDataModule", "InstructionCollator", "InstructionPairDataModule",
           "PairCollator", "ShardDataModule"]
