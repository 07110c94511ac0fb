"""The strategy overlays (configs/strategy/): they compose with the 2B recipe, FSDP2 fits and resumes on
two CPU processes, and what a strategy cannot run is refused with a message naming it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from test_configs import printed as print_config

from lame_pl import LaMEModule
from lame_pl.sharding import check_evaluation, check_strategy, shard, uniform_submodules

ROOT = Path(__file__).resolve().parents[1]
STRATEGY = ROOT / "configs" / "strategy"
REAL = ROOT / "configs" / "qwen2vl-2b"
LIGHTNING = Path(sys.executable).with_name("lightning")


def printed(capsys, *configs: Path) -> dict:
    """What ``lightning fit --config=... --print_config`` prints, resolved in this process (no interpreter start)."""
    return print_config(capsys, *(f"--config={c}" for c in configs))


def test_the_overlays_compose_with_the_2b_recipe(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])  # LightningCLI warns when both sys.argv and args are given
    fsdp = printed(capsys, REAL / "base.yaml", REAL / "stage2.yaml", STRATEGY / "fsdp.yaml")
    strategy = fsdp["trainer"]["strategy"]
    assert strategy["class_path"].endswith("ModelParallelStrategy")
    assert strategy["init_args"]["tensor_parallel_size"] == 1
    assert strategy["init_args"]["data_parallel_size"] == fsdp["trainer"]["devices"] == 8
    assert strategy["init_args"]["save_distributed_checkpoint"] is False
    model = fsdp["model"]["init_args"]
    assert model["backbone"]["dtype"] == "float32" and model["gradcache_chunk_size"] == 8  # GradCache kept
    zero2 = printed(capsys, REAL / "base.yaml", REAL / "stage2.yaml", STRATEGY / "deepspeed_zero2.yaml")
    assert zero2["trainer"]["strategy"]["init_args"]["stage"] == 2
    assert zero2["model"]["init_args"]["gradcache_chunk_size"] == 8  # GradCache kept
    zero3 = printed(capsys, REAL / "base.yaml", REAL / "stage2.yaml", STRATEGY / "deepspeed_zero3.yaml")
    assert zero3["trainer"]["strategy"]["init_args"]["stage"] == 3
    assert zero3["model"]["init_args"]["gradcache_chunk_size"] == 8
    assert zero3["data"]["init_args"]["val_shards"] is None  # evaluation on several ZeRO-3 ranks is refused
    nodes = printed(capsys, REAL / "base.yaml", REAL / "stage2.yaml", STRATEGY / "multinode.yaml")
    global_batch = (
        nodes["trainer"]["num_nodes"] * nodes["trainer"]["devices"] * nodes["data"]["init_args"]["batch_size"]
    )
    assert global_batch == 1024


def test_gradcache_is_refused_where_it_failed():
    check_strategy(DDPStrategy(), 8)
    check_strategy(FSDPStrategy(), None)
    with pytest.raises(ValueError, match=r"gradcache_chunk_size is set but .* FSDPStrategy \(FSDP1\)"):
        check_strategy(FSDPStrategy(), 8)
    deepspeed = object.__new__(DeepSpeedStrategy)  # constructing one needs deepspeed installed
    deepspeed.config = {"zero_optimization": {"stage": 2}}
    check_strategy(deepspeed, None)
    check_strategy(deepspeed, 8)  # ZeRO-2 takes GradCache (lame_pl.gradcache._backward)
    deepspeed.config = {"zero_optimization": {"stage": 3}}
    check_strategy(deepspeed, None)
    check_strategy(deepspeed, 8)  # ZeRO-3 takes GradCache (tests/test_deepspeed.py)


class _Mesh:
    """The parts of a DeviceMesh that ``shard`` reads before it shards anything."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tensor_parallel: int) -> None:
        self.tensor_parallel = tensor_parallel

    def __getitem__(self, name: str) -> _Mesh:
        return self

    def size(self) -> int:
        return self.tensor_parallel


def test_shard_refuses_tensor_parallelism_and_mixed_dtypes(tiny_spec, tiny_decoder, monkeypatch):
    from dataclasses import replace

    module = LaMEModule(replace(tiny_spec, dtype="bfloat16"), tiny_decoder, num_reason_tokens=2, stage=1)
    monkeypatch.setattr(LaMEModule, "device_mesh", property(lambda self: _Mesh(2)))
    with pytest.raises(ValueError, match="tensor_parallel_size to 1"):
        shard(module)
    monkeypatch.setattr(LaMEModule, "device_mesh", property(lambda self: _Mesh(1)))
    with pytest.raises(ValueError, match=r"one parameter dtype per unit.*torch.bfloat16.*backbone.dtype"):
        shard(module)


