"""The short config names `datamodules.…` and `callbacks.…` are aliases of `lame_pl.datamodules`/`lame_pl.callbacks`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lame_pl.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--config", str(ROOT / "configs/demo/base.yaml"), "--config", str(ROOT / "configs/demo/stage1.yaml")]


def test_the_short_names_are_the_same_modules_and_classes():
    import callbacks.console
    import datamodules.clip

    import callbacks
    import datamodules
    import lame_pl.callbacks.console
    import lame_pl.datamodules.clip
    from lame_pl.callbacks import DataHealth
    from lame_pl.datamodules import ImageTextDataModule

    assert datamodules.clip is lame_pl.datamodules.clip and callbacks.console is lame_pl.callbacks.console
    assert datamodules.ImageTextDataModule is ImageTextDataModule and callbacks.DataHealth is DataHealth
    assert datamodules.clip.CLIPImageTextDataModule is lame_pl.datamodules.clip.CLIPImageTextDataModule


def test_the_package_never_imports_the_short_names():
    """No source file under lame_pl names them, and importing every part of lame_pl leaves them unloaded."""
    pattern = re.compile(r"^\s*(from|import)\s+(datamodules|callbacks)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "lame_pl").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    code = (
        "import sys, pkgutil, importlib, lame_pl\n"
        "for m in pkgutil.walk_packages(lame_pl.__path__, 'lame_pl.'):\n"
        "    if not m.name.endswith('__main__'):  # that one runs the command line\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('datamodules', 'callbacks')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT / "tests")
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("prefix", ["", "lame_pl."])
def test_configs_name_classes_by_either_spelling(prefix, capsys):
    args = [
        "fit",
        *DEMO,
        f"--data={prefix}datamodules.ImageTextDataModule",
        f"--trainer.callbacks+={prefix}callbacks.DataHealth",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as stop:
        build_cli(args)
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"].endswith("datamodules.ImageTextDataModule")
    assert any(c["class_path"].endswith("callbacks.DataHealth") for c in config["trainer"]["callbacks"])
