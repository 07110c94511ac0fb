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
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lame_pl.data.shard_writer import MANIFEST
from lame_pl.decoder_vocab import write_decoder_vocab
from lame_pl.index import SUMMARY_FILE, load_embeddings
from lame_pl.retrieval import chance_metrics, ranks_in_block, retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "ablation" / "train.yaml"
WARMUP_CONFIG = ROOT / "configs" / "ablation" / "warmup.yaml"
MODES = ("discriminative", "lame", "latent_sequential", "explicit_cot")
DEFAULT_ROWS = "discriminative:0,lame:1,lame:4,lame:8,lame:16,latent_sequential:8"
TASKS = "caption,count,relation,binding"
KS = (1, 5)


@dataclass(frozen=True)
class Row:
    """One line of the table: an encode mode and its number of reason tokens (or latent steps)."""

    mode: str
    k: int

    @property
    def name(self) -> str:
        """The row's folder name, e.g. ``lame-k8``."""
        return f"{self.mode}-k{self.k}"


def parse_rows(text: str) -> list[Row]:
    """``"discriminative:0,lame:8"`` -> rows.

    Raises:
        ValueError: For an item that is not ``mode:K``, an unknown mode, a negative K, K>0 with
            ``discriminative``, K=0 with another mode, or a repeated row; the message names it.
    """
    rows = []
    for item in (part.strip() for part in text.split(",")):
        mode, sep, k_text = item.partition(":")
        if not sep or not k_text.strip().lstrip("-").isdigit():
            raise ValueError(f"row {item!r} is not MODE:K (e.g. lame:8)")
        k = int(k_text)
        if mode not in MODES:
            raise ValueError(f"row {item!r}: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if k < 0 or (mode == "discriminative") != (k == 0):
            raise ValueError(f"row {item!r}: discriminative takes K=0 and every other mode K>0")
        row = Row(mode, k)
        if row in rows:
            raise ValueError(f"row {item!r} is given twice")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- data


def ensure_data(data: Path, train: int, val: int, test: int, seed: int, image_size: int) -> None:
    """Writes the compositional shards and the decoder vocabulary unless ``data`` holds this very set."""
    wanted = {"tasks": TASKS.split(","), "seed": seed, "image_size": image_size}
    sizes = {"train": train, "val": val, "test": test}
    manifests = {split: data / split / MANIFEST for split in sizes}
    if all(m.is_file() for m in manifests.values()) and (data / "decoder_vocab.json").is_file():
        found = {split: json.loads(m.read_text()) for split, m in manifests.items()}
        if all(all(found[s].get(k) == v for k, v in wanted.items()) and found[s].get("num_samples") == n
               for s, n in sizes.items()):
            print(f"data: reusing {data}")
            return
    # The shards are written by the documented command line, as a user writes them.
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "synthetic", "--tasks", TASKS,
                    "--out", str(data), "--overwrite", "--train", str(train), "--val", str(val), "--test", str(test),
                    "--seed", str(seed), "--image-size", str(image_size),
                    "--samples-per-shard", "48"], check=True)  # 48: batches of 32 straddle shards, so they vary by epoch
    ids = write_decoder_vocab([data / s for s in sizes], data / "decoder_vocab.json")
    print(f"{len(ids)} token ids -> {data / 'decoder_vocab.json'}")


def read_test_records(test_dir: Path) -> dict[str, dict[str, Any]]:
    """``{key: {"kind", "group", "member", "candidates", "text"}}`` for every sample of the test shards.

    Raises:
        ValueError: When there is no shard, or a sample lacks its tags (not a ``--tasks`` set).
    """
    import webdataset as wds

    urls = sorted(str(p) for p in test_dir.glob("*.tar"))
    if not urls:
        raise ValueError(f"{test_dir} holds no .tar shard")
    records = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample.get("json", b"{}"))
        missing = [f for f in ("kind", "group", "member", "candidates") if f not in meta]
        if missing or "txt" not in sample:
            raise ValueError(f"{test_dir}: sample {sample['__key__']!r} lacks {missing or ['txt']}; "
                             "write the set with make_shards.py synthetic --tasks")
        records[sample["__key__"]] = {**{f: meta[f] for f in ("kind", "group", "member", "candidates")},
                                      "text": sample["txt"].decode("utf-8").strip()}
    return records