def test_fsdp_overlay_fits_with_gradcache_and_resumes_on_two_processes(tmp_path, small_shards):
    shards = small_shards  # two training shards of 16: one a rank
    common = [
        f"--config={ROOT / 'tests' / 'conf' / 'tiny.yaml'}",
        f"--config={STRATEGY / 'fsdp.yaml'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--model.init_args.stage=2",
        "--model.init_args.learnable_temperature=true",
        "--model.init_args.gradcache_chunk_size=2",
        "--data.init_args.batch_size=4",
        f"--data.init_args.train_shards={shards / 'train'}",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
    ]
    fit = subprocess.run(
        [str(LIGHTNING), "fit", *common, "--trainer.max_steps=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)  # one file, as under DDP
    assert state["global_step"] == 2 and state["state_dict"]["log_logit_scale"].shape == (1,)
    resumed = subprocess.run(
        [str(LIGHTNING), "fit", *common, "--trainer.max_steps=3", f"--ckpt_path={last}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3


def test_evaluation_on_several_fsdp2_ranks_is_refused(tiny_spec, monkeypatch):
    """Ranks may hold different numbers of evaluation batches; every FSDP2 forward gathers on all ranks."""
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    check_evaluation(module, "validation")  # no mesh: DDP or one process
    monkeypatch.setattr(LaMEModule, "device_mesh", property(lambda self: _Mesh(1)))
    monkeypatch.setattr("lame_pl.sharding.world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"validation under ModelParallelStrategy \(FSDP2\) on several ranks"):
        check_evaluation(module, "validation")


def test_under_zero3_on_several_ranks_every_pass_runs_the_vision_tower_and_evaluation_is_refused(
    tiny_spec, monkeypatch
):
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    deepspeed = object.__new__(DeepSpeedStrategy)
    deepspeed.config = {"zero_optimization": {"stage": 3}}
    monkeypatch.setattr(LaMEModule, "trainer", property(lambda self: SimpleNamespace(strategy=deepspeed)))
    monkeypatch.setattr(module, "_trainer", object())
    uniform_submodules(module)  # one process: nothing to keep in step
    assert not module.encoder.vision_every_pass
    check_evaluation(module, "test")
    monkeypatch.setattr("lame_pl.sharding.world_size", lambda: 2)
    uniform_submodules(module)
    assert module.encoder.vision_every_pass
    with pytest.raises(ValueError, match=r"test under DeepSpeed ZeRO-3 on several ranks is not supported"):
        check_evaluation(module, "test")
    deepspeed.config = {"zero_optimization": {"stage": 2}}
    uniform_submodules(module)
    assert not module.encoder.vision_every_pass
    check_evaluation(module, "test")


def test_a_checkpoint_with_a_scalar_temperature_loads(tiny_spec):
    """Checkpoints from before the temperature had shape (1,), which FSDP and DeepSpeed need."""
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    state = module.state_dict()
    state["log_logit_scale"] = torch.tensor(2.5)
    module.load_state_dict(state, strict=True)
    assert module.log_logit_scale.shape == (1,) and module.log_logit_scale.item() == 2.5
    assert module.logit_scale.shape == ()


def _calls(encoder, inputs: dict) -> tuple[list[str], torch.Tensor]:
    """Every submodule forward a pass starts, in order (what ZeRO-3 gathers for), and the embedding."""
    seen = []
    handles = [
        m.register_forward_pre_hook(lambda m, a, name=name: seen.append(name)) for name, m in encoder.named_modules()
    ]
    try:
        out = encoder(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out.embedding


@pytest.mark.parametrize("mode", ["lame", "latent_sequential", "discriminative"])
def test_vision_first_runs_the_same_submodules_for_text_image_and_video_and_keeps_the_embedding(
    tiny_spec, processor, mode
):
    """What ZeRO-3 needs of ranks whose rows differ in media (``uniform_submodules``)."""
    from conftest import random_image

    from lame_pl.backbone import build_backbone
    from lame_pl.model import build_encoder
    from lame_pl.prompt import PromptProcessor, Side

    rng = random.Random(3)
    torch.manual_seed(0)
    k = 0 if mode == "discriminative" else 2
    encoder = build_encoder(build_backbone(tiny_spec), num_reason_tokens=k, encode_mode=mode).eval()
    sides = PromptProcessor(processor, 16)
    batches = {
        "text": sides([Side("Find the caption.", "a red circle"), Side("", "two squares")]),
        "image": sides([Side("Represent the image.", "", (random_image(rng),)), Side("", "a text row")]),
        "video": sides([Side("Understand the video.", "", video=[random_image(rng, 28) for _ in range(2)])]),
    }
    sequences = {}
    with torch.no_grad():
        for name, inputs in batches.items():
            plain_calls, plain = _calls(encoder, inputs)
            encoder.vision_every_pass = True
            sequences[name], uniform = _calls(encoder, inputs)
            encoder.vision_every_pass = False
            assert torch.equal(plain, uniform), name
            if name == "text":
                assert not any(".visual" in call for call in plain_calls)
    assert sequences["text"] == sequences["image"] == sequences["video"]
    assert sum(call == "backbone.visual" for call in sequences["text"]) == 2  # an image pass and a video pass
    # The blanks join the graph with weight 0: the tower gets a zero gradient, not none.
    encoder.vision_every_pass = True
    encoder(**batches["text"]).embedding.sum().backward()
    tower = [p.grad for p in encoder.backbone.visual.parameters()]
    assert all(g is not None and not g.any() for g in tower)
