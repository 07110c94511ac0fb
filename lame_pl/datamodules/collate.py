"""The shard formats' collators, by the name the data modules and the trainers' callers know them.

Each collator lives with its format: ``PairCollator`` in ``lame_pl.data.image_text``,
``InstructionCollator`` in ``lame_pl.data.instruction_pairs``; what they share (the prompt
processor, the decoder labels) is ``lame_pl.data.collate.ProcessorCollator``.
"""

from lame_pl.data.image_text import PairCollator
from lame_pl.data.instruction_pairs import InstructionCollator

__all__ = ["InstructionCollator", "PairCollator"]
