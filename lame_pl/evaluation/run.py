"""The evaluators' command line, shared by ``tools/eval_mmeb.py`` and ``tools/eval_mrmr.py``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lame_pl.checkpoint import CheckpointError, load_checkpoint_file
from lame_pl.evaluation import mmeb, mmeb_tasks, mrmr
from lame_pl.evaluation.encode import CheckpointEncoder, EmbeddingCache, ItemEncoder, embed_items
from lame_pl.evaluation.official import score_official
from lame_pl.evaluation.report import format_table, summarize, task_record, write_task_json
from lame_pl.evaluation.tables import EvalDataError
from lame_pl.evaluation.task import RetrievalTask, score_task

BENCHMARKS = {
    "mmeb": {"title": "MMEB-v2", "modalities": mmeb_tasks.MODALITY_ORDER, "groups": mmeb_tasks.GROUP_ORDER},
    "mrmr": {"title": "MRMR", "modalities": ("mrmr",), "groups": {"mrmr": mrmr.SUBSETS}},
}


def build_parser(benchmark: str) -> argparse.ArgumentParser:
    """The options of one evaluator."""
    title = BENCHMARKS[benchmark]["title"]
    parser = argparse.ArgumentParser(description=f"Evaluate a LaME checkpoint on {title} from a local folder.")
    # Required unless --list-tasks, which needs neither a checkpoint nor data (checked in main).
    parser.add_argument(
        "--checkpoint",
        help="a .ckpt written by `lightning fit` (LaME or the CLIP anchor, told apart by its stored class)",
    )
    parser.add_argument(
        "--data-root", help=f"the local {title} folder (layouts: README, lame_pl/evaluation/{benchmark}.py)"
    )
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="evaluate only these tasks (default: every one found; case is ignored)"
    )
    parser.add_argument("--output-dir", help="where the per-task JSON files and summary.json go")
    parser.add_argument(
        "--list-tasks",
        action="store_true",
        help="print every task name this tool accepts, with its group and metric, and exit",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="items per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: OUTPUT_DIR/cache)")
    parser.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    parser.add_argument(
        "--max-text-length",
        type=int,
        default=None,
        help="most tokens per instruction and per text (default: the training run's "
        "data.max_text_length, read from the checkpoint)",
    )
    if benchmark == "mmeb":
        parser.add_argument("--num-frames", type=int, default=8, help="frames sampled from each video")
    return parser


def list_tasks(benchmark: str) -> str:
    """Every task name ``benchmark``'s evaluator accepts, one a line, with its group, metric and folder names."""
    if benchmark == "mrmr":
        lines = [f"{'task':<12} {'group':<15} {'metric':<9} folder"]
        for subset in mrmr.SUBSETS:
            lines.append(
                f"{subset:<12} {mrmr.CATEGORY[subset]:<15} {mrmr.MAIN_METRIC[subset]:<9} "
                f"{subset}/ or MRMRbenchmark/{subset}/"
            )
        return "\n".join(lines)
    lines = [f"{'task':<45} {'modality':<8} {'group':<38} {'metric':<7} {'ranking':<7} other folder names"]
    for modality in mmeb_tasks.MODALITY_ORDER:
        for info in mmeb_tasks.tasks_of(modality):
            group = f"{info.group} ({mmeb_tasks.GROUP_NAMES[info.group]})"
            extra = ", ".join(info.folders) + ("" if info.counted else "  [not counted in the 78]")
            lines.append(f"{info.name:<45} {modality:<8} {group:<38} {info.metric:<7} {info.scope:<7} {extra}".rstrip())
    return "\n".join(lines)


def load_tasks(benchmark: str, args: argparse.Namespace) -> list[RetrievalTask]:
    """Reads and checks the selected tasks of ``benchmark``."""
    if benchmark == "mmeb":
        return mmeb.load_mmeb_tasks(args.data_root, args.tasks, args.image_root, args.num_frames)
    return mrmr.load_mrmr_tasks(args.data_root, args.tasks, args.image_root)


