"""A short top-level name for a subpackage of ``lame_pl`` (``datamodules``, ``callbacks``).

Configs name classes as ``class_path: datamodules.ImageTextDataModule`` or ``callbacks.DataHealth``
(and ``datamodules.clip.CLIPImageTextDataModule``); the code lives in ``lame_pl.datamodules`` and
``lame_pl.callbacks``. The short packages are thin aliases: every submodule is registered under
the short name as the *same* module object, so a class has one identity whichever name imported it
(``isinstance`` checks, pickled references and saved configs agree).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

# Each aliased subpackage and its short name: the shims register these, the CLI's help prints them.
SHORT_NAMES = {"lame_pl.datamodules": "datamodules", "lame_pl.callbacks": "callbacks"}


def alias_package(short: str, full: str) -> ModuleType:
    """Registers ``full``'s submodules as ``short.<name>`` and returns ``full`` (the caller re-exports it).

    Args:
        short: The alias package's name (its ``__name__``).
        full: The real package, e.g. ``lame_pl.datamodules``.
    """
    if SHORT_NAMES.get(full) != short:
        raise ValueError(f"{short!r} is not the short name of {full!r} (lame_pl.package_alias.SHORT_NAMES)")
    package = importlib.import_module(full)
    alias = sys.modules[short]
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{full}.{info.name}")
        sys.modules[f"{short}.{info.name}"] = module
        setattr(alias, info.name, module)
    return package
