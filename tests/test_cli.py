"""The real command line: fit for both stage configs, stage switching, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_synthetic_shards

from lame_pl.cli import build_cli
from lame_pl.init_from import load_init_weights

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"
LIGHTNING = Path(sys.executable).with_name("lightning")


@pytest.fixture(scope="module")
def shards(module_tmp) -> Path:
    out = make_synthetic_shards(module_tmp("shards"), 48, 8, 8)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "decoder_vocab.py"),
            str(out / "train"),
            str(out / "val"),
            str(out / "test"),
            "--out",
            str(out / "vocab.json"),
        ],
        check=True,
        capture_output=True,
    )
    return out


def data_args(shards: Path) -> list[str]:
    return [f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")]


def run_args(tmp: Path, name: str) -> list[str]:
    """A TensorBoard logger with a pinned version and a checkpoint callback that keeps last.ckpt."""
    return [
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp}",
        "--trainer.logger.name=",
        f"--trainer.logger.version={name}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp / name / 'checkpoints'}",
        "--trainer.callbacks.save_last=true",
    ]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both sys.argv and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


def fit(*args: str):
    return build_cli(["fit", f"--config={CONF}", *args])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_demo_configs_fit_through_the_console_script(stage, shards, tmp_path):
    """`lightning fit --config configs/demo/base.yaml --config configs/demo/stageN.yaml`, fast_dev_run."""
    demo = ROOT / "configs" / "demo"
    cmd = [
        str(LIGHTNING),
        "fit",
        f"--config={demo / 'base.yaml'}",
        f"--config={demo / f'{stage}.yaml'}",
        *data_args(shards),
        f"--model.init_args.decoder.vocab_file={shards / 'vocab.json'}",
        "--model.init_args.init_from=null",
        "--trainer.fast_dev_run=2",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--trainer.callbacks=[]",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run" in result.stderr + result.stdout


def test_python_dash_m_entry_prints_help():
    result = subprocess.run([sys.executable, "-m", "lame_pl", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fit" in result.stdout and "predict" in result.stdout


def test_resume_continues_global_step_and_tensorboard_run(shards, tmp_path, monkeypatch):
    first = fit(*data_args(shards), *run_args(tmp_path, "run"), "--trainer.max_steps=2")
    assert first.trainer.global_step == 2
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    monkeypatch.chdir(tmp_path)  # `--ckpt_path last` finds last.ckpt through the checkpoint callback's dirpath
    second = fit(*data_args(shards), *run_args(tmp_path, "run"), "--trainer.max_steps=4", "--ckpt_path=last")
    assert second.trainer.global_step == 4
    assert second.trainer.logger.log_dir == first.trainer.logger.log_dir == str(tmp_path / "run")
    # Both runs wrote into the same TensorBoard folder, and no second version was created.
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) >= 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]


def test_gradcache_fits_logs_the_plain_steps_losses_and_resumes(shards, tmp_path, monkeypatch):
    """`--model.init_args.gradcache_chunk_size 4` with a batch of 16: the same train/loss/* names, and a resume."""
    stage2 = [*data_args(shards), "--model.init_args.stage=2", "--data.init_args.batch_size=16"]
    chunks = ["--model.init_args.gradcache_chunk_size=4"]
    first = fit(*stage2, *chunks, *run_args(tmp_path, "gc"), "--trainer.max_steps=2")
    plain = fit(*stage2, *run_args(tmp_path, "plain"), "--trainer.max_steps=1")
    losses = {name for name in first.trainer.logged_metrics if name.startswith("train/loss")}
    assert losses == {name for name in plain.trainer.logged_metrics if name.startswith("train/loss")}
    assert {"train/loss", "train/loss/contrastive", "train/loss/decoder"} <= losses
    monkeypatch.chdir(tmp_path)
    second = fit(*stage2, *chunks, *run_args(tmp_path, "gc"), "--trainer.max_steps=3", "--ckpt_path=last")
    assert second.trainer.global_step == 3 and second.model.hparams.gradcache_chunk_size == 4
    assert torch.isfinite(second.trainer.logged_metrics["train/loss"])


def test_stage2_initialised_from_stage1_checkpoint(shards, tmp_path):
    first = fit(*data_args(shards), *run_args(tmp_path, "s1"), "--trainer.max_steps=2")
    ckpt = tmp_path / "s1" / "checkpoints" / "last.ckpt"
    trained = first.model.encoder.reason_embeddings.detach().clone()
    stage2 = [
        *data_args(shards),
        *run_args(tmp_path, "s2"),
        "--model.init_args.stage=2",
        f"--model.init_args.init_from={ckpt}",
    ]
    second = build_cli(["fit", f"--config={CONF}", *stage2, "--trainer.max_steps=0"])
    model = second.model
    assert model.stage == 2 and second.trainer.global_step == 0
    assert torch.equal(model.encoder.reason_embeddings.detach(), trained)
    assert all(p.requires_grad for p in model.encoder.backbone.language_model.parameters())
    assert not any(p.requires_grad for p in model.encoder.backbone.visual.parameters())
    # Once stage 2 has its own checkpoint, testing it does not need stage 1's any more.
    build_cli(["fit", f"--config={CONF}", *stage2, "--trainer.max_steps=1"])
    ckpt.unlink()
    build_cli(["test", f"--config={CONF}", *stage2, f"--ckpt_path={tmp_path / 's2' / 'checkpoints' / 'last.ckpt'}"])


def test_stage_switch_callback_switches_saves_and_resumes_in_stage2(shards, tmp_path, monkeypatch):
    switch = ["--trainer.callbacks+=callbacks.StageSwitch", "--trainer.callbacks.at_step=2"]
    cli = fit(*data_args(shards), *run_args(tmp_path, "sw"), *switch, "--trainer.max_steps=3")
    model = cli.model
    assert model.stage == 2
    # The optimiser was rebuilt over stage 2's trainable set: the language model is in it.
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in model.encoder.backbone.language_model.parameters())
    checkpoint = torch.load(tmp_path / "sw" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lame_stage"] == 2
    monkeypatch.chdir(tmp_path)
    resumed = fit(*data_args(shards), *run_args(tmp_path, "sw"), *switch, "--trainer.max_steps=4", "--ckpt_path=last")
    assert resumed.model.stage == 2 and resumed.trainer.global_step == 4


def test_test_writes_retrieval_metrics_beside_chance(shards, tmp_path):
    out = tmp_path / "metrics.json"
    build_cli(
        [
            "test",
            f"--config={CONF}",
            *data_args(shards),
            "--model.init_args.stage=2",
            "--trainer.callbacks+=callbacks.MetricsFile",
            f"--trainer.callbacks.path={out}",
        ]
    )
    metrics = json.loads(out.read_text())
    assert metrics["test/num_candidates"] == 8
    assert metrics["chance/recall@1"] == pytest.approx(1 / 8)
    assert 0.0 <= metrics["test/recall@1"] <= metrics["test/recall@5"] <= 1.0


def test_test_runs_a_checkpoint_from_another_directory(shards, tmp_path, monkeypatch):
    """The run's relative decoder.vocab_file is not where `lightning test` runs: the ids come with the weights."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.json").write_bytes((shards / "vocab.json").read_bytes())
    monkeypatch.chdir(run)
    fit(
        *data_args(shards),
        *run_args(run, "v"),
        "--model.init_args.decoder.vocab_file=vocab.json",
        "--trainer.max_steps=1",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "metrics.json"
    build_cli(
        [
            "test",
            f"--config={CONF}",
            *data_args(shards),
            f"--ckpt_path={run / 'v' / 'checkpoints' / 'last.ckpt'}",
            "--trainer.callbacks+=callbacks.MetricsFile",
            f"--trainer.callbacks.path={out}",
        ]
    )
    assert json.loads(out.read_text())["test/num_candidates"] == 8


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--model.init_args.backbone.path=/no/such/backbone", "backbone.path '/no/such/backbone' is not a directory"),
        ("--model.init_args.num_reason_tokens=-1", "num_reason_tokens must be an integer >= 0, got -1"),
        ("--model.init_args.stage=3", "model.stage must be 1 or 2, got 3"),
        ("--data.init_args.train_shards=/no/such/shard-{000..009}.tar", "matches no shard file"),
    ],
)
def test_bad_input_fails_with_a_message_naming_it(flag, message, shards, tmp_path):
    args = [*data_args(shards), flag]
    with pytest.raises(SystemExit) as error:
        fit(*args)
    text = str(error.value.code)
    assert text.startswith("error: ") and message in text
    assert "Namespace(" not in text  # one message, not a dump of the config


def test_predict_writes_keyed_embeddings(shards, tmp_path):
    from lame_pl.embeddings_folder import load_embeddings

    out = tmp_path / "embeddings"
    build_cli(
        [
            "predict",
            f"--config={CONF}",
            *data_args(shards),
            "--trainer.callbacks+=callbacks.EmbeddingWriter",
            f"--trainer.callbacks.path={out}",
        ]
    )
    saved = load_embeddings(out)
    assert len(saved.keys) == len(set(saved.keys)) == 8 and all(saved.texts)
    assert saved.query.shape == saved.target.shape and saved.query.shape[0] == 8
    assert torch.allclose(saved.query.norm(dim=-1), torch.ones(8), atol=1e-4)


def test_validate_writes_whole_split_retrieval_metrics(shards, tmp_path):
    out = tmp_path / "val.json"
    build_cli(
        [
            "validate",
            f"--config={CONF}",
            *data_args(shards),
            "--model.init_args.stage=2",
            "--trainer.callbacks+=callbacks.MetricsFile",
            f"--trainer.callbacks.path={out}",
        ]
    )
    metrics = json.loads(out.read_text())
    assert {
        "val/recall@1",
        "val/recall@5",
        "val/recall@10",
        "val/mrr",
        "val/loss/contrastive",
        "val/loss/decoder",
    } <= set(metrics)


@pytest.mark.parametrize("spec", ["{lora: {r: 16}}", "{train_language_model: true}"])
def test_a_partial_stage2_spec_keeps_stage2s_loss_weights(spec, shards, tmp_path, capsys):
    """tests/conf/tiny.yaml has no stage2 block: the flag's spec merges over stage 2's defaults."""
    import yaml

    with pytest.raises(SystemExit) as done:
        fit(f"--model.init_args.stage2={spec}", "--print_config")
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["stage2"]["contrastive_loss_weight"] == 1.0 and printed["stage2"]["train_language_model"] is True
    assert printed["stage1"]["contrastive_loss_weight"] == 0.0  # shown too, not null
    cli = fit(
        *data_args(shards),
        f"--model.init_args.stage2={spec}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=0",
    )
    stage2 = cli.model.stages[2]
    assert stage2.contrastive_loss_weight == 1.0 and stage2.decoder_loss_weight == 1.0 and stage2.train_language_model
    assert (stage2.lora is not None) == ("lora" in spec)


def test_lora_on_a_frozen_language_model_is_refused_naming_the_stage(shards):
    with pytest.raises(SystemExit) as error:
        fit(*data_args(shards), "--model.init_args.stage2={lora: {r: 16}, train_language_model: false}")
    text = str(error.value.code)
    assert text.startswith("error: model.stage2 sets lora but train_language_model is false")
    assert "Namespace(" not in text and "Subtypes" not in text


def test_a_checkpoint_from_fit_loads_through_init_from_with_weights_only(shards, tmp_path):
    """init_from reads with torch.load(weights_only=True): a checkpoint of this project must pass."""
    first = fit(
        *data_args(shards), *run_args(tmp_path, "w"), "--model.init_args.stage2={lora: {r: 2}}", "--trainer.max_steps=1"
    )
    ckpt = tmp_path / "w" / "checkpoints" / "last.ckpt"
    torch.load(ckpt, weights_only=True)  # the whole file, hyper-parameters included
    second = fit(
        *data_args(shards),
        f"--model.init_args.init_from={ckpt}",
        "--trainer.max_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert torch.equal(second.model.encoder.reason_embeddings, first.model.encoder.reason_embeddings)


def test_init_from_refuses_a_file_that_would_run_code(tmp_path, tiny_spec):
    """torch.load(weights_only=True): a pickled object of an unlisted class is refused, not built."""
    import pickle

    from lame_pl import LaMEModule
    from lame_pl.checkpoint import CheckpointError

    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": module.state_dict(), "extra": Path("anything")}, path)
    with pytest.raises(CheckpointError, match="holds objects that a weights-only load refuses") as caught:
        load_init_weights(module, str(path))
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
