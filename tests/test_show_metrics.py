"""tools/show_metrics.py (lame_pl.metrics_table): the table, and the range check that `make demo` prints after it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lame_pl import metrics_table as show_metrics

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "configs" / "demo" / "expected_metrics.json"


def write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content))
    return path


REFERENCE = {
    "tolerance": 0.02,
    "metrics": ["test/recall@1", "test/mrr"],
    "runs": [{"test/recall@1": 0.70, "test/mrr": 0.80}, {"test/recall@1": 0.74, "test/mrr": 0.84}],
}


def test_each_metric_is_said_inside_or_outside_the_range(tmp_path, capsys):
    expected = write(tmp_path / "expected.json", REFERENCE)
    # recall@1 inside the widened span [0.68, 0.76]; MRR 0.87 above [0.78, 0.86].
    metrics = write(
        tmp_path / "m.json",
        {
            "test/recall@1": 0.681,
            "test/mrr": 0.87,
            "chance/recall@1": 0.004,
            "test/num_candidates": 256.0,
            "step": 600.0,
        },
    )
    assert show_metrics.main([str(metrics), "--expected", str(expected)]) == 0  # reported, not an error
    out = capsys.readouterr().out
    assert "(the weights of training step 600)" in out
    assert re.search(r"test/recall@1 +0\.6810 +inside the expected range \[0\.6800, 0\.7600\]", out)
    assert re.search(r"test/mrr +0\.8700 +OUTSIDE the expected range \[0\.7800, 0\.8600\]", out)
    assert out.rstrip().endswith("1 metric(s) outside the expected range")

    inside = write(tmp_path / "inside.json", {"test/recall@1": 0.75, "test/mrr": 0.79})
    assert show_metrics.main([str(inside), "--expected", str(expected)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("all inside the expected range")
    # A metric the run lacks counts as outside, named.
    partial = write(tmp_path / "partial.json", {"test/recall@1": 0.75})
    assert show_metrics.main([str(partial), "--expected", str(expected)]) == 0
    out = capsys.readouterr().out
    assert "test/mrr" in out and "missing: not in the metrics file" in out and "1 metric(s) outside" in out


def test_several_runs_are_each_checked(tmp_path, capsys):
    expected = write(tmp_path / "expected.json", REFERENCE)
    a = write(tmp_path / "a.json", {"test/recall@1": 0.72, "test/mrr": 0.82})
    b = write(tmp_path / "b.json", {"test/recall@1": 0.50, "test/mrr": 0.82})
    assert show_metrics.main([str(a), str(b), "--names", "A", "B", "--expected", str(expected)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"A: test/recall@1 +0\.7200 +inside", out) and re.search(
        r"B: test/recall@1 +0\.5000 +OUTSIDE", out
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({**REFERENCE, "tolerance": -1}, "tolerance must be a number >= 0"),
        ({**REFERENCE, "metrics": []}, "metrics must be a non-empty list"),
        ({**REFERENCE, "runs": [{"test/recall@1": 0.7}]}, "no run gives a value for 'test/mrr'"),
        ({**REFERENCE, "runs": [*REFERENCE["runs"], {"test/mrr": "0.8"}]}, "runs[2]['test/mrr'] must be a number"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_a_malformed_expected_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    expected = write(tmp_path / "expected.json", content)
    metrics = write(tmp_path / "m.json", {"test/recall@1": 0.7, "test/mrr": 0.8})
    assert show_metrics.main([str(metrics), "--expected", str(expected)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(expected) in err and message in err
    assert show_metrics.main([str(metrics), "--expected", str(tmp_path / "none.json")]) == 2
    assert "none.json does not exist" in capsys.readouterr().err


def test_the_demo_checks_its_metrics_against_the_reference_runs():
    ranges = show_metrics.expected_ranges(json.loads(EXPECTED.read_text()), str(EXPECTED))
    assert set(ranges) == {"test/recall@1", "test/recall@5", "test/mrr", "test/ndcg@10"}
    makefile = (ROOT / "Makefile").read_text()
    assert "tools/show_metrics.py $(RUNS)/test_metrics.json --expected configs/demo/expected_metrics.json" in makefile


def test_a_run_may_give_some_metrics_only():
    spec = {
        "tolerance": 0.01,
        "metrics": ["test/recall@1", "test/mrr"],
        "runs": [{"test/recall@1": 0.70, "test/mrr": 0.80}, {"test/recall@1": 0.74, "where": "another machine"}],
    }
    ranges = show_metrics.expected_ranges(spec, "x.json")
    assert ranges["test/recall@1"] == pytest.approx((0.69, 0.75)) and ranges["test/mrr"] == pytest.approx((0.79, 0.81))
