"""tools/bench_encode.py (lame_pl.benchmarks.encode) end to end on the tiny preset: a smoke run, never a timing
assertion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lame_pl.benchmarks import encode as bench_encode
from lame_pl.benchmarks.encode_timing import HF_GENERATE
from lame_pl.modes import MODES

ROOT = Path(__file__).resolve().parents[1]

KEYS = (
    "ratio_explicit_cot_over_lame",
    "ratio_latent_sequential_over_lame",
    "ratio_lame_over_discriminative",
    "flop_floor_lame_over_discriminative",
    "ratio_cot_token_over_hf_generate_token",
    "train_samples_per_s_lame",
    "train_samples_per_s_discriminative",
)


def test_bench_encode_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    options = (
        "--preset tiny --device cpu --image-size 56 --text-tokens 6 -K 3 -T 3 --batch-sizes 1,2 --warmup 0"
        " --repeats 1 --train-steps 1 --train-batch-size 2 --decoder-preset tiny --clip-arch none"
    )
    argv = [*options.split(), "--json", str(out)]
    assert bench_encode.main(argv) == 0
    report = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    n = report["config"]["input_tokens"]
    assert n == 4 + 2 + 6  # 56x56 image = 4 merged patches, vision start/end, 6 text tokens
    assert report["flop_floor_lame_over_discriminative"] == pytest.approx((n + 3 + 1) / (n + 1))
    for size in ("1", "2"):
        for mode in (*MODES, HF_GENERATE):
            row = report["encode"][size][mode]
            assert row["batch_size"] == int(size) and row["ms_per_sample"] > 0 and row["peak_memory_mib"] is None
    for size in ("1", "2"):
        for key, value in report["paired_ratios_by_batch"][size].items():
            assert math.isfinite(value) and value > 0, key
    assert "ratio_lame_over_discriminative" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--image-size", "50"], "multiple of 28"),
        (["--batch-sizes", "1,x"], "comma-separated"),
        (["--backbone", "/no/such/dir"], "is not a directory"),
        (["--device", "cpu", "--attn", "flash_attention_2"], "flash_attention_2"),
    ],
)
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_encode.main(argv if "--backbone" in argv else ["--preset", "tiny", *argv])
    assert message in capsys.readouterr().err
