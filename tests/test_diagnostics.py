"""Diagnostics callbacks: each statistic against an independent computation, the attention probe, thumbnails."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIDE, random_image
from PIL import Image

from lame_pl.backbone import build_backbone
from lame_pl.callbacks import EmbeddingHealth, EmbeddingProjector, ReasonDiagnostics, SimilarityHeatmap
from lame_pl.callbacks.attention_probe import embed_attention_shares, last_layer_attention
from lame_pl.callbacks.similarity_heatmap import LABEL_BAND, SCALE_GAP, figure_size, heatmap_figure, render_heatmap
from lame_pl.callbacks.space_stats import (
    alignment,
    effective_rank,
    mean_pairwise_cosine,
    positive_and_hardest_negative,
    std_ratio,
    uniformity,
)
from lame_pl.callbacks.thumbnails import images_from_patches, row_images
from lame_pl.callbacks.validation_subset import FirstRows
from lame_pl.eval_output import DiagnosedModule, EvalOutput
from lame_pl.model import LaMEEncoder, text_config
from lame_pl.modes import EncoderOutput, TokenLayout

# ----------------------------------------------------------------------------- statistics


def test_alignment_of_identical_and_opposite_pairs():
    x = F.normalize(torch.randn(6, 5), dim=-1)
    assert alignment(x, x) == 0.0
    assert alignment(x, -x) == pytest.approx(4.0)


def test_uniformity_against_a_double_loop():
    x = F.normalize(torch.randn(7, 3), dim=-1).double()
    terms = [math.exp(-2 * float((x[i] - x[j]).pow(2).sum())) for i in range(7) for j in range(i + 1, 7)]
    assert uniformity(x) == pytest.approx(math.log(sum(terms) / len(terms)))
    assert uniformity(torch.ones(4, 3)) == 0.0  # identical points: the worst value
    with pytest.raises(ValueError, match="at least 2 rows"):
        uniformity(torch.ones(1, 3))


def test_positive_and_hardest_negative_on_a_known_matrix():
    query = torch.eye(3)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    # cosine[i, j] = target[j, i]: positives 1, 0.8, 0.8; hardest wrong targets 0.6, 0.6, 0.0.
    positive, hardest = positive_and_hardest_negative(query, target)
    assert positive == pytest.approx((1 + 0.8 + 0.8) / 3)
    assert hardest == pytest.approx((0.6 + 0.6 + 0.0) / 3)


def test_std_ratio_collapsed_is_zero_and_spread_is_exact():
    assert std_ratio(torch.ones(10, 8)) == 0.0
    d = 6
    signed_axes = torch.cat([torch.eye(d), -torch.eye(d)])  # 2d rows: each coordinate holds +1, -1 and zeros
    expected = math.sqrt(2 / (2 * d - 1)) * math.sqrt(d)  # the unbiased std of that column, times sqrt(d)
    assert std_ratio(signed_axes) == pytest.approx(expected)
    random_unit = F.normalize(torch.randn(4000, 16), dim=-1)
    assert std_ratio(random_unit) == pytest.approx(1.0, abs=0.05)


def test_effective_rank_collapsed_orthonormal_and_against_numpy():
    assert effective_rank(torch.ones(9, 4)) == pytest.approx(1.0)
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    x = torch.randn(12, 7)
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    with pytest.raises(ValueError, match="all-zero"):
        effective_rank(torch.zeros(3, 3))


def test_mean_pairwise_cosine():
    same = torch.randn(2, 1, 8).expand(2, 4, 8)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)[None]) == pytest.approx(0.0)
    # Three states: a, a, b with a ⟂ b: pairs (a,a)=1, (a,b)=0, (a,b)=0.
    assert mean_pairwise_cosine(torch.tensor([[[1.0, 0], [2.0, 0], [0, 3.0]]])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="K >= 2"):
        mean_pairwise_cosine(torch.randn(2, 1, 8))


# ----------------------------------------------------------------------------- rendering


def test_heatmap_colours_and_size():
    image = render_heatmap(torch.tensor([[1.0, -1.0], [0.0, 0.5]]), cell=3)
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 6)
    assert image[:, 0, 0].tolist() == [255, 0, 0]  # +1 red
    assert image[:, 0, 3].tolist() == [0, 0, 255]  # -1 blue
    assert image[:, 3, 0].tolist() == [255, 255, 255]  # 0 white
    assert image[:, 5, 5].tolist() == [255, 128, 128]  # +0.5 half-way to red
    with pytest.raises(ValueError, match="2-D"):
        render_heatmap(torch.zeros(3))


def test_heatmap_figure_frames_the_matrix_with_labels_and_a_colour_scale():
    values = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.5, -0.5]])
    figure = heatmap_figure(values, cell=20)
    assert figure.dtype == torch.uint8 and tuple(figure.shape[1:]) == figure_size(2, 3, cell=20)
    top = left = LABEL_BAND
    # The matrix is there, cell for cell, below the "targets" label and right of "queries".
    assert torch.equal(figure[:, top : top + 40, left : left + 60], render_heatmap(values, cell=20))
    assert (figure[:, : top - 2, left : left + 60] < 128).any()  # dark text: the column axis label
    assert (figure[:, top : top + 40, : left - 2] < 128).any()  # and the row axis label
    # The colour scale runs from red (+1) at the top to blue (-1) at the bottom.
    bar = figure[:, top : top + 40, left + 60 + SCALE_GAP + 4].int()
    assert bar[:, 0].tolist() == [255, 0, 0] and bar[:, -1].tolist() == [0, 0, 255]
    assert (bar[0].diff() <= 0).all() and (bar[2].diff() >= 0).all()  # red fades, blue grows, row by row
    with pytest.raises(ValueError, match="2-D"):
        heatmap_figure(torch.zeros(3))


def test_thumbnails_undo_the_processors_patch_layout(processor):
    """The image rebuilt from pixel_values is the processor's own normalised image, contrast-stretched."""
    image = random_image(random.Random(3))  # IMAGE_SIDE square: no resizing at these pixel bounds
    out = processor.image_processor(
        images=[image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], return_tensors="pt"
    )
    ip = processor.image_processor
    rebuilt = images_from_patches(
        out["pixel_values"], out["image_grid_thw"], ip.patch_size, ip.merge_size, ip.temporal_patch_size
    )
    assert len(rebuilt) == 2 and rebuilt[0].shape == (3, IMAGE_SIDE, IMAGE_SIDE)
    raw = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    normalised = (raw - torch.tensor(ip.image_mean)[:, None, None]) / torch.tensor(ip.image_std)[:, None, None]
    expected = (normalised - normalised.min()) / (normalised.max() - normalised.min())
    assert torch.allclose(rebuilt[0], expected, atol=1e-4)
    assert torch.allclose(rebuilt[1], expected.flip(-1), atol=1e-4)
    with pytest.raises(ValueError, match="accounts for"):
        images_from_patches(
            out["pixel_values"][:-1], out["image_grid_thw"], ip.patch_size, ip.merge_size, ip.temporal_patch_size
        )


