"""The ablation's results: a Markdown table, ``results.json`` and ``results.md``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from lame_pl.ablation.spec import CONFIG, ROOT, Row


def _cell(result: dict[str, float], kind: str) -> str:
    return f"{result[f'{kind}/recall@1']:.2f} / {result[f'{kind}/recall@5']:.2f} / {result[f'{kind}/hard@1']:.2f}"


def format_table(results: list[dict[str, Any]], kinds: list[str]) -> str:
    """A Markdown table: one line per row, then chance; each cell is ``R@1 / R@5 / hard@1``."""
    header = ["mode", "K", "all", *kinds, "encode ms/sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['k']} | " + " | ".join(["n/a"] * (len(header) - 2)) + " |")
            continue
        timed = f"{r['encode_ms_per_sample']:.2f}" if "encode_ms_per_sample" in r else "-"
        cells = [r["mode"], str(r["k"]), _cell(r, "all"), *(_cell(r, k) for k in kinds), timed]
        lines.append("| " + " | ".join(cells) + " |")
    done = [r for r in results if "skipped" not in r]
    if done:
        chance = {k.removeprefix("chance/"): v for k, v in done[0].items() if k.startswith("chance/")}
        lines.append("| chance | | " + " | ".join(_cell(chance, k) for k in ["all", *kinds]) + " | |")
    return "\n".join(lines)


def write_results(
    args: argparse.Namespace, rows: list[Row], results: list[dict[str, Any]], kinds: list[str], elapsed: float
) -> str:
    """Writes ``OUT/results.json`` and ``OUT/results.md`` (the table and a note); returns what the console shows."""
    table = format_table(results, kinds)
    setup = {
        "steps": args.steps,
        "stage1_steps": args.stage1_steps,
        "data": str(args.data),
        "train": args.train,
        "test": args.test,
        "seed": args.seed,
        "config": str(CONFIG.relative_to(ROOT)),
        "sets": args.sets,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "elapsed_s": elapsed,
        "rows": [r.name for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=1) + "\n")
    trained = sorted({int(r["trained_steps"]) for r in results if "trained_steps" in r})
    note = (
        "Cells: R@1 / R@5 over every distinct statement of the kind / hard@1 within the contrast group. "
        f"Stage-2 steps per row: {', '.join(map(str, trained)) or 'see results.json'}"
        f"{f' (after {args.stage1_steps} decoder-only steps for K>0)' if args.stage1_steps else ''}; "
        f"encode ms/sample at batch {int(results[0].get('encode_batch', 0)) if results else 0}, "
        f"{torch.get_num_threads()} torch thread(s); this run: {elapsed / 60:.1f} min."
    )
    (args.out / "results.md").write_text(table + "\n\n" + note + "\n")
    return table + "\n" + note
