"""InfoNCE against a hand computation, and the decoder's cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lame_pl.backbone import build_decoder
from lame_pl.decoder import LatentDecoder
from lame_pl.losses import IGNORE_INDEX, LaMELoss, info_nce


def mean_loss(decoder: LatentDecoder, *args) -> torch.Tensor:
    """The decoder term of a batch: the loss object's cross-entropy over the decoder's predictions."""
    return LaMELoss().decoder(decoder(*args))


def test_info_nce_matches_a_hand_computed_value():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = 10.0
    # Row 0: logits (10, 6), positive 10. Row 1: logits (0, 8), positive 8.
    row0 = -math.log(math.exp(10) / (math.exp(10) + math.exp(6)))
    row1 = -math.log(math.exp(8) / (math.exp(0) + math.exp(8)))
    assert info_nce(query, target, scale).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_info_nce_hard_negatives_and_offset():
    query = torch.tensor([[0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the global batch; this rank's positive is row 1
    negative = torch.tensor([[0.6, 0.8]])
    expected = -math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0) + math.exp(1.6)))
    got = info_nce(query, target, 2.0, hard_negatives=negative, offset=1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_decoder_loss_is_token_cross_entropy_after_the_prefix(tiny_decoder):
    torch.manual_seed(0)
    lm = build_decoder(tiny_decoder).eval()
    decoder = LatentDecoder(lm, input_dim=8).eval()
    states = torch.randn(2, 3, 8)
    ids = torch.tensor([[11, 12, 13], [21, 22, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss = mean_loss(decoder, states, ids, mask)
    # Reference through the LM's own labels-shifting loss.
    prefix = decoder.projector(states)
    embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
    labels = torch.cat([torch.full((2, 3), -100), ids.masked_fill(mask == 0, -100)], dim=1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
    reference = lm(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_restricted_vocabulary_is_exact_cross_entropy_over_its_support(tiny_decoder):
    torch.manual_seed(0)
    lm = build_decoder(tiny_decoder).eval()
    allowed = [5, 11, 12, 13, 40]
    decoder = LatentDecoder(lm, input_dim=8, output_ids=allowed).eval()
    states = torch.randn(1, 2, 8)
    ids, mask = torch.tensor([[11, 13, 5]]), torch.ones(1, 3, dtype=torch.long)
    loss = mean_loss(decoder, states, ids, mask)
    hidden = lm.base_model(
        inputs_embeds=torch.cat([decoder.projector(states), lm.get_input_embeddings()(ids)], dim=1)
    ).last_hidden_state[:, 1:-1]
    logits = lm.get_output_embeddings()(hidden)[0][:, allowed]
    reference = F.cross_entropy(logits, torch.tensor([1, 3, 0]))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[99\]"):
        decoder(states, torch.tensor([[99]]), torch.ones(1, 1, dtype=torch.long))


def test_decoder_loss_counts_only_labelled_rows(tiny_decoder):
    torch.manual_seed(0)
    decoder = LatentDecoder(build_decoder(tiny_decoder), input_dim=8).eval()
    states = torch.randn(3, 2, 8)
    ids = torch.tensor([[11, 12, 13], [151643, 0, 0], [21, 22, 0]])  # row 1: an image-only placeholder
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    labelled = torch.tensor([True, False, True])
    masked = mean_loss(decoder, states, ids, mask, labelled)
    alone = mean_loss(decoder, states[[0, 2]], ids[[0, 2]], mask[[0, 2]])
    assert masked.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(masked.item() - mean_loss(decoder, states, ids, mask).item()) > 1e-4  # the placeholder row counts there
    # No mask (an older collator) means every row.
    every_row = mean_loss(decoder, states, ids, mask, torch.ones(3, dtype=torch.bool))
    assert mean_loss(decoder, states, ids, mask, None).item() == pytest.approx(every_row.item())
    with pytest.raises(ValueError, match=r"labelled mask must have shape \(3,\), got \(2,\)"):
        decoder(states, ids, mask, labelled[:2])


def test_an_all_unlabelled_batch_gives_zero_with_zero_gradients_everywhere(tiny_decoder):
    """DDP needs every rank to use the same parameters, even when a rank's batch has no label."""
    torch.manual_seed(0)
    decoder = LatentDecoder(build_decoder(tiny_decoder), input_dim=8, output_ids=[0, 11, 151643])
    states = torch.randn(2, 2, 8, requires_grad=True)
    ids, mask = torch.tensor([[151643], [151643]]), torch.ones(2, 1, dtype=torch.long)
    predicted = decoder(states, ids, mask, torch.tensor([False, False]))
    assert predicted.num_tokens == 0 and predicted.targets.tolist() == [IGNORE_INDEX]
    loss = LaMELoss().decoder(predicted)
    assert loss.item() == 0.0
    loss.backward()
    assert states.grad is not None and torch.equal(states.grad, torch.zeros_like(states))
    for name, param in decoder.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, torch.zeros_like(param)), name
