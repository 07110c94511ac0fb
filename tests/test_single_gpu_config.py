"""The single-GPU 2B config (configs/qwen2vl-2b/single_gpu*.yaml) and the memory model that sizes it
(tools/estimate_memory.py: lame_pl/benchmarks/memory_model.py and memory_probe.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_configs import printed

from lame_pl.benchmarks import memory_model as em
from lame_pl.benchmarks.memory_probe import LiveTensorMemory, measure_step

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "configs" / "qwen2vl-2b"

TIERS = {None: (24, 4), "single_gpu_48gb.yaml": (48, 16), "single_gpu_80gb.yaml": (80, 32)}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])


# Each tier once and each stage (a printed config takes ~2 s).
@pytest.mark.parametrize(("tier", "stage"), [(None, 2), ("single_gpu_48gb.yaml", 1), ("single_gpu_80gb.yaml", 2)])
def test_single_gpu_config_holds_the_promised_settings(tier, stage, capsys):
    configs = [REAL / "base.yaml", REAL / f"stage{stage}.yaml", REAL / "single_gpu.yaml"]
    configs += [REAL / tier] if tier else []
    config = printed(capsys, *(f"--config={path}" for path in configs))
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert (trainer["devices"], trainer["strategy"], trainer["precision"]) == (1, "auto", "bf16-mixed")
    assert model["gradient_checkpointing"] is True and model["backbone"]["dtype"] == "bfloat16"
    lora = model["stage2"]["lora"]
    assert lora["use_dora"] and lora["r"] == 16  # stage 2 adapts the language model, never in full
    chunk, batch = model["gradcache_chunk_size"], data["batch_size"]
    assert (chunk, batch) == (TIERS[tier][1], 1024) and batch % chunk == 0  # the 8-GPU recipe's global batch
    assert model["stage"] == stage and trainer["max_steps"] == (2000 if stage == 1 else 5000)


@pytest.mark.parametrize("tier", list(TIERS))
def test_each_tier_runs_the_largest_chunk_the_memory_model_fits_in_stage_2(tier):
    gb, chunk = TIERS[tier]
    assert em.largest_chunk(em.Shapes(), 2, seq=1536, image_tokens=1280, capacity=gb * 1e9) == chunk
    # and stage 1 (one side, no target graph) fits it too
    assert em.estimate(em.Shapes(), 1, chunk, 1536, 1280)["card"] <= gb * 1e9


def test_the_estimate_against_a_hand_computed_case():
    shapes = em.Shapes(
        hidden=10,
        intermediate=20,
        layers=3,
        vision_embed=4,
        merge=2,
        decoder_hidden=8,
        decoder_intermediate=16,
        decoder_layers=2,
        vocab=100,
        backbone_params=1000,
        decoder_params=200,
        lora_params=30,
        extra_params=5,
        projector_params=7,
        backbone_bytes=2,
        reason_tokens=2,
        label_tokens=4,
    )
    k = {"a": 1.0, "b": 2.0, "c": 3.0, "f": 0.5}
    got = em.estimate(shapes, stage=2, chunk=2, seq=6, image_tokens=1, coefficients=k)
    trained = 200 + 7 + 30 + 5  # decoder, projector, adapters, LaME's own (stage 2)
    n = 2 * 6
    expected = {
        "backbone_weights": 2000,
        "trained_weights_grads_adamw": 16 * trained,
        "autocast_cache": 2 * trained,
        "checkpointed_layer_inputs": 2 * 3 * n * 10 * 2,
        "final_norm_and_output": 2 * n * 10 * 10,
        "one_layer_recompute": n * (10 + 40 + 3) + 0.5 * 200,
        "decoder_logits": 2 * 4 * 100 * 16,
        "decoder_layers": 2 * 6 * 8 * 2 * 2 + 2 * 6 * (8 + 32),
        "vision_forward": 2 * 1 * 4 * 4 * 28,
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    static = 2000 + 16 * trained
    graphs = 1440 + 2400 + 12800 + 864
    assert got["backward_phase"] == pytest.approx(static + 2 * trained + graphs + 736)
    assert got["peak"] == max(got["backward_phase"], got["vision_phase"], got["optimiser_phase"])
    assert got["card"] == pytest.approx(got["peak"] * 1.15 + 2**30)
    # stage 1: only the decoder side trains, and one side keeps a graph
    one = em.estimate(shapes, stage=1, chunk=2, seq=6, image_tokens=1, coefficients=k)
    assert one["trained_weights_grads_adamw"] == 16 * (200 + 7 + 2 * 10)
    assert one["checkpointed_layer_inputs"] == got["checkpointed_layer_inputs"] / 2
    with pytest.raises(ValueError, match="stage must be 1 or 2, got 3"):
        em.estimate(shapes, stage=3, chunk=2, seq=6, image_tokens=1)


@pytest.mark.slow
def test_the_default_shapes_are_the_2b_recipes_built_through_the_project():
    """Parameter counts of the 2B shapes, built on the meta device with the recipe's DoRA (~6 s)."""
    assert em.shapes_of("qwen2vl-2b-shape", "qwen3-0.6b-shape", 3584, 8, 32) == em.Shapes()


def test_shapes_of_counts_what_the_module_holds():
    """The fast variant: the tiny presets' counts equal a built module's (stage 2 adds the adapters)."""
    from lame_pl import BackboneSpec, DecoderSpec, LaMEModule, LoraSpec, Stage2Spec

    shapes = em.shapes_of("tiny", "tiny", 16, 2, 32)
    module = LaMEModule(
        BackboneSpec(preset="tiny"),
        DecoderSpec(preset="tiny"),
        num_reason_tokens=2,
        embed_dim=16,
        stage=2,
        stage2=Stage2Spec(lora=LoraSpec()),
    )
    backbone = sum(p.numel() for n, p in module.encoder.backbone.named_parameters() if "lora_" not in n)
    assert (shapes.backbone_params, shapes.decoder_params) == (
        backbone,
        sum(p.numel() for p in module.decoder.language_model.parameters()),
    )
    assert shapes.lora_params == sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert shapes.projector_params == sum(p.numel() for p in module.decoder.projector.parameters())
    assert em.trained_params(shapes, 2) == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_the_tracker_counts_live_storages_and_their_peak():
    with LiveTensorMemory() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        view = a[:10]  # no new storage
        del b
        c = torch.ones(250)  # 1000 bytes
    assert tracker.peak == 8000 and tracker.live == 5000
    del a, view, c
    assert tracker.live == 0


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the memory model overestimates the tiny preset's step 2.0x (chunk 2) and "
    "4.3x (chunk 4), measured since this test was written (commit d2f524f): at this size costs the "
    "model does not count dominate (docs/results.md, the single-GPU memory model)",
)
def test_the_model_predicts_a_measured_step_at_tiny_size():
    """The real GradCache step (stage 2, DoRA, checkpointing, bf16 autocast) on the tiny preset."""
    shapes = em.shapes_of("tiny", "tiny", None, 2, 32)
    ratios = []
    for chunk in (2, 4):
        got = measure_step("tiny", "tiny", 2, chunk, 8, 56, 4, reason_tokens=2)
        model = em.estimate(shapes, 2, chunk, got["seq"], got["image_tokens"])
        before = shapes.backbone_params * 2 + 12 * em.trained_params(shapes, 2)
        ratios.append((model["peak"] - before) / got["peak_bytes"])
    assert all(0.5 < r < 2.0 for r in ratios), ratios
