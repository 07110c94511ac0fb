"""Non-finite steps are skipped, counted and stop a run; no checkpoint holds non-finite weights; no silent temperature."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from conftest import CAPTIONS, random_image
from lightning import Callback, Trainer

from lame_pl import LaMEModule
from lame_pl.datamodules.collate import PairCollator
from lame_pl.nonfinite import NonFiniteError, NonFiniteGuard, check_finite_weights, part_of


@pytest.fixture(scope="module")
def batch(processor) -> dict:
    rng = random.Random(0)
    samples = [{"key": f"{i}", "image": random_image(rng), "text": CAPTIONS[i % 4]} for i in range(4)]
    return PairCollator(processor, "Find the caption of this image.")(samples)


def poison(module: LaMEModule, steps: set[int]) -> None:
    """Makes the embeddings (so the contrastive term and its gradients) NaN at the given optimiser steps."""
    encode = module.encode

    def poisoned(inputs):
        out = encode(inputs)
        if module.training and module._trainer is not None and module.trainer.global_step in steps:
            return out._replace(embedding=out.embedding * float("nan"))
        return out

    module.encode = poisoned


class Record(Callback):
    """The trainable weights, AdamW's state and ``train/nonfinite_steps`` after every optimiser step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.adam: list[dict[int, dict[str, torch.Tensor]]] = []
        self.counts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.weights:
            self._snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._snapshot(trainer, pl_module)
            self.counts.append(float(trainer.callback_metrics["train/nonfinite_steps"]))

    def _snapshot(self, trainer, pl_module) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})
        state = trainer.optimizers[0].state if trainer.optimizers else {}
        self.adam.append({id(p): {k: v.clone() for k, v in s.items()} for p, s in state.items()})


def fit(module: LaMEModule, batches: list[dict], ckpt_path: str | None = None, **options) -> Record:
    record = Record()
    callbacks = [record, *options.pop("callbacks", [])]
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches) // options.get("accumulate_grad_batches", 1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return record