def test_row_images_skips_rows_without_an_image():
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])  # 4 and 2 tokens after a 2x2 merge
    ids = torch.tensor([[9, 9, 9, 9, 1], [1, 1, 1, 1, 1], [9, 9, 1, 1, 1]])
    assert row_images(ids, 9, grid, 2) == [0, None, 1]
    with pytest.raises(ValueError, match="more image tokens"):
        row_images(torch.tensor([[9, 9, 9, 9, 9, 9, 9]]), 9, grid[:1], 2)


# ----------------------------------------------------------------------------- attention probe


@pytest.fixture(scope="module")
def backbone(tiny_spec):
    return build_backbone(tiny_spec)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_attention_shares_sum_to_one_and_the_bottleneck_hides_the_input(backbone, make_batch, bottleneck):
    encoder = LaMEEncoder(backbone, num_reason_tokens=3, bottleneck_mask=bottleneck).eval()
    inputs = make_batch(3)["query"]
    with torch.no_grad():
        plain = encoder(**inputs).embedding
        with last_layer_attention(backbone) as records:
            probed = encoder(**inputs).embedding
    assert text_config(backbone)._attn_implementation == "sdpa"  # restored
    assert torch.allclose(probed, plain, atol=1e-5)  # eager computes the same embedding
    weights = records[-1]
    assert weights.shape[-1] == inputs["input_ids"].shape[1] + 4
    shares = embed_attention_shares(weights, encoder.settings.layout())
    total = shares["input"] + shares["reason"] + shares["embed"]
    assert torch.allclose(total, torch.ones(3, dtype=total.dtype), atol=1e-6)
    if bottleneck:
        assert torch.equal(shares["input"], torch.zeros(3, dtype=total.dtype))
    else:
        assert bool((shares["input"] > 0).all())


