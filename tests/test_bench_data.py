"""tools/bench_data.py (lame_pl.benchmarks.data): data-loading throughput against the step time, end to end."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_synthetic_shards

from lame_pl.benchmarks import data as bench_data


def test_bench_data_runs_end_to_end(tmp_path: Path) -> None:
    make_synthetic_shards(tmp_path / "data", train=48, val=1, test=1, samples_per_shard=16)
    report = tmp_path / "bench.json"
    assert (
        bench_data.main(
            [
                "--shards",
                str(tmp_path / "data" / "train"),
                "--preset",
                "tiny",
                "--image-size",
                "56",
                "--batch-size",
                "4",
                "--batches",
                "2",
                "--warmup",
                "1",
                "--workers",
                "0",
                "--steps",
                "1",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    figures = json.loads(report.read_text())
    assert {"args", "machine", "step_time_s", "step_times_s", "results"} <= set(figures)
    assert figures["step_time_s"] > 0 and len(figures["step_times_s"]) == 1
    (row,) = figures["results"]
    assert row["workers"] == 0
    assert {"samples_per_s", "samples_per_s_per_worker", "data_time_per_batch_s", "data_to_step_ratio"} <= set(row)
    assert row["samples_per_s"] > 0 and row["data_to_step_ratio"] > 0
