"""Data formats: each format's schema, and how its records are written to WebDataset shards."""

from lame_pl.data.shard_writer import DataError, Skips

__all__ = ["DataError", "Skips"]
