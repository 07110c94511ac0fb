"""tools/bench_memory.py (lame_pl.benchmarks.memory) on the tiny preset: bf16 weights take half the bytes of float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lame_pl.benchmarks import memory as bench_memory

ROOT = Path(__file__).resolve().parents[1]

ARGS = ["--preset", "tiny", "--image-size", "56", "--text-tokens", "4", "-K", "2"]


def test_one_dtype_in_this_process(tmp_path):
    figures = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert bench_memory.main([*ARGS, "--dtype", dtype, "--json", str(out)]) == 0
        figures[dtype] = json.loads(out.read_text())[dtype]
    fp32, bf16 = figures["float32"], figures["bfloat16"]
    assert fp32["parameters"] == bf16["parameters"] > 0
    # Buffers (rotary frequencies) stay float32: a hair over one half.
    assert 0.5 <= bf16["weight_bytes"] / fp32["weight_bytes"] < 0.501
    assert fp32["peak_rss_mib"] >= fp32["rss_after_build_mib"] > 0 and fp32["embedding_finite"]


@pytest.mark.slow
def test_several_dtypes_run_one_process_each(tmp_path):
    out = tmp_path / "mem.json"
    assert bench_memory.main([*ARGS, "--dtype", "float32,bfloat16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["bfloat16_over_float32"]["weight_bytes"] == pytest.approx(0.5, abs=1e-3)


def test_a_bad_dtype_is_named(capsys):
    with pytest.raises(SystemExit):
        bench_memory.main(["--dtype", "float32,fp8"])
    assert (
        "--dtype takes a comma-separated list of float32, bfloat16, float16; got 'float32,fp8'"
        in capsys.readouterr().err
    )
