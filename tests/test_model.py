"""The encoder's input layout, pooling, normalisation, bottleneck mask and K=0."""

from __future__ import annotations

import pytest
import torch

from lame_pl.backbone import build_backbone
from lame_pl.model import LaMEEncoder


@pytest.fixture(scope="module")
def backbone(tiny_spec):
    torch.manual_seed(0)
    return build_backbone(tiny_spec).eval()


def test_shapes_and_normalisation(backbone, make_batch):
    batch = make_batch(3)
    encoder = LaMEEncoder(backbone, num_reason_tokens=4, embed_dim=24)
    out = encoder(**batch["query"])
    assert out.embedding.shape == (3, 24)
    assert out.reason_states.shape == (3, 4, backbone.config.text_config.hidden_size)
    assert torch.allclose(out.embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
    text = encoder(**batch["target"])
    assert text.embedding.shape == (3, 24)


def backbone_inputs(encoder: LaMEEncoder, batch: dict, monkeypatch) -> dict:
    """What the encode path hands the backbone (a forward pre-hook) and the ids it positions (get_rope_index)."""
    seen: dict = {}
    rope_index = encoder.backbone.get_rope_index

    def record_ids(input_ids, *args, **kwargs):
        seen["input_ids"] = input_ids
        return rope_index(input_ids, *args, **kwargs)

    monkeypatch.setattr(encoder.backbone, "get_rope_index", record_ids)
    handle = encoder.backbone.register_forward_pre_hook(lambda _, __, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        encoder(**batch)
    finally:
        handle.remove()
    return seen


def test_latent_tokens_sit_at_the_end_of_every_row(backbone, make_batch, monkeypatch):
    batch = make_batch(3)["target"]  # captions of different lengths: rows are left-padded
    encoder = LaMEEncoder(backbone, num_reason_tokens=5, placeholder_token_id=7)
    seen = backbone_inputs(encoder, batch, monkeypatch)
    ids, mask, types, embeds = (
        seen["input_ids"],
        seen["attention_mask"],
        seen["mm_token_type_ids"],
        seen["inputs_embeds"],
    )
    assert ids.shape[1] == embeds.shape[1] == batch["input_ids"].shape[1] + 6
    assert (ids[:, -6:] == 7).all() and (mask[:, -6:] == 1).all() and (types[:, -6:] == 0).all()
    assert torch.equal(embeds[0, -6:-1], encoder.reason_embeddings.data)
    assert torch.equal(embeds[2, -1], encoder.embed_embedding.data[0])
    # The input part keeps the token embeddings of the ids.
    table = backbone.get_input_embeddings()
    assert torch.equal(embeds[:, :-6], table(batch["input_ids"]))


def test_embedding_is_the_final_state_at_embed(backbone, make_batch):
    batch = make_batch(2)["query"]
    encoder = LaMEEncoder(backbone, num_reason_tokens=3)
    out = encoder(**batch)
    assert torch.allclose(out.embedding, torch.nn.functional.normalize(out.embed_state, dim=-1), atol=1e-6)
    # Changing the [EMBED] vector changes the embedding but not the reason states (causal order).
    with torch.no_grad():
        encoder.embed_embedding.add_(1.0)
    again = encoder(**batch)
    assert torch.allclose(again.reason_states, out.reason_states, atol=1e-5)
    assert not torch.allclose(again.embedding, out.embedding, atol=1e-3)


def test_right_padding_is_refused(backbone, make_batch):
    batch = make_batch(3)["target"]
    encoder = LaMEEncoder(backbone, num_reason_tokens=2)
    flipped = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="left-padded"):
        encoder(**flipped)


def test_bottleneck_mask_changes_only_the_embed_row(backbone, make_batch):
    batch = make_batch(2)["target"]
    masked = LaMEEncoder(backbone, num_reason_tokens=3, bottleneck_mask=True)
    open_ = LaMEEncoder(backbone, num_reason_tokens=3)
    open_.load_state_dict(masked.state_dict())
    with_mask, without = masked(**batch), open_(**batch)
    assert not torch.allclose(with_mask.embed_state, without.embed_state, atol=1e-4)
    assert torch.allclose(with_mask.reason_states, without.reason_states, atol=1e-5)


def test_bottleneck_mask_lets_embed_see_reason_tokens_only(backbone, make_batch, monkeypatch):
    encoder = LaMEEncoder(backbone, num_reason_tokens=2, bottleneck_mask=True)
    batch = make_batch(2)["target"]
    seen = backbone_inputs(encoder, batch, monkeypatch)  # the mask the backbone is given when encoding
    attention = seen["attention_mask"]
    assert attention.dim() == 4
    allowed = attention if attention.dtype == torch.bool else attention == 0
    length = seen["inputs_embeds"].shape[1]
    last_row = allowed[:, 0, -1]
    assert last_row[:, : length - 3].sum() == 0  # no input token
    assert last_row[:, length - 3 :].all()  # reason tokens and itself
    # Every other row keeps the ordinary causal + padding mask.
    row = allowed[1, 0, length - 2]
    assert row[length - 2 :].tolist() == [True, False]


def test_zero_reason_tokens_is_the_discriminative_baseline(backbone, make_batch):
    batch = make_batch(2)
    encoder = LaMEEncoder(backbone, num_reason_tokens=0)
    out = encoder(**batch["query"])
    assert out.reason_states.shape == (2, 0, backbone.config.text_config.hidden_size)
    assert out.embedding.shape == (2, backbone.config.text_config.hidden_size)


def test_bad_values(backbone):
    with pytest.raises(ValueError, match="num_reason_tokens must be an integer >= 0, got -1"):
        LaMEEncoder(backbone, num_reason_tokens=-1)
    with pytest.raises(ValueError, match="bottleneck_mask"):
        LaMEEncoder(backbone, num_reason_tokens=0, bottleneck_mask=True)


def test_the_module_overrides_the_lightning_hooks_it_did_before_it_was_split():
    """LaMEModule's hooks live in mixins (optimizer_steps, restoring, evaluated_step): Lightning must still see them."""
    from lightning import LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from lame_pl import LaMEModule

    hooks = ("transfer_batch_to_device", "on_before_optimizer_step", "optimizer_zero_grad", "configure_optimizers",
             "configure_model", "setup", "on_fit_start", "on_train_batch_start", "on_train_batch_end",
             "on_validation_start", "on_test_start", "on_predict_start", "on_validation_epoch_end",
             "on_test_epoch_end", "on_save_checkpoint", "on_load_checkpoint", "training_step", "validation_step",
             "test_step", "predict_step")  # fmt: skip
    assert [hook for hook in hooks if not is_overridden(hook, LaMEModule, LightningModule)] == []
    assert LaMEModule.load_from_checkpoint.__func__.__qualname__ == "RestoredFromFile.load_from_checkpoint"
