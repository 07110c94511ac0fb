"""Freezing per stage: after one optimiser step, frozen parameters are unchanged and trained ones moved."""

from __future__ import annotations

import pytest
import torch

from lame_pl import LaMEModule, LoraSpec, StageSpec


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def one_step(module: LaMEModule, batch: dict) -> dict[str, torch.Tensor]:
    before = snapshot(module)
    optimizer = module.configure_optimizers()
    loss, _, _ = module.model_step(batch, "train")
    loss.backward()
    optimizer.step()
    return before


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor], prefix: str) -> tuple[int, int]:
    """(how many parameters under ``prefix`` moved, how many there are)."""
    moved = total = 0
    for name, p in module.named_parameters():
        if name.startswith(prefix):
            total += 1
            moved += int(not torch.equal(p.detach(), before[name]))
    assert total > 0, prefix
    return moved, total


@pytest.fixture
def build(tiny_spec, tiny_decoder):
    def make(**kwargs) -> LaMEModule:
        torch.manual_seed(0)
        return LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, lr=1e-2, **kwargs)

    return make


def test_stage1_trains_only_latent_tokens_and_decoder(build, make_batch):
    module = build(stage=1)
    before = one_step(module, make_batch(4))
    assert changed(module, before, "encoder.backbone.") == (0, len([n for n in before if n.startswith("encoder.backbone.")]))
    assert changed(module, before, "encoder.reason_embeddings")[0] == 1
    moved, total = changed(module, before, "decoder.")
    assert moved > 0.9 * total
    # [EMBED] gets no gradient from the decoder loss alone and stage 1 has no contrastive term.
    assert changed(module, before, "encoder.embed_embedding")[0] == 0


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_stage2_trains_the_language_model_not_the_vision_tower(build, make_batch, gradient_checkpointing):
    module = build(stage=2, gradient_checkpointing=gradient_checkpointing)
    before = one_step(module, make_batch(4))
    assert changed(module, before, "encoder.backbone.visual.")[0] == 0
    moved, total = changed(module, before, "encoder.backbone.language_model.")
    assert moved > 0.9 * total
    assert changed(module, before, "encoder.embed_embedding")[0] == 1
    assert changed(module, before, "log_logit_scale")[0] == 0  # temperature fixed by default


def test_stage2_with_lora_trains_adapters_only(build, make_batch):
    module = build(stage=2, stage2=StageSpec(lora=LoraSpec(r=4), contrastive_loss_weight=1.0))
    before = one_step(module, make_batch(4))
    lm = "encoder.backbone.language_model."
    lora = [n for n in before if n.startswith(lm) and "lora_" in n]
    base = [n for n in before if n.startswith(lm) and "lora_" not in n]
    assert lora and all(not torch.equal(dict(module.named_parameters())[n], before[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(dict(module.named_parameters())[n], before[n]) for n in base)


def test_learnable_temperature_moves(build, make_batch):
    module = build(stage=2, learnable_temperature=True)
    before = one_step(module, make_batch(4))
    assert changed(module, before, "log_logit_scale")[0] == 1


def test_bad_stage_and_k(tiny_spec, tiny_decoder):
    with pytest.raises(ValueError, match="model.stage must be 1 or 2, got 3"):
        LaMEModule(tiny_spec, tiny_decoder, stage=3)
    with pytest.raises(ValueError, match="model.num_reason_tokens must be >= 0, got -2"):
        LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=-2)
    with pytest.raises(ValueError, match="decoder is set but num_reason_tokens is 0"):
        LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=0)
    with pytest.raises(ValueError, match="stage 1 trains only the decoder loss"):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=1)


def test_discriminative_baseline_trains_without_decoder(tiny_spec, make_batch):
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    before = one_step(module, make_batch(4))
    assert changed(module, before, "encoder.embed_embedding")[0] == 1
