"""Prints a test-metrics JSON (from ``callbacks.MetricsFile``) as retrieval metrics beside chance.

    python tools/show_metrics.py runs/demo/test_metrics.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(metrics: dict[str, float]) -> str:
    """One line per ``test/recall@k``, MRR and nDCG@10: value, chance, and the ratio."""
    lines = [f"{'metric':<16}{'value':>8}{'chance':>9}{'x chance':>10}"]
    for name in sorted(metrics):
        if not name.startswith(("test/recall@", "test/mrr", "test/ndcg@")):
            continue
        chance = metrics.get(name.replace("test/", "chance/", 1))
        ratio = f"{metrics[name] / chance:>9.1f}x" if chance else f"{'':>10}"
        chance_text = f"{chance:>9.4f}" if chance is not None else f"{'':>9}"
        lines.append(f"{name:<16}{metrics[name]:>8.4f}{chance_text}{ratio}")
    if "test/num_candidates" in metrics:
        lines.append(f"({int(metrics['test/num_candidates'])} test queries, each ranked against every test caption)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python tools/show_metrics.py METRICS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.is_file():
        print(f"error: {path} does not exist; run the test stage first", file=sys.stderr)
        return 2
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
