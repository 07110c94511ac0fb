"""One row's runs through the project's command line: fit (optionally stage 1 first), predict, and timed encodes."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lame_pl.ablation.spec import CONFIG, WARMUP_CONFIG, Row


def cli_args(row: Row, data: Path, out: Path, steps: int, sets: list[str], version: str | None = None) -> list[str]:
    """The config and overrides shared by every command of one row (fit, predict, timing).

    ``sets`` come before the row's own values, so that they can never undo the row's mode.
    """
    args = [f"--config={CONFIG}"]
    args += [f"--data.init_args.{split}_shards={data / split}" for split in ("train", "val", "test")]
    args += [
        f"--trainer.max_steps={steps}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.version={version or row.name}",
    ]
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
    return [
        "--start_over=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={dirpath}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
    ]


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
    """``lightning predict`` over the test split; returns the embeddings folder (``lame_pl.embeddings_folder``)."""
    path = out / row.name / "test_embeddings"
    run_cli(
        [
            "predict",
            *cli_args(row, data, out, 1, sets),
            f"--ckpt_path={checkpoint}",
            "--trainer.callbacks+=callbacks.EmbeddingWriter",
            f"--trainer.callbacks.path={path}",
        ]
    )
    return path


def _row_model(row: Row, checkpoint: Path, data: Path, out: Path, sets: list[str]) -> tuple:
    """The row's module (built from its config, weights from ``checkpoint``, in eval mode) and datamodule."""
    from lightning import LightningDataModule, LightningModule

    from lame_pl.cli import LaMECLI

    args = [a for a in cli_args(row, data, out, 1, sets) if not a.startswith("--trainer.logger")]
    cli = LaMECLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[*args, "--trainer.logger=false"],
        run=False,
    )
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cli.model.load_state_dict(saved["state_dict"])
    return cli.model.eval(), cli.datamodule, int(saved["global_step"])


def time_encodes(
    checkpoints: dict[Row, Path], data: Path, out: Path, sets: list[str], repeats: int
) -> dict[Row, dict[str, float]]:
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
    return {
        row: {
            "encode_ms_per_sample": 1000 * statistics.median(t) / size,
            "encode_batch": float(size),
            "encode_repeats": float(repeats),
            "trained_steps": float(steps[row]),
        }
        for row, t in times.items()
    }
