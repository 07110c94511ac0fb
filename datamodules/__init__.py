"""Data pipelines: WebDataset shards to collated model inputs."""

from datamodules.collate import PairCollator
from datamodules.image_text import ImageTextDataModule

__all__ = ["ImageTextDataModule", "PairCollator"]
