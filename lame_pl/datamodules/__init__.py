"""Data pipelines: WebDataset shards to collated model inputs; a user's own corpus to embed."""

from lame_pl.datamodules.collate import InstructionCollator, PairCollator
from lame_pl.datamodules.corpus import CorpusDataModule
from lame_pl.datamodules.image_text import ImageTextDataModule, ShardDataModule
from lame_pl.datamodules.pairs import InstructionPairDataModule

__all__ = ["CorpusDataModule", "ImageTextDataModule", "InstructionCollator", "InstructionPairDataModule",
           "PairCollator", "ShardDataModule"]