# ------------------------------------------------------------------------------------- scoring


def kind_metrics(embeddings: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per-kind and overall recall from predicted test embeddings, with chance beside each.

    Args:
        embeddings: What ``callbacks.EmbeddingWriter`` saves: ``keys``, ``query`` and ``target``.
        records: :func:`read_test_records` of the same split.

    Returns:
        ``{"<kind>/recall@k", "<kind>/hard@1", "<kind>/queries", "<kind>/candidates",
        "chance/<kind>/recall@k", "chance/<kind>/hard@1"}`` for each kind, and the same under
        ``all/`` (means over every query).

    Raises:
        ValueError: When a key has no record, or a group's statement has no embedding.
    """
    keys, query, target = embeddings["keys"], embeddings["query"].float(), embeddings["target"].float()
    unknown = [k for k in keys if k not in records]
    if unknown:
        raise ValueError(f"{len(unknown)} embedded keys are not in the test shards, e.g. {unknown[:3]}")
    # Equal statements get equal embeddings; each distinct statement is one candidate.
    text_row: dict[str, int] = {}
    for i, key in enumerate(keys):
        text_row.setdefault(records[key]["text"], i)
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    kinds = sorted({records[k]["kind"] for k in keys})
    for kind in kinds:
        rows = [i for i, k in enumerate(keys) if records[k]["kind"] == kind]
        texts = sorted({records[keys[i]]["text"] for i in rows})
        cand = target[[text_row[t] for t in texts]]
        gold = torch.tensor([texts.index(records[keys[i]]["text"]) for i in rows])
        q = query[rows]
        metrics = retrieval_metrics(q, cand, gold, ks=KS)
        chance = chance_metrics(len(texts), ks=KS)
        groups = [records[keys[i]]["candidates"] for i in rows]
        missing = sorted({t for g in groups for t in g if t not in text_row})
        if missing:
            raise ValueError(f"{kind}: statements of a contrast group have no test embedding, e.g. {missing[:3]}")
        size = len(groups[0])
        group_emb = target[torch.tensor([[text_row[t] for t in g] for g in groups])]  # (Q, G, D)
        hard_sim = torch.einsum("qd,qgd->qg", q, group_emb)
        hard_gold = torch.tensor([records[keys[i]]["member"] for i in rows])
        # Each query ranks its own group; a tie counts against it.
        beaten = ranks_in_block(hard_sim, hard_gold)
        hard = float((beaten == 0).float().mean())
        values = {**{f"recall@{k}": metrics[f"recall@{k}"] for k in KS}, "hard@1": hard}
        chances = {**{f"recall@{k}": chance[f"recall@{k}"] for k in KS}, "hard@1": 1.0 / size}
        for name, value in values.items():
            out[f"{kind}/{name}"] = value
            out[f"chance/{kind}/{name}"] = chances[name]
            totals[name] = totals.get(name, 0.0) + value * len(rows)
            totals[f"chance/{name}"] = totals.get(f"chance/{name}", 0.0) + chances[name] * len(rows)
        out[f"{kind}/queries"] = float(len(rows))
        out[f"{kind}/candidates"] = float(len(texts))
    for name, value in totals.items():
        prefix, _, metric = name.rpartition("/")
        out[f"chance/all/{metric}" if prefix else f"all/{name}"] = value / len(keys)
    out["all/queries"] = float(len(keys))
    return out


# ------------------------------------------------------------------------------------- runs


def cli_args(row: Row, data: Path, out: Path, steps: int, sets: list[str],
             version: str | None = None) -> list[str]:
    """The config and overrides shared by every command of one row (fit, predict, timing).

    ``sets`` come before the row's own values, so that they can never undo the row's mode.
    """
    args = [f"--config={CONFIG}"]
    args += [f"--data.init_args.{split}_shards={data / split}" for split in ("train", "val", "test")]
    args += [f"--trainer.max_steps={steps}", f"--trainer.logger.init_args.save_dir={out}",
             f"--trainer.logger.init_args.version={version or row.name}"]
    args += [f"--{item}" for item in sets]
    args.append(f"--model.init_args.num_reason_tokens={row.k}")
    args.append(f"--model.init_args.encode_mode={row.mode}")
    if row.k == 0:
        args.append("--model.init_args.decoder=null")  # the decoder reads reason states; K=0 has none
    else:
        args.append(f"--model.init_args.decoder.vocab_file={data / 'decoder_vocab.json'}")
    return args


def _checkpoint_args(dirpath: Path) -> list[str]:
    # Each row trains from scratch: a rerun into the same --out replaces its checkpoints
    # (lame_pl.cli refuses a fresh fit into a checkpoint folder that holds some, unless told so).
    return ["--start_over=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={dirpath}", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=0"]


def run_cli(args: list[str]) -> None:
    """One ``lightning`` command, in this process (the project's LightningCLI)."""
    from lame_pl.cli import build_cli

    print("lightning " + " ".join(args), flush=True)
    build_cli(args)


def train_row(row: Row, data: Path, out: Path, steps: int, stage1_steps: int, sets: list[str]) -> Path:
    """Fits one row (optionally stage 1 first) and returns its last checkpoint."""
    run_dir = out / row.name
    stage2_args = cli_args(row, data, out, steps, sets)
    if stage1_steps and row.k > 0:
        warm = cli_args(row, data, out, stage1_steps, sets, version=f"{row.name}-stage1")
        warm.insert(1, f"--config={WARMUP_CONFIG}")
        run_cli(["fit", *warm, *_checkpoint_args(run_dir / "stage1")])
        stage2_args = cli_args(row, data, out, steps - stage1_steps, sets)
        stage2_args.append(f"--model.init_args.init_from={run_dir / 'stage1' / 'last.ckpt'}")
    run_cli(["fit", *stage2_args, *_checkpoint_args(run_dir / "checkpoints")])
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{row.name}: training wrote no {checkpoint}")
    return checkpoint


def predict_row(row: Row, checkpoint: Path, data: Path, out: Path, sets: list[str]) -> Path:
    """``lightning predict`` over the test split; returns the embeddings folder (``lame_pl.index``)."""
    path = out / row.name / "test_embeddings"
    run_cli(["predict", *cli_args(row, data, out, 1, sets), f"--ckpt_path={checkpoint}",
             "--trainer.callbacks+=callbacks.EmbeddingWriter", f"--trainer.callbacks.path={path}"])
    return path


def _row_model(row: Row, checkpoint: Path, data: Path, out: Path, sets: list[str]) -> tuple:
    """The row's module (built from its config, weights from ``checkpoint``, in eval mode) and datamodule."""
    from lightning import LightningDataModule, LightningModule

    from lame_pl.cli import LaMECLI

    args = [a for a in cli_args(row, data, out, 1, sets) if not a.startswith("--trainer.logger")]
    cli = LaMECLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  args=[*args, "--trainer.logger=false"], run=False)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cli.model.load_state_dict(saved["state_dict"])
    return cli.model.eval(), cli.datamodule, int(saved["global_step"])


def time_encodes(checkpoints: dict[Row, Path], data: Path, out: Path, sets: list[str],
                 repeats: int) -> dict[Row, dict[str, float]]:
    """Median query-side encode time of one fixed batch, ms per sample, and the steps trained, for each row.

    The batch is the first test batch, read once and given to every row. The rows are timed in
    turn, one call each per round, so a change in the machine's load during the measurement falls
    on every row alike.
    """
    models, steps = {}, {}
    query = None
    for row, checkpoint in checkpoints.items():
        models[row], datamodule, steps[row] = _row_model(row, checkpoint, data, out, sets)
        if query is None:
            datamodule.num_workers = 0  # the batch is read once, here; a worker process would only cost a start
            query = next(iter(datamodule.test_dataloader()))["query"]
    assert query is not None
    size = int(query["input_ids"].shape[0])
    times: dict[Row, list[float]] = {row: [] for row in models}
    with torch.inference_mode():
        for model in models.values():
            model.encode(query)  # warm-up: first-call allocations and kernel selection
        for _ in range(repeats):
            for row, model in models.items():
                start = time.perf_counter()
                model.encode(query)
                times[row].append(time.perf_counter() - start)
    return {row: {"encode_ms_per_sample": 1000 * statistics.median(t) / size, "encode_batch": float(size),
                  "encode_repeats": float(repeats), "trained_steps": float(steps[row])} for row, t in times.items()}


# ------------------------------------------------------------------------------------- report


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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"MODE:K items, comma-separated (default {DEFAULT_ROWS})")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per row (default 300)")
    parser.add_argument("--stage1-steps", type=int, default=0,
                        help="of --steps, how many a K>0 row spends in a decoder-only warm-up (default 0)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "ablation", help="compositional shards")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation", help="runs and results")
    parser.add_argument("--train", type=int, default=8000, help="training samples to write (default 8000)")
    parser.add_argument("--val", type=int, default=64, help="validation samples to write (default 64)")
    parser.add_argument("--test", type=int, default=1024, help="test samples to write (default 1024)")
    parser.add_argument("--image-size", type=int, default=112, help="image side (default 112, as the config)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--repeats", type=int, default=10, help="timed encode calls per row (default 10)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip training and prediction for rows whose last.ckpt and test_embeddings/ are in "
                             "--out (scores and encode times are always computed afresh)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for training and timing (default: torch's choice); on a shared "
                             "machine 1 avoids the stalls of oversubscribed thread pools")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra CLI override for every command, e.g. data.init_args.batch_size=16 (repeatable)")
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
        print(f"{row.name}: all R@1 {result['all/recall@1']:.3f}, hard@1 {result['all/hard@1']:.3f}, "
              f"{result['row_s']:.0f} s", flush=True)
        # Written after every row, so a long ablation that stops keeps what it measured.
        _write(args, rows, results, kinds, time.perf_counter() - start_all)
    if checkpoints:
        load = os.getloadavg()[0]
        timed = time_encodes(checkpoints, args.data, args.out, args.sets, args.repeats)
        for result in results:
            row = Row(result["mode"], result["k"])
            if row in timed:
                result.update(timed[row], encode_load=load)
    table = _write(args, rows, results, kinds, time.perf_counter() - start_all)
    print(table)
    return 0


