"""Data formats, one module each: its layout, its writer, its decode stage and its collator.

``image_text`` (image-caption pairs) and ``instruction_pairs`` (query, target, hard negatives);
``manifest`` reads a JSONL/CSV manifest of either, ``shard_writer`` writes a split and its
``manifest.json``, ``skips`` counts what writers and readers leave out. Importing a format does not
import torch or webdataset (the data modules in ``lame_pl.datamodules`` stream the formats).
"""

from lame_pl.data.shard_writer import DataError
from lame_pl.data.skips import Skips

__all__ = ["DataError", "Skips"]
