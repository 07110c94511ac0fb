"""``datamodules``: the short config name of ``lame_pl.datamodules`` (``class_path: datamodules.ImageTextDataModule``).

A thin alias (``lame_pl.package_alias``): ``datamodules.clip`` is ``lame_pl.datamodules.clip``.
"""

from lame_pl.datamodules import *  # noqa: F403
from lame_pl.datamodules import __all__  # noqa: F401
from lame_pl.package_alias import alias_package

alias_package(__name__, "lame_pl.datamodules")