def build(tiny_spec, tiny_decoder, chunk: int | None, **kwargs) -> LaMEModule:
    torch.manual_seed(0)
    return LaMEModule(
        tiny_spec,
        tiny_decoder,
        num_reason_tokens=2,
        stage=2,
        learnable_temperature=True,
        lr=1e-3,
        gradcache_chunk_size=chunk,
        **kwargs,
    )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_adam(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


CHUNKS = pytest.mark.parametrize("chunk", [None, 2], ids=["plain", "gradcache"])


@CHUNKS
def test_a_nan_step_changes_no_weight_and_is_counted(tiny_spec, tiny_decoder, batch, chunk):
    module = build(tiny_spec, tiny_decoder, chunk)
    poison(module, {1})
    with pytest.warns(
        UserWarning,
        match=r"step 1 skipped \(1 in a row; 1 non-finite, 0 with a zero gradient in all\), "
        r"non-finite loss and gradient norm: loss=nan, contrastive=nan, "
        r"decoder=[0-9.]+; largest gradient norms: ",
    ):
        record = fit(module, [batch] * 3)
    before, skipped, after = record.weights[1:]
    assert not same(record.weights[0], before)  # step 0 trained
    assert same(before, skipped)  # step 1 changed nothing, AdamW's state included
    assert same_adam(record.adam[1], record.adam[2])
    assert not same(skipped, after) and all(torch.isfinite(p).all() for p in after.values())  # step 2 trained
    assert record.counts == [0.0, 1.0, 1.0]  # cumulative


@CHUNKS
def test_a_nan_micro_batch_skips_its_whole_accumulation_cycle(tiny_spec, tiny_decoder, batch, chunk):
    module = build(tiny_spec, tiny_decoder, chunk)
    poison(module, {0})  # the first micro-batch of the first cycle; the second is finite
    with pytest.warns(UserWarning, match="step 0 skipped"):
        record = fit(module, [batch] * 4, accumulate_grad_batches=2)
    assert same(record.weights[0], record.weights[1]) and not record.adam[1]  # AdamW never stepped
    assert not same(record.weights[1], record.weights[2])
    assert record.counts == [1.0, 1.0]


@CHUNKS
def test_max_nonfinite_steps_in_a_row_stop_the_run_naming_step_terms_and_parts(tiny_spec, tiny_decoder, batch, chunk):
    module = build(tiny_spec, tiny_decoder, chunk, max_nonfinite_steps=2)
    poison(module, {1, 2, 3})
    message = (
        r"stopping at step 2 after 2 skipped steps in a row \(model.max_nonfinite_steps=2\), non-finite "
        r"loss and gradient norm: loss=nan, contrastive=nan, decoder=[0-9.]+; largest gradient norms: "
        r"log_logit_scale=nan, encoder\.reason_embeddings=nan, "
    )
    with warnings.catch_warnings(), pytest.raises(NonFiniteError, match=message):
        warnings.simplefilter("ignore")
        fit(module, [batch] * 5)
    assert module.global_step == 2 and all(torch.isfinite(p).all() for p in module.parameters())


def test_finite_steps_between_reset_the_run(tiny_spec, tiny_decoder, batch):
    module = build(tiny_spec, tiny_decoder, None, max_nonfinite_steps=2)
    poison(module, {0, 2, 4})
    with pytest.warns(UserWarning, match=r"step 4 skipped \(1 in a row; 3 non-finite, 0 with a zero gradient in all\)"):
        record = fit(module, [batch] * 5)
    assert record.counts == [1.0, 1.0, 2.0, 2.0, 3.0]


@CHUNKS
def test_a_diverging_lr_with_the_backbone_frozen_stops_instead_of_growing_the_weights(
    tiny_spec, tiny_decoder, batch, chunk
):
    """Stage 1 at lr 1e6: the first update saturates the model, whose loss then stays constant with an all-zero
    gradient while AdamW's momentum would grow the weights by ~lr a step. Those steps are skipped, then the run stops."""
    torch.manual_seed(0)
    module = LaMEModule(
        tiny_spec, tiny_decoder, num_reason_tokens=2, stage=1, lr=1e6, gradcache_chunk_size=chunk, max_nonfinite_steps=3
    )
    peaks: list[float] = []

    class Peak(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            peaks.append(max(p.detach().abs().max().item() for p in pl_module.parameters() if p.requires_grad))

    message = (
        r"stopping at step 3 after 3 skipped steps in a row \(model.max_nonfinite_steps=3\), zero gradient "
        r"with a non-zero loss \(a saturated model\): loss=[0-9.]+, decoder=[0-9.]+; largest gradient norms: "
        r"encoder.reason_embeddings=0, .*; largest weights: [a-z_.]+=1e\+06"
    )
    with (
        pytest.warns(UserWarning, match=r"step 1 skipped \(1 in a row; 0 non-finite, 1 with a zero gradient in all\)"),
        pytest.raises(NonFiniteError, match=message),
    ):
        fit(module, [batch] * 8, callbacks=[Peak()])
    assert len(peaks) == 3 and peaks[0] == peaks[1] == peaks[2] == pytest.approx(1e6, rel=1e-3)
    assert module.trainer.callback_metrics["train/zero_gradient_steps"] == 2.0  # logged before the third stopped it


class InfGradient(Callback):
    """An exploding gradient with a finite loss: callbacks see the gradients before the module's hook."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            pl_module.decoder.projector[0].weight.grad[0, 0] = math.inf


def test_a_non_finite_gradient_norm_with_a_finite_loss_is_skipped_naming_the_part(tiny_spec, tiny_decoder, batch):
    module = build(tiny_spec, tiny_decoder, None)
    with pytest.warns(
        UserWarning,
        match=r"step 1 skipped .*non-finite gradient norm: loss=[0-9.]+, "
        r"contrastive=[0-9.]+, decoder=[0-9.]+; largest gradient norms: "
        r"decoder\.projector=inf, ",
    ):
        record = fit(module, [batch] * 3, callbacks=[InfGradient()], gradient_clip_val=1.0)
    assert same(record.weights[1], record.weights[2]) and same_adam(record.adam[1], record.adam[2])
    assert record.counts == [0.0, 1.0, 1.0]


def test_a_step_that_cannot_be_skipped_stops_at_once():
    """Under DeepSpeed the engine applies gradient partitions of its own: dropping ``grad`` would not skip."""
    guard = NonFiniteGuard(limit=5)
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    guard.watch(torch.tensor(math.nan), {"contrastive": torch.tensor(math.nan)})
    with pytest.raises(
        NonFiniteError,
        match=r"^stopping at step 7: under DeepSpeed a step cannot be skipped, "
        r"non-finite loss: loss=nan, contrastive=nan; ",
    ):
        guard.check([("decoder.projector.0.weight", weight)], 7, can_skip=False)


def test_parts_are_top_level_modules():
    assert part_of("encoder.backbone.visual.blocks.0.attn.qkv.weight") == "encoder.backbone.visual"
    assert (
        part_of("encoder.backbone.language_model.base_model.model.layers.0.q.lora_A.weight")
        == "encoder.backbone.language_model"
    )
    assert part_of("encoder.reason_embeddings") == "encoder.reason_embeddings"
    assert part_of("decoder.language_model.model.layers.0.mlp.weight") == "decoder.language_model"
    assert part_of("log_logit_scale") == "log_logit_scale"


def test_a_checkpoint_of_non_finite_weights_is_refused_naming_the_parameter(tiny_spec, tiny_decoder, batch, tmp_path):
    module = build(tiny_spec, tiny_decoder, None)
    fit(module, [batch])
    trainer = module.trainer
    trainer.save_checkpoint(tmp_path / "good.ckpt")  # finite: written
    with torch.no_grad():
        module.decoder.projector[2].bias[3] = math.nan
    with pytest.raises(
        NonFiniteError,
        match=r"^refusing to save a checkpoint at step 1: decoder\.projector\.2\.bias "
        r"is not finite$",
    ):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert (tmp_path / "good.ckpt").is_file() and not (tmp_path / "bad.ckpt").exists()


def test_the_count_survives_a_resume(tiny_spec, tiny_decoder, batch, tmp_path):
    module = build(tiny_spec, tiny_decoder, None)
    poison(module, {0})
    with pytest.warns(UserWarning, match="step 0 skipped"):
        fit(module, [batch] * 2, default_root_dir=tmp_path)
    module.trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["lame_nonfinite_steps"] == 1
    resumed = build(tiny_spec, tiny_decoder, None)
    fit(resumed, [batch] * 3, ckpt_path=tmp_path / "a.ckpt")
    assert float(resumed.trainer.callback_metrics["train/nonfinite_steps"]) == 1.0


# ----------------------------------------------------------------------------- configuration


def test_a_temperature_the_logit_scale_cap_would_override_is_refused(tiny_spec):
    with pytest.raises(
        ValueError,
        match=r"^model.temperature 0.005 is below 0.01, the floor set by the logit "
        r"scale's cap of 100$",
    ):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, temperature=0.005)
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2, temperature=0.01)  # the cap itself is allowed
    assert module.logit_scale.item() == pytest.approx(100.0)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_nonfinite_steps_is_validated(tiny_spec, value):
    with pytest.raises(ValueError, match="model.max_nonfinite_steps must be an integer >= 1"):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, max_nonfinite_steps=value)


@pytest.fixture(scope="module")
def learned(tiny_spec, tiny_decoder, batch, module_tmp) -> tuple[str, float]:
    """A stage-2 checkpoint (configured temperature 0.05) whose temperature moved in training."""
    torch.manual_seed(0)
    module = LaMEModule(
        tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2, learnable_temperature=True, temperature=0.05, lr=0.05
    )
    fit(module, [batch] * 2)
    path = str(module_tmp("learned") / "stage.ckpt")
    module.trainer.save_checkpoint(path)
    temperature = 1.0 / module.logit_scale.item()
    assert temperature != pytest.approx(0.05, rel=1e-3)
    return path, temperature


def said(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr("lame_pl.init_from.rank_zero_info", lines.append)
    return lines


def test_init_from_keeps_a_learned_temperature_when_this_run_learns_it_and_says_so(
    tiny_spec, tiny_decoder, learned, monkeypatch
):
    path, temperature = learned
    lines = said(monkeypatch)
    module = LaMEModule(
        tiny_spec,
        tiny_decoder,
        num_reason_tokens=2,
        stage=2,
        learnable_temperature=True,
        temperature=0.05,
        init_from=path,
    )
    assert 1.0 / module.logit_scale.item() == pytest.approx(temperature, rel=1e-6)
    assert f"init_from: temperature 0.05 from the config replaced by {temperature:.4g} learned in {path}" in lines


def test_init_from_keeps_the_configured_temperature_of_a_fixed_run_and_says_so(
    tiny_spec, tiny_decoder, learned, monkeypatch
):
    path, temperature = learned
    lines = said(monkeypatch)
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2, temperature=0.02, init_from=path)
    assert 1.0 / module.logit_scale.item() == pytest.approx(0.02, rel=1e-6)
    assert (
        f"init_from: temperature 0.02 from the config kept, not {temperature:.4g} learned in {path} "
        "(model.learnable_temperature is false)"
    ) in lines


def test_init_from_keeps_the_configured_temperature_over_another_configured_one(
    tiny_spec, tiny_decoder, tmp_path, monkeypatch
):
    """Stage 1 (no contrastive loss) never moves the temperature: stage 2's config decides, even when learnable."""
    torch.manual_seed(0)
    first = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, temperature=0.05)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": first.state_dict(), "hyper_parameters": dict(first.hparams)}, path)
    lines = said(monkeypatch)
    module = LaMEModule(
        tiny_spec,
        tiny_decoder,
        num_reason_tokens=2,
        stage=2,
        learnable_temperature=True,
        temperature=0.02,
        init_from=str(path),
    )
    assert 1.0 / module.logit_scale.item() == pytest.approx(0.02, rel=1e-6)
    assert f"init_from: temperature 0.02 from the config kept, not 0.05 configured in {path}" in lines
    lines.clear()
    LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2, temperature=0.05, init_from=str(path))
    assert not [line for line in lines if "temperature" in line]  # nothing overridden, nothing said


def test_a_zero3_partitioned_weight_is_checked_through_its_partition():
    """ZeRO-3 leaves an empty placeholder in each parameter and the rank's part in ``ds_tensor``;
    ``detach()`` drops that attribute, so the partition must be taken first (a checkpoint save
    under ZeRO-3 failed on the empty placeholder, found by tests/test_deepspeed.py)."""
    layer = torch.nn.Linear(2, 2)
    for p in layer.parameters():
        p.ds_tensor = p.data.clone().flatten()  # this rank's partition
        p.data = torch.empty(0)  # the placeholder
    check_finite_weights(layer, step=3)  # finite partitions: nothing to say
    layer.weight.ds_tensor[1] = float("nan")
    with pytest.raises(NonFiniteError, match="at step 3: weight is not finite"):
        check_finite_weights(layer, step=3)
