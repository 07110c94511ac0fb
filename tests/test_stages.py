"""Freezing per stage: after one optimiser step, frozen parameters are unchanged and trained ones moved."""

from __future__ import annotations

import pytest
import torch

from lame_pl import LaMEModule, LoraSpec
from lame_pl.optimization import check_resumable, param_groups
from lame_pl.stages import Stage1Spec, Stage2Spec
from lame_pl.trainable import trainable_counts, trainable_summary


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
    assert changed(module, before, "encoder.backbone.") == (
        0,
        len([n for n in before if n.startswith("encoder.backbone.")]),
    )
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
    module = build(stage=2, stage2=Stage2Spec(lora=LoraSpec(r=4)))
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
    with pytest.raises(ValueError, match="model.num_reason_tokens must be an integer >= 0, got -2"):
        LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=-2)
    with pytest.raises(ValueError, match="decoder is set but model.num_reason_tokens is 0"):
        LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=0)
    with pytest.raises(ValueError, match="stage 1 trains only the decoder loss"):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=1)


def test_discriminative_baseline_trains_without_decoder(tiny_spec, make_batch):
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2)
    before = one_step(module, make_batch(4))
    assert changed(module, before, "encoder.embed_embedding")[0] == 1


# ----------------------------------------------------------------------------- stage specs


def test_a_partial_stage_spec_keeps_its_own_stages_defaults():
    assert Stage2Spec(lora=LoraSpec(r=16)) == Stage2Spec(
        train_language_model=True, lora=LoraSpec(r=16), contrastive_loss_weight=1.0, decoder_loss_weight=1.0
    )
    assert Stage1Spec(train_vision_tower=True).contrastive_loss_weight == 0.0
    assert not Stage1Spec().train_language_model and Stage2Spec().train_language_model


def test_lora_without_training_the_language_model_is_refused_naming_the_stage():
    with pytest.raises(ValueError, match="model.stage1 sets lora but train_language_model is false"):
        Stage1Spec(lora=LoraSpec())
    with pytest.raises(ValueError, match="model.stage2 sets lora but train_language_model is false"):
        Stage2Spec(lora=LoraSpec(), train_language_model=False)
    with pytest.raises(ValueError, match="model.stage2 has both loss weights at 0"):
        Stage2Spec(contrastive_loss_weight=0.0, decoder_loss_weight=0.0)
    with pytest.raises(ValueError, match="lora: need r >= 1"):
        LoraSpec(r=0)


def test_lora_defaults_are_vlm2vec_v2s():
    spec = LoraSpec()
    assert (spec.r, spec.alpha, spec.dropout, spec.use_dora, spec.init) == (16, 64, 0.1, True, "gaussian")


def test_none_is_the_stages_defaults(build):
    """Older checkpoints carry `stage1: None` in their hyper-parameters."""
    module = build(stage=1, stage1=None, stage2=None)
    assert module.stages == {1: Stage1Spec(), 2: Stage2Spec()}


# ----------------------------------------------------------------------------- what the losses reach


def trainable(module: LaMEModule, prefix: str) -> set[bool]:
    return {p.requires_grad for name, p in module.named_parameters() if name.startswith(prefix)}


def test_stage1_freezes_what_only_infonce_reaches(tiny_spec, tiny_decoder, make_batch):
    """[EMBED], its projection and a learnable temperature get no gradient from the decoder loss."""
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, embed_dim=16, learnable_temperature=True)
    for prefix in ("encoder.embed_embedding", "encoder.projection.", "log_logit_scale", "encoder.backbone."):
        assert trainable(module, prefix) == {False}, prefix
    assert trainable(module, "encoder.reason_embeddings") == trainable(module, "decoder.") == {True}
    # Every trainable parameter gets a gradient from stage 1's loss (what DDP requires).
    loss, _, _ = module.model_step(make_batch(2), "train")
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    module.set_stage(2)
    for prefix in ("encoder.embed_embedding", "encoder.projection.", "log_logit_scale"):
        assert trainable(module, prefix) == {True}, prefix


