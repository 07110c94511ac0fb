"""``callbacks``: the short config name of ``lame_pl.callbacks`` (``class_path: callbacks.DataHealth``).

A thin alias (``lame_pl.package_alias``): ``callbacks.console`` is ``lame_pl.callbacks.console``.
"""

from lame_pl.callbacks import *  # noqa: F403
from lame_pl.callbacks import __all__  # noqa: F401
from lame_pl.package_alias import alias_package

alias_package(__name__, "lame_pl.callbacks")
