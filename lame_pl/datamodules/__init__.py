"""Data pipelines: WebDataset shards to collated model inputs; a user's own corpus to embed.

A shard format (its layout, writer, decode stage and collator) is one module of ``lame_pl.data``;
here are the data modules that stream it (``base.ShardDataModule`` and one small subclass per
format), the tar reading (``tar_reading``) and the epoch and worker state (``epoch_state``).
"""

from lame_pl.datamodules.base import ShardDataModule
from lame_pl.datamodules.collate import InstructionCollator, PairCollator
from lame_pl.datamodules.corpus import CorpusDataModule
from lame_pl.datamodules.image_text import ImageTextDataModule
from lame_pl.datamodules.pairs import InstructionPairDataModule

__all__ = [
    "CorpusDataModule",
    "ImageTextDataModule",
    "InstructionCollator",
    "InstructionPairDataModule",
    "PairCollator",
    "ShardDataModule",
]
