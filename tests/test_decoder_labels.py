"""Rows without a decoder label (image-only targets) stay out of the decoder loss, and the share is logged."""

from __future__ import annotations

import pytest
import torch

from lame_pl import LaMEModule


@pytest.fixture
def module(tiny_spec, tiny_decoder) -> LaMEModule:
    return LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2).eval()


def record_logs(module: LaMEModule, monkeypatch) -> dict[str, tuple[float, dict]]:
    logged: dict[str, tuple[float, dict]] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, (float(value), kw)))
    return logged


def with_labels(batch: dict, labelled: list[bool]) -> dict:
    batch["decoder"]["labelled"] = torch.tensor(labelled)
    return batch


def test_training_logs_the_labelled_fraction_and_decodes_labelled_rows_only(module, make_batch, monkeypatch):
    logged = record_logs(module, monkeypatch)
    batch = with_labels(make_batch(4), [True, False, False, True])
    with torch.no_grad():
        module.training_step(batch, 0)
        query = module.encode(batch["query"])
        rows = [0, 3]
        alone = module.criterion.decoder(
            module.decoder(
                query.reason_states[rows], **{k: v[rows] for k, v in batch["decoder"].items() if k != "labelled"}
            )
        )
    assert logged["train/decoder/labelled_fraction"][0] == 0.5
    assert logged["train/loss/decoder"][0] == pytest.approx(alone.item(), rel=1e-5)


def test_a_batch_from_an_older_collator_counts_every_row(module, make_batch, monkeypatch):
    logged = record_logs(module, monkeypatch)
    batch = make_batch(2)
    batch["decoder"].pop("labelled", None)
    with torch.no_grad():
        module.training_step(batch, 0)
    assert logged["train/decoder/labelled_fraction"][0] == 1.0


def test_evaluation_weighs_the_decoder_loss_by_labelled_rows(module, make_batch, monkeypatch):
    logged = record_logs(module, monkeypatch)
    batch = with_labels(make_batch(4), [False, True, False, False])
    with torch.no_grad():
        out = module.validation_step(batch, 0)
    assert out.decoder_rows == 1
    assert logged["val/loss/decoder"][1]["batch_size"] == 1
    assert logged["val/loss/contrastive"][1]["batch_size"] == 4
    with torch.no_grad():
        out = module.validation_step(with_labels(make_batch(4), [False] * 4), 0)
    assert out.terms["decoder"].item() == 0.0 and out.decoder_rows == 0
