"""The shard formats of ``lame_pl.data``: light to import, one skip counter for writers and readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lame_pl.data.skips import SkipCounter, Skips

TOOLS = Path(__file__).resolve().parents[1] / "tools"
FORMAT_MODULES = (
    "lame_pl.data.image_text",
    "lame_pl.data.instruction_pairs",
    "lame_pl.data.manifest",
    "lame_pl.data.shard_writer",
    "lame_pl.data.skips",
)


def test_format_modules_and_make_shards_import_without_torch() -> None:
    # The shard writers (tools/make_shards.py) start in a fraction of a second; a format's decode
    # stage and collator take torch and webdataset only when a data module uses them.
    code = (
        f"import sys, runpy; import {', '.join(FORMAT_MODULES)}; runpy.run_path({str(TOOLS / 'make_shards.py')!r}); "
        "heavy = sorted({'torch', 'webdataset', 'lightning', 'transformers'} & set(sys.modules)); "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reader_skips_report_like_writer_skips() -> None:
    skips = SkipCounter()
    assert isinstance(skips, Skips)
    skips.skip("bad_image", "a.tar", "k1", "truncated")
    skips.skip("bad_image", "a.tar", "k2", "truncated")
    assert skips.report() == "skipped: 2\n  bad_image: 2 (e.g. shard 'a.tar', sample 'k1', shard 'a.tar', sample 'k2')"
    assert skips.drain() == {"bad_image": 2} and skips.counts == {}
