"""Quality ablation of the encode modes at demo scale: one table of per-kind recall and encode time.

Trains ``discriminative`` (K=0), ``lame`` (K=1, 4, 8, 16) and ``latent_sequential`` (K=8) with the
same budget (steps, batch, lr, seed and data) on the compositional synthetic set through the real
command line (``lightning fit``, then ``lightning predict`` with ``callbacks.EmbeddingWriter``), and
scores each row's test embeddings per task kind:

    python tools/ablate_modes.py                       # make ablation
    python tools/ablate_modes.py --steps 800           # a longer budget per row
    python tools/ablate_modes.py --rows lame:8,discriminative:0 --out runs/ablation-quick
    python tools/ablate_modes.py --threads 1           # on a machine shared with other jobs

Budget: ``--steps`` (default 300) optimiser steps of batch 32 per row. On 2 CPU cores shared with
other jobs (load 4-6), one thread per process, a step of the demo-size model took ~1.3 s, so the
six rows take about 40 minutes; on an idle machine with 2 threads, much less.

Data: ``data/ablation`` (written on first use by ``tools/make_shards.py synthetic --tasks
caption,count,relation,binding`` and ``tools/decoder_vocab.py``). Each test image is scored two ways:

- ``R@k``: rank every distinct statement of its kind in the test split (chance ``k / distinct``);
- ``hard@1``: rank only its contrast group, the statements of scenes with the same objects that
  differ in the composed property (chance ``1 / group size``: 1/2, or 1/4 for count).

``all`` is the mean over every test image. Encode time is the query side (image + instruction +
the mode's latent steps) of one fixed batch, the first test batch, the same for every row: median
of ``--repeats`` timed calls after one warm-up, in ``torch.inference_mode``, divided by the batch
size; all rows are timed together once training is over, in turns (one call per row per round),
so that other jobs on the machine slow every row alike. Results go to ``OUT/results.json`` and ``OUT/results.md``; each row's run (TensorBoard logs,
``last.ckpt``, ``test_embeddings/``) to ``OUT/<mode>-k<K>/``.

Stage 1 is left out by default (``--stage1-steps 0``): with a random backbone there is nothing
pretrained for a decoder-only warm-up to build on, the decoder loss trains the reason tokens in
stage 2 anyway (weight 0.5), and without stage 1 every row runs the same optimiser steps on the
same objective schedule, which is what makes the rows comparable. ``--stage1-steps S`` gives each
K>0 row a decoder-only warm-up of S steps out of its budget (then ``--steps - S`` of stage 2, from
the warm-up's weights); the discriminative row, which has no decoder, spends all ``--steps`` in stage 2.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from lame_pl.ablation.data import ensure_data, read_test_records
from lame_pl.ablation.report import write_results
from lame_pl.ablation.runs import predict_row, time_encodes, train_row
from lame_pl.ablation.scoring import kind_metrics
from lame_pl.ablation.spec import DEFAULT_ROWS, ROOT, TASKS, Row, parse_rows
from lame_pl.embeddings_folder import SUMMARY_FILE, load_embeddings


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"MODE:K items, comma-separated (default {DEFAULT_ROWS})")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per row (default 300)")
    parser.add_argument(
        "--stage1-steps",
        type=int,
        default=0,
        help="of --steps, how many a K>0 row spends in a decoder-only warm-up (default 0)",
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "ablation", help="compositional shards")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation", help="runs and results")
    parser.add_argument("--train", type=int, default=8000, help="training samples to write (default 8000)")
    parser.add_argument("--val", type=int, default=64, help="validation samples to write (default 64)")
    parser.add_argument("--test", type=int, default=1024, help="test samples to write (default 1024)")
    parser.add_argument("--image-size", type=int, default=112, help="image side (default 112, as the config)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--repeats", type=int, default=10, help="timed encode calls per row (default 10)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip training and prediction for rows whose last.ckpt and test_embeddings/ are in "
        "--out (scores and encode times are always computed afresh)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for training and timing (default: torch's choice); on a shared "
        "machine 1 avoids the stalls of oversubscribed thread pools",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra CLI override for every command, e.g. data.init_args.batch_size=16 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
    except ValueError as err:
        parser.error(f"--rows: {err}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.stage1_steps < args.steps:
        parser.error(f"--stage1-steps must be >= 0 and below --steps ({args.steps}), got {args.stage1_steps}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for item in args.sets:
        if "=" not in item or item.startswith("-"):
            parser.error(f"--set {item!r} is not KEY=VALUE (e.g. data.init_args.batch_size=16)")

    ensure_data(args.data, args.train, args.val, args.test, args.seed, args.image_size)
    records = read_test_records(args.data / "test")
    kinds = [k for k in TASKS.split(",") if any(r["kind"] == k for r in records.values())]
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    start_all = time.perf_counter()
    checkpoints: dict[Row, Path] = {}
    for row in rows:
        result: dict[str, Any] = {"mode": row.mode, "k": row.k}
        start = time.perf_counter()
        result["load_before"] = os.getloadavg()[0]  # other jobs on the same cores slow every figure
        checkpoint = args.out / row.name / "checkpoints" / "last.ckpt"
        embeddings_path = args.out / row.name / "test_embeddings"
        # embeddings.json is written last: a folder without it is a predict that did not finish.
        if args.reuse and checkpoint.is_file() and (embeddings_path / SUMMARY_FILE).is_file():
            print(f"{row.name}: reusing {checkpoint} and {embeddings_path}")
            result["reused"] = True
        else:
            checkpoint = train_row(row, args.data, args.out, args.steps, args.stage1_steps, args.sets)
            result["train_s"] = time.perf_counter() - start
            embeddings_path = predict_row(row, checkpoint, args.data, args.out, args.sets)
        saved = load_embeddings(embeddings_path)
        result.update(kind_metrics({"keys": saved.keys, "query": saved.query, "target": saved.target}, records))
        result["row_s"] = time.perf_counter() - start
        result["load_after"] = os.getloadavg()[0]
        results.append(result)
        checkpoints[row] = checkpoint
        print(
            f"{row.name}: all R@1 {result['all/recall@1']:.3f}, hard@1 {result['all/hard@1']:.3f}, "
            f"{result['row_s']:.0f} s",
            flush=True,
        )
        # Written after every row, so a long ablation that stops keeps what it measured.
        write_results(args, rows, results, kinds, time.perf_counter() - start_all)
    if checkpoints:
        load = os.getloadavg()[0]
        timed = time_encodes(checkpoints, args.data, args.out, args.sets, args.repeats)
        for result in results:
            row = Row(result["mode"], result["k"])
            if row in timed:
                result.update(timed[row], encode_load=load)
    table = write_results(args, rows, results, kinds, time.perf_counter() - start_all)
    print(table)
    return 0
