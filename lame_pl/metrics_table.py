"""A test-metrics JSON (``callbacks.MetricsFile``) as text: retrieval metrics beside chance, runs side by side.

``table`` prints one run, ``side_by_side`` several tested on the same split; ``expected_report``
says of each metric an expected-metrics file names (``configs/demo/expected_metrics.json``)
whether it lies inside the span of that file's reference runs, widened by its tolerance.
``tools/show_metrics.py`` is the command line (``main``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

METRIC_PREFIXES = ("test/recall@", "test/mrr", "test/ndcg@")


def table(metrics: dict[str, float]) -> str:
    """One line per ``test/recall@k``, MRR and nDCG@10: value, chance, and the ratio."""
    lines = [f"{'metric':<16}{'value':>8}{'chance':>9}{'x chance':>10}"]
    for name in sorted(metrics):
        if not name.startswith(METRIC_PREFIXES):
            continue
        chance = metrics.get(name.replace("test/", "chance/", 1))
        ratio = f"{metrics[name] / chance:>9.1f}x" if chance else f"{'':>10}"
        chance_text = f"{chance:>9.4f}" if chance is not None else f"{'':>9}"
        lines.append(f"{name:<16}{metrics[name]:>8.4f}{chance_text}{ratio}")
    if "test/num_candidates" in metrics:
        lines.append(f"({int(metrics['test/num_candidates'])} test queries, each ranked against every test caption)")
    if "step" in metrics:  # LaMEModule logs the tested checkpoint's training step
        lines.append(f"(the weights of training step {int(metrics['step'])})")
    return "\n".join(lines)


def side_by_side(runs: dict[str, dict[str, float]]) -> str:
    """One line per metric any run has, one column per run, then chance (from the first run that has it)."""
    width = max(10, *(len(name) + 2 for name in runs))
    names = sorted({name for metrics in runs.values() for name in metrics if name.startswith(METRIC_PREFIXES)})
    lines = [f"{'metric':<16}" + "".join(f"{label:>{width}}" for label in runs) + f"{'chance':>9}"]
    for name in names:
        cells = "".join(
            f"{metrics[name]:>{width}.4f}" if name in metrics else f"{'-':>{width}}" for metrics in runs.values()
        )
        chance = next((m[c] for m in runs.values() if (c := name.replace("test/", "chance/", 1)) in m), None)
        lines.append(f"{name:<16}{cells}" + (f"{chance:>9.4f}" if chance is not None else f"{'':>9}"))
    counts = {label: int(m["test/num_candidates"]) for label, m in runs.items() if "test/num_candidates" in m}
    if len(set(counts.values())) > 1:
        lines.append(f"warning: the runs were tested on different numbers of candidates: {counts}")
    elif counts:
        lines.append(f"({next(iter(counts.values()))} test queries, each ranked against every test caption)")
    return "\n".join(lines)


def expected_ranges(spec: Any, source: str) -> dict[str, tuple[float, float]]:
    """``{metric: (low, high)}``: the span of the reference runs' values, widened by the tolerance on each side.

    ``spec`` is an expected-metrics file's content: ``tolerance`` (a number >= 0), ``metrics``
    (the names checked) and ``runs`` (reference runs, each a mapping of metric names to the
    values it gave; a run may lack some, but every metric needs one run at least).

    Raises:
        ValueError: a malformed file, named with ``source`` and the bad entry.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: expected a JSON object with tolerance, metrics and runs")
    tolerance, names, runs = spec.get("tolerance"), spec.get("metrics"), spec.get("runs")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance >= 0:
        raise ValueError(f"{source}: tolerance must be a number >= 0, got {tolerance!r}")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: metrics must be a non-empty list of metric names, got {names!r}")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{source}: runs must be a non-empty list of reference runs, got {runs!r}")
    ranges = {}
    for name in names:
        values = []
        for i, run in enumerate(runs):
            if not isinstance(run, dict):
                raise ValueError(f"{source}: runs[{i}] must be an object of metric values, got {run!r}")
            if name not in run:
                continue
            if isinstance(run[name], bool) or not isinstance(run[name], int | float):
                raise ValueError(f"{source}: runs[{i}][{name!r}] must be a number, got {run[name]!r}")
            values.append(float(run[name]))
        if not values:
            raise ValueError(f"{source}: no run gives a value for {name!r}")
        low, high = min(values) - tolerance, max(values) + tolerance
        if name.startswith(METRIC_PREFIXES):  # retrieval metrics lie in [0, 1]
            low, high = max(low, 0.0), min(high, 1.0)
        ranges[name] = (low, high)
    return ranges


def range_check(metrics: dict[str, float], ranges: dict[str, tuple[float, float]], label: str = "") -> list[str]:
    """One line per metric of ``ranges``: its value, inside or "outside the expected range", and the range."""
    lines = []
    for name, (low, high) in ranges.items():
        where = f"[{low:.4f}, {high:.4f}]"
        if name not in metrics:
            lines.append(f"{label}{name:<16} missing: not in the metrics file (expected in {where})")
            continue
        value = metrics[name]
        verdict = "inside the expected range" if low <= value <= high else "OUTSIDE the expected range"
        lines.append(f"{label}{name:<16}{value:>8.4f}  {verdict} {where}")
    return lines


def expected_report(runs: dict[str, dict[str, float]], path: Path) -> str:
    """The range check of every run against the expected-metrics file at ``path``, under a heading."""
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    ranges = expected_ranges(spec, str(path))
    heading = (
        f"expected range ({path}: {len(spec['runs'])} reference runs, their span "
        f"widened by {spec['tolerance']:g} on each side):"
    )
    lines = [heading]
    for name, metrics in runs.items():
        lines += range_check(metrics, ranges, f"{name}: " if len(runs) > 1 else "")
    outside = sum(
        not low <= metrics.get(name, math.nan) <= high
        for metrics in runs.values()
        for name, (low, high) in ranges.items()
    )
    lines.append(f"{outside} metric(s) outside the expected range" if outside else "all inside the expected range")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tools/show_metrics.py``: prints the table (or the runs side by side) and the range check; the exit status."""
    parser = argparse.ArgumentParser(description="Test metrics beside chance; several files side by side.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="METRICS.json")
    parser.add_argument("--names", nargs="+", default=None, help="a column name per file (default: its folder)")
    parser.add_argument(
        "--expected",
        type=Path,
        default=None,
        metavar="EXPECTED.json",
        help="reference runs and a tolerance (configs/demo/expected_metrics.json): say whether "
        "each metric is inside their range",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.names is not None and len(args.names) != len(args.paths):
        print(f"error: --names gives {len(args.names)} names for {len(args.paths)} files", file=sys.stderr)
        return 2
    for path in args.paths:
        if not path.is_file():
            print(f"error: {path} does not exist; run the test stage first", file=sys.stderr)
            return 2
    if args.expected is not None and not args.expected.is_file():
        print(f"error: --expected {args.expected} does not exist", file=sys.stderr)
        return 2
    if len(args.paths) == 1 and args.names is None:
        runs = {str(args.paths[0]): json.loads(args.paths[0].read_text())}
        print(table(next(iter(runs.values()))))
    else:
        names = args.names or [path.parent.name or str(path) for path in args.paths]
        if len(set(names)) != len(names):  # one column per name: a repeated one would hide a run
            print(f"error: the columns would share a name ({', '.join(names)}); give distinct --names", file=sys.stderr)
            return 2
        runs = {name: json.loads(path.read_text()) for name, path in zip(names, args.paths, strict=True)}
        print(side_by_side(runs))
    if args.expected is not None:
        try:
            print(expected_report(runs, args.expected))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0