@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("discriminative", dict(num_reason_tokens=0)),
        ("latent_sequential", dict(num_reason_tokens=3)),
        ("explicit_cot", dict(num_reason_tokens=2, cot_tokens=4)),
    ],
)
def test_attention_shares_follow_each_modes_layout(backbone, make_batch, mode, settings):
    """The probe's last record is the pass that ends at [EMBED], whose keys the layout accounts for."""
    encoder = LaMEEncoder(backbone, encode_mode=mode, **settings).eval()
    inputs = make_batch(3)["query"]
    with torch.no_grad(), last_layer_attention(backbone) as records:
        output = encoder(**inputs)
    layout = encoder.settings.layout(output)
    assert layout.middle == {"discriminative": 0, "latent_sequential": 3, "explicit_cot": 4}[mode]
    assert layout.middle_name == ("generated" if mode == "explicit_cot" else "reason")
    weights = records[-1]
    assert weights.shape[-1] == inputs["input_ids"].shape[1] + layout.middle + 1
    shares = embed_attention_shares(weights, layout)
    assert set(shares) == {"input", layout.middle_name, "embed"}
    total = sum(shares.values())
    assert torch.allclose(total, torch.ones(3, dtype=total.dtype), atol=1e-6)
    if mode == "discriminative":
        assert torch.equal(shares["reason"], torch.zeros(3, dtype=total.dtype))


def test_the_layout_holds_for_latent_sequential_recomputed_and_explicit_cot_stopping_at_once(backbone, make_batch):
    """The recomputed latent chain's last pass, and an explicit_cot whose every row stops at its first token."""
    from lame_pl.modes.latent_sequential import encode_latent_sequential

    inputs = make_batch(3)["query"]
    length = inputs["input_ids"].shape[1]
    sequential = LaMEEncoder(backbone, encode_mode="latent_sequential", num_reason_tokens=3).eval()
    with torch.no_grad(), last_layer_attention(backbone) as records:
        encode_latent_sequential(sequential, inputs, use_cache=False)
    assert records[-1].shape[-1] == length + sequential.settings.layout().middle + 1
    every_id = range(backbone.get_input_embeddings().num_embeddings)
    cot = LaMEEncoder(backbone, encode_mode="explicit_cot", num_reason_tokens=0, cot_tokens=5,
                      cot_stop_token_ids=every_id).eval()  # fmt: skip
    with torch.no_grad(), last_layer_attention(backbone) as records:
        output = cot(**inputs)
    layout = cot.settings.layout(output)
    assert layout.middle == 1 and records[-1].shape[-1] == length + 2
    shares = embed_attention_shares(records[-1], layout)
    assert torch.allclose(sum(shares.values()), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_explicit_cots_layout_needs_its_output():
    from lame_pl.modes import EncodeSettings

    with pytest.raises(ValueError, match="how many tokens it generated"):
        EncodeSettings.resolve("explicit_cot", 0, cot_tokens=2).layout()
    with pytest.raises(ValueError, match="cannot hold 4 reason positions"):
        TokenLayout(4).spans(4)
    with pytest.raises(ValueError, match="'discriminative' has no reason tokens"):
        EncodeSettings("discriminative", 3)  # built directly, still checked


def test_the_module_offers_what_the_callbacks_read(tiny_spec):
    from lame_pl import LaMEModule

    assert isinstance(LaMEModule(tiny_spec, None, num_reason_tokens=2, stage=2), DiagnosedModule)
    assert not isinstance(SimpleNamespace(encoder=None), DiagnosedModule)


def test_attention_probe_restores_the_implementation_after_an_error(backbone):
    with pytest.raises(RuntimeError, match="boom"), last_layer_attention(backbone):
        assert text_config(backbone)._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert text_config(backbone)._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="no transformers language_model"):
        with last_layer_attention(torch.nn.Linear(2, 2)):
            pass


