"""Weight dtypes: presets honour them, bf16 trains under bf16-mixed, InfoNCE stays in float32, adapters in float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lame_pl import BackboneSpec, DecoderSpec, LaMEModule, LoraSpec
from lame_pl.backbone import build_backbone
from lame_pl.cli import build_cli
from lame_pl.stages import Stage2Spec

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "tiny.yaml"


def tiny(dtype: str) -> BackboneSpec:
    return BackboneSpec(preset="tiny", min_pixels=56 * 56, max_pixels=56 * 56, dtype=dtype)


def test_presets_build_in_their_dtype():
    assert {p.dtype for p in build_backbone(tiny("bfloat16")).parameters()} == {torch.bfloat16}
    module = LaMEModule(
        tiny("bfloat16"), DecoderSpec(preset="tiny", dtype="bfloat16"), num_reason_tokens=2, embed_dim=16
    )
    assert {p.dtype for p in module.decoder.language_model.parameters()} == {torch.bfloat16}
    # What LaME adds stays in float32: small, and trained from scratch.
    added = [
        module.encoder.reason_embeddings,
        module.encoder.embed_embedding,
        module.log_logit_scale,
        *module.encoder.projection.parameters(),
        *module.decoder.projector.parameters(),
    ]
    assert {p.dtype for p in added} == {torch.float32}


def test_lora_adapters_on_a_bf16_backbone_are_float32(make_batch):
    module = LaMEModule(tiny("bfloat16"), None, num_reason_tokens=0, stage=2, stage2=Stage2Spec(lora=LoraSpec(r=2)))
    adapters = {n: p for n, p in module.named_parameters() if "lora_" in n}
    assert adapters and {p.dtype for p in adapters.values()} == {torch.float32}
    assert any("lora_magnitude_vector" in n for n in adapters)  # DoRA by default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = module.model_step(make_batch(2), "train")
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())


def test_infonce_is_computed_in_float32_under_autocast(tiny_spec):
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
    target = torch.nn.functional.normalize(query + 0.3 * torch.randn(8, 64), dim=-1)
    exact = module.criterion.contrastive(query, target, None, module.logit_scale, gather=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.criterion.contrastive(query, target, None, module.logit_scale, gather=False)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(exact.item(), rel=1e-6)


def test_full_training_of_bf16_weights_is_warned_about(make_batch):
    module = LaMEModule(tiny("bfloat16"), None, num_reason_tokens=0, stage=2)
    with pytest.warns(UserWarning, match=r"low precision \(language model in bfloat16"):
        module.on_train_batch_start(make_batch(2), 0)


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(8, 4, 4, 8)


def test_a_bf16_backbone_trains_under_bf16_mixed_with_dora(shards, tmp_path, monkeypatch):
    """Stage 2 through the CLI: bf16 base weights stay put, float32 DoRA adapters and [EMBED] parts move."""
    monkeypatch.setattr(sys, "argv", ["lightning"])
    args = [
        "--model.init_args.backbone.dtype=bfloat16",
        "--trainer.precision=bf16-mixed",
        "--model.init_args.stage=2",
        "--model.init_args.embed_dim=16",
        "--model.init_args.learnable_temperature=true",
        "--model.init_args.stage2={lora: {r: 4}}",
        f"--data.init_args.train_shards={shards / 'train'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = build_cli(["fit", f"--config={CONF}", *args, "--trainer.max_steps=0"])
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    torch.manual_seed(0)
    cli = build_cli(["fit", f"--config={CONF}", *args, "--trainer.max_steps=2"])
    after = dict(cli.model.named_parameters())
    assert cli.trainer.global_step == 2
    moved = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert all(torch.isfinite(p).all() for p in after.values())
    assert {"encoder.embed_embedding", "encoder.projection.weight", "log_logit_scale"} <= moved
    assert any("lora_B" in n for n in moved) and any("lora_magnitude_vector" in n for n in moved)
    assert not any(n.startswith("encoder.backbone.") and "lora_" not in n for n in moved)


def test_the_embed_projection_runs_in_float32_on_a_bf16_backbone(make_batch):
    """Without autocast (precision 32 with bf16 weights, the evaluators) and under it alike."""
    module = LaMEModule(tiny("bfloat16"), None, num_reason_tokens=0, stage=2, embed_dim=16)
    batch = make_batch(2)["query"]
    plain = module.encode(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.encode(batch)
    assert plain.embedding.dtype == mixed.embedding.dtype == torch.float32
    assert torch.allclose(plain.embedding, mixed.embedding, atol=1e-6)
