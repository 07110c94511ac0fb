"""tools/bench_train.py (lame_pl.benchmarks.train) on the tiny preset: a smoke run of every figure, never a timing
assertion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lame_pl.benchmarks import train as bench_train

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--preset",
    "tiny",
    "--decoder-preset",
    "tiny",
    "--image-size",
    "56",
    "--text-tokens",
    "4",
    "-K",
    "2",
    "--steps",
    "1",
    "--threads",
    "1",
]
HEADLINE = "memory_ratio_gradcache_b256_over_plain_b8"


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "train.json"
    assert bench_train.main([*TINY, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _check_rows(report: dict, expected: set[tuple[str, int]]) -> None:
    rows = {(r["mode"], r["batch"]): r for r in report["results"]}
    assert set(rows) == expected
    for (mode, _), r in rows.items():
        assert r["chunk"] == (2 if mode == "gradcache" else None)
        assert r["steps"] == 1 and r["seconds"] > 0 and r["samples_per_s"] > 0 and r["loss_finite"]
        assert r["cpu_seconds"] > 0 and r["decoder_logits_mib_at_once"] > 0
        for key in ("peak_mib", "start_mib", "peak_over_start_mib"):
            assert math.isfinite(r[key]), key
        assert r["peak_mib"] >= r["start_mib"] > 0


def test_every_configuration_and_ratio_in_this_process(tmp_path, capsys):
    report = _run(
        tmp_path, "--plain-batches", "2,4", "--gradcache-batches", "4,8", "--chunk-size", "2", "--isolate", "none"
    )
    _check_rows(report, {("plain", 2), ("plain", 4), ("gradcache", 4), ("gradcache", 8)})
    # The time ratio is taken at the largest batch both steps ran.
    assert report["time_ratio_batch"] == 4
    assert report["time_ratio_gradcache_over_plain"] > 0 and report["cpu_time_ratio_gradcache_over_plain"] > 0
    ratios = report["ratios"]
    assert ratios["memory_ratio_batches"] == {"gradcache": 8, "plain": 2}
    for key in (
        "memory_ratio_largest_gradcache_over_smallest_plain",
        "memory_ratio_largest_gradcache_over_smallest_plain_over_start",
    ):
        assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    # The headline memory ratio needs GradCache at 256 and plain at 8: null, with the reason.
    for key in (HEADLINE, HEADLINE + "_over_start"):
        assert key in report and report[key] is None
        assert report["null_reasons"][key] == "not run: gradcache batch 256 and plain batch 8"
    assert report["config"]["chunk_size"] == 2 and report["machine"]["cpu_count"] >= 1
    assert "time_ratio_gradcache_over_plain" in capsys.readouterr().out


def test_one_process_per_configuration(tmp_path):
    report = _run(tmp_path, "--plain-batches", "2", "--gradcache-batches", "", "--chunk-size", "2")
    _check_rows(report, {("plain", 2)})
    row = report["results"][0]
    assert row["memory_source"] in ("VmHWM after clear_refs",) or row["memory_source"].startswith("ru_maxrss")
    assert report["time_ratio_gradcache_over_plain"] is None
    assert "no batch size ran both" in report["null_reasons"]["time_ratio_gradcache_over_plain"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--plain-batches", "8,0"], "--plain-batches batch sizes must be >= 1"),
        (["--gradcache-batches", "4,x"], "--gradcache-batches must be comma-separated integers"),
        (["--chunk-size", "0"], "argument --chunk-size: expected a positive integer, got 0"),
        (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
        (["--image-size", "50"], "--image-size must be a multiple of 28"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_train.main(argv)
    assert message in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_train.main(["--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