def test_embed_attention_shares_on_known_weights():
    row = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])  # 2 input keys, 2 reason keys, [EMBED]
    weights = torch.zeros(1, 2, 5, 5)
    weights[0, :, -1] = row
    shares = embed_attention_shares(weights, TokenLayout(2))
    assert float(shares["input"][0]) == pytest.approx(0.3)
    assert float(shares["reason"][0]) == pytest.approx(0.45)
    assert float(shares["embed"][0]) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- callbacks


def test_first_rows_keeps_exactly_the_first_n():
    rows = FirstRows(5)
    rows.add(x=torch.arange(3), names=["a", "b", "c"])
    rows.add(x=torch.arange(3, 6), names=["d", "e", "f"])
    rows.add(x=torch.arange(6, 9), names=["g", "h", "i"])
    assert rows.tensor("x").tolist() == [0, 1, 2, 3, 4] and rows.values("names") == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="disagree"):
        FirstRows(5).add(x=torch.arange(3), names=["a"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EmbeddingHealth(num_samples=1), "EmbeddingHealth.num_samples must be an integer >= 2"),
        (lambda: SimilarityHeatmap(every_n_epochs=0), "SimilarityHeatmap.every_n_epochs must be an integer >= 1"),
        (lambda: EmbeddingHealth(collapse_threshold=1.5), "collapse_threshold must lie in"),
        (lambda: EmbeddingProjector(thumbnail_size=-1), "thumbnail_size must be an integer in"),
        (lambda: ReasonDiagnostics(num_samples="8"), "ReasonDiagnostics.num_samples"),
    ],
)
def test_bad_callback_settings_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _fake_module(dim: int = 4):
    return SimpleNamespace(logit_scale=torch.tensor(20.0))


def _outputs(query: torch.Tensor, target: torch.Tensor, reason: torch.Tensor | None = None) -> EvalOutput:
    def side(x):
        states = x.new_zeros(len(x), 0, x.shape[1]) if reason is None else reason
        # embed_state is the unprojected state: the norm statistic must read `projected`, not it.
        return EncoderOutput(F.normalize(x, dim=-1), x, torch.zeros_like(x), states)

    return EvalOutput(side(query), side(target), [str(i) for i in range(len(query))], None, {}, 0)


def test_embedding_health_statistics_and_a_single_collapse_warning(monkeypatch):
    health = EmbeddingHealth(num_samples=4)
    module = _fake_module()
    collapsed = torch.ones(4, 4) * 3.0
    health.collect(module, _outputs(collapsed, collapsed), {})
    metrics = health.statistics(module)
    assert metrics["diag/std_ratio/query"] == 0.0 and metrics["diag/effective_rank/query"] == pytest.approx(1.0)
    assert metrics["diag/norm/query"] == pytest.approx(6.0)  # ||(3, 3, 3, 3)||, measured before normalising
    assert metrics["diag/temperature"] == pytest.approx(0.05)
    assert metrics["diag/cosine/gap"] == pytest.approx(0.0, abs=1e-6)
    warned, logged = [], {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    monkeypatch.setattr("lame_pl.callbacks.embedding_health.rank_zero_warn", warned.append)
    health.report(SimpleNamespace(global_step=7), module)
    health.report(SimpleNamespace(global_step=8), module)
    assert len(warned) == 1 and "collapse alarm at step 7" in warned[0]
    assert logged == pytest.approx(metrics)


@pytest.mark.parametrize(("contrastive_weight", "alarms"), [(0.0, 0), (1.0, 1)])
def test_the_collapse_alarm_is_raised_only_where_the_contrastive_loss_is_in_force(
    monkeypatch, contrastive_weight, alarms
):
    """Stage 1 trains no embedding: its collapsed space is logged, not alarmed."""
    health = EmbeddingHealth(num_samples=4)
    module = _fake_module()
    module.stage_spec = SimpleNamespace(contrastive_loss_weight=contrastive_weight)
    module.log = lambda name, value, **kwargs: None
    collapsed = torch.ones(4, 4)
    health.collect(module, _outputs(collapsed, collapsed), {})
    warned = []
    monkeypatch.setattr("lame_pl.callbacks.embedding_health.rank_zero_warn", warned.append)
    health.report(SimpleNamespace(global_step=3), module)
    assert len(warned) == alarms


def test_reason_statistics_on_known_states():
    diagnostics = ReasonDiagnostics(num_samples=2, attention=False)
    # Sample 0: two identical states; sample 1: two orthogonal ones, norms 3 and 4.
    reason = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[3.0, 0.0], [0.0, 4.0]]])
    diagnostics.collect(_fake_module(), _outputs(torch.randn(2, 4), torch.randn(2, 4), reason), {})
    metrics = diagnostics.statistics()
    assert metrics["diag/reason/norm/token0"] == pytest.approx(2.0)
    assert metrics["diag/reason/norm/token1"] == pytest.approx(2.5)
    assert metrics["diag/reason/pairwise_cosine"] == pytest.approx(0.5)