def evaluate(
    tasks: Sequence[RetrievalTask], encoder: ItemEncoder, cache: EmbeddingCache | None, output_dir: Path
) -> list[dict[str, Any]]:
    """Embeds, scores and writes each task; returns the per-task records."""
    records = []
    for task in tasks:
        start = time.perf_counter()
        name = f"{task.modality}-{task.name}"
        # One pass over both sides: the task's cache file is read and written once.
        view = task.official
        extra = (
            []
            if view is None or (view.queries is task.queries and view.candidates is task.candidates)
            else [*view.queries, *view.candidates]
        )
        embeddings, encoded = embed_items([*task.queries, *task.candidates, *extra], encoder, cache, name)
        nq, nc = len(task.queries), len(task.candidates)
        queries, candidates = embeddings[:nq], embeddings[nq : nq + nc]
        official = None
        if view is not None:
            if extra:  # the benchmark embeds other items (MRMR: its own media rules)
                official = score_official(
                    view, embeddings[nq + nc : nq + nc + len(view.queries)], embeddings[nq + nc + len(view.queries) :]
                )
            else:
                official = score_official(view, queries, candidates)
        record = task_record(task, score_task(task, queries, candidates), official)
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["encoded"] = encoded
        write_task_json(output_dir, record)
        print(
            f"{task.name}: {record['main_metric']} official {record['main_score']:.4f}, strict "
            f"{record['strict_score']:.4f} ({record['num_queries']} queries, {record['encoded']} items encoded, "
            f"the rest from the cache)",
            file=sys.stderr,
        )
        records.append(record)
    return records


def checkpoint_encoder(args: argparse.Namespace) -> ItemEncoder:
    """The encoder of ``--checkpoint``, chosen by the model class it stores: LaME or the CLIP anchor."""
    from lame_pl.evaluation.clip_encoder import CLIPEncoder, is_clip_checkpoint

    # Checked first: a truncated or foreign file ends in one line naming it (CheckpointError),
    # not in whatever the first reader of its contents trips over.
    # (A missing file is named by the encoder.)
    if Path(args.checkpoint).is_file():
        load_checkpoint_file(args.checkpoint, "--checkpoint")
    if is_clip_checkpoint(args.checkpoint):
        if args.max_text_length is not None:
            print(
                "--max-text-length is ignored for a CLIP checkpoint: texts are cut at its context length",
                file=sys.stderr,
            )
        return CLIPEncoder(args.checkpoint, args.device, args.batch_size)
    return CheckpointEncoder(args.checkpoint, args.device, args.batch_size, args.max_text_length)


def main(benchmark: str, argv: Sequence[str] | None = None, encoder: ItemEncoder | None = None) -> dict[str, Any]:
    """Runs one evaluator; bad data ends it with ``error: ...`` on stderr and exit status 1.

    ``--list-tasks`` prints the accepted task names and exits with status 0 (``SystemExit``).

    Args:
        benchmark: ``mmeb`` or ``mrmr``.
        argv: Command-line arguments (default ``sys.argv[1:]``).
        encoder: An encoder to use instead of loading ``--checkpoint`` (tests).

    Returns:
        The summary written to ``OUTPUT_DIR/summary.json``.
    """
    spec = BENCHMARKS[benchmark]
    parser = build_parser(benchmark)
    args = parser.parse_args(argv)
    if args.list_tasks:
        print(list_tasks(benchmark))
        raise SystemExit(0)
    missing = [
        f"--{flag.replace('_', '-')}"
        for flag in ("checkpoint", "data_root", "output_dir")
        if getattr(args, flag) is None
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    for flag in ("batch_size", "max_text_length") + (("num_frames",) if benchmark == "mmeb" else ()):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    output_dir = Path(args.output_dir)
    try:
        tasks = load_tasks(benchmark, args)  # read and check everything before loading a model
        if encoder is None:
            encoder = checkpoint_encoder(args)
        cache = EmbeddingCache(Path(args.cache_dir) if args.cache_dir else output_dir / "cache")
        records = evaluate(tasks, encoder, cache, output_dir)
    except (EvalDataError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None
    summary = summarize(records, spec["modalities"], spec["groups"])
    summary.update(benchmark=spec["title"], checkpoint=str(args.checkpoint), tasks=records)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(records, summary, spec["modalities"], spec["groups"]))
    return summary
