"""Prints a test-metrics JSON (from ``callbacks.MetricsFile``) as retrieval metrics beside chance.

    python tools/show_metrics.py runs/demo/test_metrics.json

Given several files (runs tested on the same split), it prints them side by side, one column
per run, named by ``--names`` (default: each file's folder):

    python tools/show_metrics.py runs/demo/test_metrics.json runs/clip/test_metrics.json --names LaME CLIP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    return "\n".join(lines)


def side_by_side(runs: dict[str, dict[str, float]]) -> str:
    """One line per metric any run has, one column per run, then chance (from the first run that has it)."""
    width = max(10, *(len(name) + 2 for name in runs))
    names = sorted({name for metrics in runs.values() for name in metrics if name.startswith(METRIC_PREFIXES)})
    lines = [f"{'metric':<16}" + "".join(f"{label:>{width}}" for label in runs) + f"{'chance':>9}"]
    for name in names:
        cells = "".join(f"{metrics[name]:>{width}.4f}" if name in metrics else f"{'-':>{width}}"
                        for metrics in runs.values())
        chance = next((m[c] for m in runs.values() if (c := name.replace("test/", "chance/", 1)) in m), None)
        lines.append(f"{name:<16}{cells}" + (f"{chance:>9.4f}" if chance is not None else f"{'':>9}"))
    counts = {label: int(m["test/num_candidates"]) for label, m in runs.items() if "test/num_candidates" in m}
    if len(set(counts.values())) > 1:
        lines.append(f"warning: the runs were tested on different numbers of candidates: {counts}")
    elif counts:
        lines.append(f"({next(iter(counts.values()))} test queries, each ranked against every test caption)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test metrics beside chance; several files side by side.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="METRICS.json")
    parser.add_argument("--names", nargs="+", default=None, help="a column name per file (default: its folder)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.names is not None and len(args.names) != len(args.paths):
        print(f"error: --names gives {len(args.names)} names for {len(args.paths)} files", file=sys.stderr)
        return 2
    for path in args.paths:
        if not path.is_file():
            print(f"error: {path} does not exist; run the test stage first", file=sys.stderr)
            return 2
    if len(args.paths) == 1 and args.names is None:
        print(table(json.loads(args.paths[0].read_text())))
        return 0
    names = args.names or [path.parent.name or str(path) for path in args.paths]
    if len(set(names)) != len(names):  # one column per name: a repeated one would hide a run
        print(f"error: the columns would share a name ({', '.join(names)}); give distinct --names", file=sys.stderr)
        return 2
    print(side_by_side({name: json.loads(path.read_text()) for name, path in zip(names, args.paths, strict=True)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