class _Recorder(SimilarityHeatmap):
    """Reports by recording the validation run it reported on."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reported: list[int] = []

    def report(self, trainer, pl_module) -> None:
        self.reported.append(self.validations)


def _validation_run(callback, rank_zero: bool = True, sanity: bool = False, batches: int = 2) -> None:
    trainer = SimpleNamespace(is_global_zero=rank_zero, sanity_checking=sanity)
    callback.on_validation_epoch_start(trainer, None)
    for i in range(batches):
        x = torch.randn(3, 4) + i
        callback.on_validation_batch_end(trainer, None, _outputs(x, x), {}, i)
    callback.on_validation_epoch_end(trainer, None)


def test_subset_cadence_rank_zero_only_and_sanity_runs_left_out():
    callback = _Recorder(num_samples=4, every_n_epochs=2)
    _validation_run(callback, sanity=True)  # not counted
    for _ in range(5):
        _validation_run(callback)
    assert callback.reported == [0, 2, 4] and callback.rows.count == 0  # reset after each run
    other_rank = _Recorder(num_samples=4)
    _validation_run(other_rank, rank_zero=False)
    assert other_rank.reported == [] and other_rank.validations == 1  # counted alike, never reported
    resumed = _Recorder(num_samples=4, every_n_epochs=2)
    resumed.load_state_dict(callback.state_dict())
    _validation_run(resumed)
    assert resumed.reported == []  # run 5 of a cadence of 2: not due


def test_subset_takes_the_first_rows_across_batches():
    callback = SimilarityHeatmap(num_samples=4)
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False)
    callback.on_validation_epoch_start(trainer, None)
    batches = [torch.randn(3, 4) for _ in range(3)]
    for i, x in enumerate(batches):
        callback.on_validation_batch_end(trainer, None, _outputs(x, x), {}, i)
    expected = F.normalize(torch.cat(batches)[:4], dim=-1)
    assert torch.allclose(callback.rows.tensor("query"), expected)
    fresh = SimilarityHeatmap()
    fresh.on_validation_epoch_start(trainer, None)
    with pytest.raises(TypeError, match="reads the lame_pl.eval_output.EvalOutput"):
        fresh.on_validation_batch_end(trainer, SimpleNamespace(), None, {}, 0)


def test_information_is_the_loss_with_other_rows_states_minus_own_over_the_subset(tiny_spec, tiny_decoder, make_batch):
    """Only the rows that enter the subset count; identical states in every row tell the decoder nothing."""
    from lame_pl import LaMEModule

    torch.manual_seed(0)
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2).eval()
    batch = make_batch(5)
    callback = ReasonDiagnostics(num_samples=4, attention=False)
    callback.on_validation_epoch_start(SimpleNamespace(is_global_zero=True, sanity_checking=False), module)
    states = torch.randn(5, 2, 64)
    with torch.no_grad():
        callback._add_information(module, states, batch["decoder"])
        rows = {name: value[:4] for name, value in batch["decoder"].items()}
        own = module.decoder(states[:4], **rows)
        other = module.decoder(states[:4].roll(1, dims=0), **rows)
    tokens = own.num_tokens
    expected = (
        F.cross_entropy(other.logits, other.targets, reduction="sum")
        - F.cross_entropy(own.logits, own.targets, reduction="sum")
    ) / tokens
    gathered_own, gathered_other, counted = callback._information
    assert counted == tokens and (gathered_other - gathered_own) / counted == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(expected)) > 1e-4  # random states: the rows' decodes differ
    callback.on_validation_epoch_start(SimpleNamespace(is_global_zero=True, sanity_checking=False), module)
    with torch.no_grad():
        callback._add_information(module, states[:1].expand(5, -1, -1), batch["decoder"])
    own_sum, other_sum, _ = callback._information
    assert other_sum == pytest.approx(own_sum, rel=1e-6)