def _write(args: argparse.Namespace, rows: list[Row], results: list[dict[str, Any]], kinds: list[str],
           elapsed: float) -> str:
    table = format_table(results, kinds)
    setup = {"steps": args.steps, "stage1_steps": args.stage1_steps, "data": str(args.data), "train": args.train,
             "test": args.test, "seed": args.seed, "config": str(CONFIG.relative_to(ROOT)), "sets": args.sets,
             "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "elapsed_s": elapsed, "rows": [r.name for r in rows]}
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=1) + "\n")
    trained = sorted({int(r["trained_steps"]) for r in results if "trained_steps" in r})
    note = ("Cells: R@1 / R@5 over every distinct statement of the kind / hard@1 within the contrast group. "
            f"Stage-2 steps per row: {', '.join(map(str, trained)) or 'see results.json'}"
            f"{f' (after {args.stage1_steps} decoder-only steps for K>0)' if args.stage1_steps else ''}; "
            f"encode ms/sample at batch {int(results[0].get('encode_batch', 0)) if results else 0}, "
            f"{torch.get_num_threads()} torch thread(s); this run: {elapsed / 60:.1f} min.")
    (args.out / "results.md").write_text(table + "\n\n" + note + "\n")
    return table + "\n" + note


if __name__ == "__main__":
    sys.exit(main())