def test_a_stage_without_the_decoder_loss_freezes_the_decoder(build, make_batch):
    module = build(stage=2, stage2=Stage2Spec(decoder_loss_weight=0.0))
    assert trainable(module, "decoder.") == {False}
    loss, terms, _ = module.model_step(make_batch(2), "train")
    assert set(terms) == {"contrastive"}
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_trainable_summary_counts_each_part(build):
    module = build(stage=2, stage2=Stage2Spec(lora=LoraSpec(r=2)))
    counts = trainable_counts(module)
    assert counts["language model"][0] == 0 < counts["language model"][1]
    assert counts["LoRA adapters"][0] == counts["LoRA adapters"][1] > 0
    assert counts["vision tower"][0] == 0
    assert counts["reason tokens"] == (2 * 64, 2 * 64)  # K=2, tiny hidden size 64
    line = trainable_summary(module, "stage 2")
    assert line.startswith("stage 2 trains ") and "LoRA adapters" in line and "decoder projector" in line


def test_resuming_an_optimiser_over_another_trainable_set_fails_with_a_way_out(build):
    """A checkpoint written before stage 1 froze [EMBED] and its projection held them in its
    optimiser: resuming it must name the mismatch and init_from, not fail inside torch."""
    module = build(stage=1, embed_dim=8)
    trains = sum(1 for p in module.parameters() if p.requires_grad)
    ok = {"lame_stage": 1, "optimizer_states": [{"param_groups": [{"params": list(range(trains))}]}]}
    check_resumable(module, ok)
    old = {"lame_stage": 1, "optimizer_states": [{"param_groups": [{"params": list(range(trains + 3))}]}]}
    with pytest.raises(
        ValueError, match=f"holds {trains + 3} trainable tensors but stage 1 trains {trains}.*init_from"
    ):
        check_resumable(module, old)
    module.on_load_checkpoint(old)  # no trainer fitting (test, predict, the evaluators): no optimiser to resume


def test_a_resumed_fit_checks_the_optimiser_before_torch_does(build, make_batch, tmp_path):
    """Through the Trainer: a stage that trains another set than the checkpoint's optimiser stops
    with the message above; the same set resumes."""
    from lightning import Trainer

    batch = make_batch(2)
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer = Trainer(max_steps=1, **options)
    trainer.fit(build(stage=1), loader)
    trainer.save_checkpoint(tmp_path / "s1.ckpt")
    Trainer(max_steps=2, **options).fit(build(stage=1), loader, ckpt_path=tmp_path / "s1.ckpt")
    other = build(stage=1, stage1=Stage1Spec(train_vision_tower=True))
    saved = sum(p.requires_grad for p in build(stage=1).parameters())
    with pytest.raises(ValueError, match=f"optimiser holds {saved} .*init_from"):
        Trainer(max_steps=2, **options).fit(other, loader, ckpt_path=tmp_path / "s1.ckpt")


def test_decoder_lr_puts_the_decoder_in_its_own_group_and_a_resume_across_it_is_refused(build, tiny_spec):
    plain = build(stage=2)
    assert len(param_groups(plain)) == 1
    module = build(stage=2, decoder_lr=1e-3)  # lr 1e-2
    optimizer = module.configure_optimizers()  # constant, no warm-up: the optimiser alone
    named = {group["name"]: group for group in optimizer.param_groups}
    assert named["model"]["lr"] == pytest.approx(1e-2) and named["decoder"]["lr"] == pytest.approx(1e-3)
    decoder = {id(p) for p in module.decoder.parameters() if p.requires_grad}
    assert {id(p) for p in named["decoder"]["params"]} == decoder
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in named["model"]["params"]} == trained - decoder
    # A checkpoint whose optimiser had one group cannot resume into two, and says why.
    saved = {"optimizer_states": [{"param_groups": [{"params": list(range(len(trained)))}]}]}
    with pytest.raises(ValueError, match=r"1 parameter group\(s\) but this run has 2: model.decoder_lr"):
        check_resumable(module, saved)
    check_resumable(plain, saved)
    with pytest.raises(ValueError, match="model.decoder_lr must be > 0"):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, decoder_lr=0.0)
    with pytest.raises(ValueError, match="model.decoder_lr is set but model.decoder is null"):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, decoder_lr=1e-3)
