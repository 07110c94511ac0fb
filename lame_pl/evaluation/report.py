"""Per-task JSON files and the summary table: per group, per modality and overall, in leaderboard order.

Averages follow the MMEB-v2 leaderboard: a group's and a modality's score are means over their
tasks' main scores, and the overall score is the mean over every counted task (not a mean of
modality means). Tasks outside the benchmark's list are shown but not averaged.

Every figure comes twice: ``official`` (the benchmark's own scorer, ``official``; the headline,
``main_score`` and ``score``) and ``strict`` (the project's rules, ``metrics``; ``strict_score``
and ``strict``). A gap of ``GAP_FLAG`` or more between them is flagged: ties or a collapsed model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lame_pl.evaluation.official import GAP_FLAG, SCORER_NAMES
from lame_pl.evaluation.task import RetrievalTask


def task_record(
    task: RetrievalTask, metrics: dict[str, float], official: dict[str, float] | None = None
) -> dict[str, Any]:
    """What one task's JSON holds: where it sits, its official and strict main scores and every metric.

    ``official`` defaults to ``metrics`` (a task without an official view is scored one way).
    """
    headline = official if official is not None else metrics
    gap = headline[task.main_metric] - metrics[task.main_metric]
    return {
        "task": task.name,
        "modality": task.modality,
        "group": task.group,
        "counted": task.counted,
        "main_metric": task.main_metric,
        "main_score": headline[task.main_metric],
        "strict_score": metrics[task.main_metric],
        "gap": gap,
        "gap_flagged": abs(gap) >= GAP_FLAG,
        "scorer": SCORER_NAMES[task.official.scorer]
        if task.official is not None and official is not None
        else "strict",
        "ranking": "local" if task.local is not None else "global",
        "num_queries": int(headline["num_queries"]),
        "num_candidates": int(headline["num_candidates"]),
        "skipped_queries": task.skipped_queries,
        "metrics": {k: v for k, v in headline.items() if not k.startswith("num_")},
        "strict": {
            "num_queries": int(metrics["num_queries"]),
            "num_candidates": int(metrics["num_candidates"]),
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("num_")},
        },
    }


def write_task_json(output_dir: Path, record: dict[str, Any]) -> Path:
    """``<output_dir>/<modality>/<task>_score.json`` (VLM2Vec's file naming)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", record["task"])
    path = output_dir / record["modality"] / f"{safe}_score.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _tasks(n: int) -> str:
    return f"(mean of {n} task{'' if n == 1 else 's'})"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _block(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    official = _mean([r["main_score"] for r in rows])
    strict = _mean([r["strict_score"] for r in rows])
    flagged = official is not None and strict is not None and abs(official - strict) >= GAP_FLAG
    return {"score": official, "strict": strict, "num_tasks": len(rows), "gap_flagged": flagged}


def summarize(
    records: Sequence[dict[str, Any]], modality_order: Sequence[str], group_order: dict[str, Sequence[str]]
) -> dict[str, Any]:
    """Group, modality and overall means of the main scores, official and strict, in the given orders.

    Returns:
        ``{"modalities": {modality: {"metric", "score", "strict", "num_tasks", "gap_flagged", "groups":
        {group: {"score", "strict", "num_tasks", "gap_flagged"}}}}, "overall": {"score", "strict",
        "num_tasks", "gap_flagged"}}``; ``score`` is official; a block with no task is left out.
    """
    modalities: dict[str, Any] = {}
    for modality in modality_order:
        rows = [r for r in records if r["modality"] == modality and r["counted"]]
        if not rows:
            continue
        groups = {}
        for group in group_order.get(modality, ()):
            members = [r for r in rows if r["group"] == group]
            if members:
                groups[group] = _block(members)
        modalities[modality] = {
            "metric": rows[0]["main_metric"] if len({r["main_metric"] for r in rows}) == 1 else "main",
            **_block(rows),
            "groups": groups,
        }
    return {"modalities": modalities, "overall": _block([r for r in records if r["counted"]])}


def _pair(official: float, strict: float, flagged: bool) -> str:
    return f"{100 * official:>8.2f} {100 * strict:>7.2f}{' !' if flagged else ''}"


def format_table(
    records: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    modality_order: Sequence[str],
    group_order: dict[str, Sequence[str]],
) -> str:
    """A plain-text table: every task, then each group, modality and the overall score (x100), official and strict."""
    lines = [f"{'modality':<9} {'group':<11} {'task':<48} {'metric':<9} {'official':>8} {'strict':>7} {'queries':>8}"]

    def rank(r: dict[str, Any]) -> tuple:
        modality = r["modality"]
        m = modality_order.index(modality) if modality in modality_order else len(modality_order)
        groups = list(group_order.get(modality, ()))
        g = groups.index(r["group"]) if r["group"] in groups else len(groups)
        return (m, g)

    for r in sorted(records, key=rank):  # sorted() is stable: tasks keep their order inside a group
        mark = "" if r["counted"] else " *"
        lines.append(
            f"{r['modality']:<9} {r['group']:<11} {r['task'] + mark:<48} {r['main_metric']:<9} "
            f"{100 * r['main_score']:>8.2f} {100 * r['strict_score']:>7.2f} {r['num_queries']:>8}"
            f"{' !' if r['gap_flagged'] else ''}"
        )
    lines.append("")
    for modality, block in summary["modalities"].items():
        for group, g in block["groups"].items():
            lines.append(
                f"{modality:<9} {group:<11} {_tasks(g['num_tasks']):<48} "
                f"{block['metric']:<9} {_pair(g['score'], g['strict'], g['gap_flagged'])}"
            )
        lines.append(
            f"{modality:<9} {'ALL':<11} {_tasks(block['num_tasks']):<48} "
            f"{block['metric']:<9} {_pair(block['score'], block['strict'], block['gap_flagged'])}"
        )
    overall = summary["overall"]
    if overall["score"] is not None:
        lines.append(
            f"{'overall':<9} {'':<11} {_tasks(overall['num_tasks']):<48} "
            f"{'main':<9} {_pair(overall['score'], overall['strict'], overall['gap_flagged'])}"
        )
    lines.append(
        "official: the benchmark's own scorer (quote this one); strict: ties against the query, duplicate "
        "candidates merged, queries without a positive qrel left out"
    )
    if any(r["gap_flagged"] for r in records):
        lines.append(
            f"! official and strict differ by {100 * GAP_FLAG:.0f} points or more: tied scores (a collapsed "
            "model?) or duplicate candidates decide the official figure; look before quoting it"
        )
    if any(not r["counted"] for r in records):
        lines.append("* not part of the benchmark's task list: shown, not averaged")
    return "\n".join(lines)
