"""The four encode modes: shapes, generation, the KV cache, mrope positions, gradients, config errors."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lame_pl import LaMEModule, modes
from lame_pl.backbone import build_backbone, enable_activation_checkpointing
from lame_pl.cli import build_cli
from lame_pl.model import LaMEEncoder
from lame_pl.modes import EncodeSettings, hf_generation_model
from lame_pl.modes.latent_sequential import encode_latent_sequential

ROOT = Path(__file__).resolve().parents[1]
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def random_image(rng: random.Random, side: int = 56) -> Image.Image:
    return Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))


INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def backbone(tiny_spec):
    torch.manual_seed(0)
    return build_backbone(tiny_spec).eval()


@pytest.fixture(scope="module")
def lively_backbone(tiny_spec):
    """A tiny backbone with large random weights, so that greedy decoding does not repeat one token."""
    torch.manual_seed(1)
    model = build_backbone(tiny_spec).eval()
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if "embed" in name else 0.3)
    return model


@pytest.fixture(scope="module")
def padded_images(processor):
    """Two image+text queries of different lengths: left padding and 3-D rotary positions both matter."""
    rng = random.Random(3)
    texts = [VISION + "short", VISION + "a much longer text, so that the first row is left-padded"]
    out = processor(images=[random_image(rng), random_image(rng)], text=texts, padding=True, return_tensors="pt")
    assert not bool(out["attention_mask"][0].all())
    return {k: out[k] for k in INPUT_KEYS}


MODES = [
    ("discriminative", dict(num_reason_tokens=0)),
    ("lame", dict(num_reason_tokens=3)),
    ("latent_sequential", dict(num_reason_tokens=3)),
    ("explicit_cot", dict(num_reason_tokens=0, cot_tokens=4)),
]


@pytest.mark.parametrize("mode,kwargs", MODES, ids=[m for m, _ in MODES])
def test_every_mode_gives_normalised_embeddings(mode, kwargs, backbone, make_batch):
    batch = make_batch(3)
    encoder = LaMEEncoder(backbone, encode_mode=mode, embed_dim=24, **kwargs).eval()
    for side in ("query", "target"):  # image + text, and text alone
        out = encoder(**batch[side])
        assert out.embedding.shape == (3, 24)
        assert torch.allclose(out.embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert out.reason_states.shape == (3, kwargs["num_reason_tokens"] if mode != "explicit_cot" else 0, 64)


def test_explicit_cot_generates_exactly_t_tokens(backbone, make_batch):
    encoder = LaMEEncoder(backbone, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=7).eval()
    out = encoder(**make_batch(2)["query"])
    assert out.generated_ids.shape == (2, 7)


def test_explicit_cot_matches_transformers_generate(lively_backbone, padded_images):
    """Greedy tokens equal ``generate``'s on a left-padded image batch: same cache, same mrope positions."""
    encoder = LaMEEncoder(lively_backbone, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=6).eval()
    ours = encoder(**padded_images).generated_ids
    generator = hf_generation_model(lively_backbone)
    theirs = generator.generate(**padded_images, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    theirs = theirs[:, padded_images["input_ids"].shape[1] :]
    assert len(set(ours[0].tolist())) > 1  # not one repeated token, which any position bug would also give
    assert torch.equal(ours, theirs)
    assert generator.lm_head.weight is lively_backbone.get_input_embeddings().weight


def test_explicit_cot_stops_a_row_at_a_stop_token_and_masks_the_rest(lively_backbone, padded_images):
    free = LaMEEncoder(lively_backbone, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=5).eval()
    tokens = free(**padded_images).generated_ids
    stop = int(tokens[0, 1])
    assert stop not in tokens[1].tolist()
    stopping = LaMEEncoder(
        lively_backbone, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=5, cot_stop_token_ids=[stop]
    ).eval()
    stopping.load_state_dict(free.state_dict())
    out = stopping(**padded_images)
    pad = stopping.placeholder_token_id
    assert out.generated_ids[0].tolist() == [int(tokens[0, 0]), stop, pad, pad, pad]
    assert torch.equal(out.generated_ids[1], tokens[1])
    # The stopped row's padding is masked: its embedding is the one it gets alone with T=2.
    alone = LaMEEncoder(lively_backbone, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=2).eval()
    alone.load_state_dict(free.state_dict())
    keep = padded_images["attention_mask"][0].bool()
    row0 = {k: padded_images[k][:1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    patches = padded_images["pixel_values"].shape[0] // 2  # two images of the same size
    row0.update(
        pixel_values=padded_images["pixel_values"][:patches], image_grid_thw=padded_images["image_grid_thw"][:1]
    )
    assert torch.allclose(alone(**row0).embedding[0], out.embedding[0], atol=1e-4)


def test_latent_sequential_cache_equals_recomputing_the_sequence(backbone, padded_images):
    encoder = LaMEEncoder(backbone, num_reason_tokens=4, encode_mode="latent_sequential").eval()
    cached = encode_latent_sequential(encoder, padded_images, use_cache=True)
    full = encode_latent_sequential(encoder, padded_images, use_cache=False)
    assert torch.allclose(cached.reason_states, full.reason_states, atol=1e-4)
    assert torch.allclose(cached.embed_state, full.embed_state, atol=1e-4)
    # And the steps are really sequential: the states differ from step to step.
    assert not torch.allclose(cached.reason_states[:, 0], cached.reason_states[:, 1], atol=1e-3)


def test_latent_sequential_drops_to_recomputation_under_activation_checkpointing(tiny_spec, padded_images):
    torch.manual_seed(0)
    model = build_backbone(tiny_spec)
    encoder = LaMEEncoder(model, num_reason_tokens=2, encode_mode="latent_sequential")
    reference = encoder.eval()(**padded_images).embedding.detach()
    enable_activation_checkpointing(model)
    # In training, transformers would drop the cache under checkpointing; the mode must not notice.
    trained = encoder.train()(**padded_images).embedding
    assert torch.allclose(trained, reference, atol=1e-4)


@pytest.mark.parametrize("mode", ["lame", "latent_sequential"])
def test_gradients_reach_every_reason_vector(mode, backbone, make_batch):
    encoder = LaMEEncoder(backbone, num_reason_tokens=3, encode_mode=mode).train()
    out = encoder(**make_batch(2)["query"])
    (out.embedding.sum() + out.reason_states.square().sum()).backward()
    grad = encoder.reason_embeddings.grad
    assert grad is not None and bool((grad.abs().sum(dim=1) > 0).all())
    assert encoder.embed_embedding.grad.abs().sum() > 0
    encoder.zero_grad()
    backbone.zero_grad()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_reason_tokens=2, encode_mode="discriminative"), "set num_reason_tokens to 0"),
        (dict(num_reason_tokens=0, encode_mode="lame"), "'lame' needs num_reason_tokens > 0"),
        (dict(num_reason_tokens=0, encode_mode="latent_sequential"), "'latent_sequential' needs num_reason_tokens"),
        (dict(num_reason_tokens=2, encode_mode="latent_sequential", bottleneck_mask=True), "bottleneck_mask applies"),
        (dict(num_reason_tokens=0, encode_mode="explicit_cot"), "needs cot_tokens >= 1"),
        (dict(num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=0), "needs cot_tokens >= 1"),
        (dict(num_reason_tokens=2, cot_tokens=5), "only encode_mode 'explicit_cot'"),
        (dict(num_reason_tokens=2, encode_mode="coconut"), "encode_mode 'coconut' is unknown"),
    ],
)
def test_bad_mode_settings_are_refused(kwargs, message, backbone):
    with pytest.raises(ValueError, match=message):
        LaMEEncoder(backbone, **kwargs)


def test_default_mode_follows_k():
    assert EncodeSettings.resolve(None, 8).mode == "lame"
    assert EncodeSettings.resolve(None, 0).mode == "discriminative"
    assert EncodeSettings.resolve(None, 2, bottleneck_mask=True).mode == "lame"


def test_every_mode_has_one_encoder():
    assert tuple(modes.ENCODERS) == modes.MODES


def test_the_module_checks_the_mode_settings_once_and_hands_them_to_the_encoder(tiny_spec, monkeypatch):
    calls = []
    resolve = EncodeSettings.resolve.__func__

    def counted(cls, *args, **kwargs):
        calls.append(args)
        return resolve(cls, *args, **kwargs)

    monkeypatch.setattr(EncodeSettings, "resolve", classmethod(counted))
    module = LaMEModule(tiny_spec, None, num_reason_tokens=2, stage=2)
    assert len(calls) == 1  # the module's check; the encoder takes the object as it is
    assert module.encoder.settings == EncodeSettings("lame", 2)


def test_explicit_cot_refuses_to_train(backbone, make_batch):
    encoder = LaMEEncoder(backbone, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=2).train()
    with pytest.raises(RuntimeError, match="'explicit_cot' is inference only"):
        encoder(**make_batch(2)["query"])


def test_module_validates_and_passes_the_mode(tiny_spec, tiny_decoder):
    with pytest.raises(ValueError, match="'discriminative' has no reason tokens, but model.num_reason_tokens is 2"):
        LaMEModule(tiny_spec, None, num_reason_tokens=2, encode_mode="discriminative", stage=2)
    # A checkpoint trained with a decoder can be encoded with explicit_cot: the decoder stays, unused.
    kept = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, encode_mode="explicit_cot", cot_tokens=3)
    assert kept.decoder is not None and kept.encoder.encode_mode == "explicit_cot"
    module = LaMEModule(tiny_spec, None, num_reason_tokens=0, encode_mode="explicit_cot", cot_tokens=3, stage=2)
    assert module.encoder.encode_mode == "explicit_cot" and module.encoder.settings.cot_tokens == 3
    assert module.encoder.cot_stop_token_ids  # the tokenizer's end-of-text ids
    assert LaMEModule(tiny_spec, None, num_reason_tokens=0, stage=2).encoder.encode_mode == "discriminative"


def test_module_trains_a_step_in_latent_sequential(tiny_spec, tiny_decoder, make_batch):
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, encode_mode="latent_sequential", stage=2, lr=1e-3)
    optimizer = module.configure_optimizers()
    before = module.encoder.reason_embeddings.detach().clone()
    loss, terms, _ = module.model_step(make_batch(4), "train")
    assert set(terms) == {"contrastive", "decoder"} and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, module.encoder.reason_embeddings.detach())


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(8, 4, 4, 8)


def _fit(shards: Path, tmp_path: Path, *flags: str):
    data = [f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")]
    return build_cli(
        [
            "fit",
            f"--config={ROOT / 'tests' / 'conf' / 'tiny.yaml'}",
            *data,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            *flags,
        ]
    )


def test_cli_fits_in_latent_sequential_and_refuses_explicit_cot(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning"])
    cli = _fit(shards, tmp_path, "--model.init_args.encode_mode=latent_sequential")
    assert cli.trainer.global_step == 1 and cli.model.encoder.encode_mode == "latent_sequential"
    with pytest.raises(RuntimeError, match="'explicit_cot' is inference only"):
        _fit(
            shards,
            tmp_path,
            "--model.init_args.encode_mode=explicit_cot",
            "--model.init_args.cot_tokens=2",
            "--model.init_args.num_reason_tokens=0",
            "--model.init_args.decoder=null",
            "--model.init_args.stage=2",
        )


def test_a_checkpoint_is_tested_in_the_encode_mode_given_for_the_run(shards, tmp_path, monkeypatch):
    """LightningCLI restores a checkpoint's hyper-parameters over the config; encode settings are the exception."""
    monkeypatch.setattr(sys, "argv", ["lightning"])
    _fit(
        shards,
        tmp_path,
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
    )
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    data = [f"--data.init_args.{split}_shards={shards / split}" for split in ("train", "val", "test")]
    common = [
        "test",
        f"--config={ROOT / 'tests' / 'conf' / 'tiny.yaml'}",
        *data,
        f"--ckpt_path={ckpt}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert build_cli(common).model.encoder.encode_mode == "lame"
    sequential = build_cli([*common, "--model.init_args.encode_mode=latent_sequential"])
    assert sequential.model.encoder.encode_mode == "latent_sequential"
    cot = build_cli([*common, "--model.init_args.encode_mode=explicit_cot", "--model.init_args.cot_tokens=2"])
    assert cot.model.encoder.encode_mode == "explicit_cot" and cot.model.encoder.settings.cot_tokens == 2
    metrics = cot.trainer.callback_metrics
    assert "test/recall@1" in metrics and "test/loss/decoder" not in metrics


def test_an_encoder_takes_its_mode_settings_from_one_source(backbone):
    settings = EncodeSettings.resolve("latent_sequential", 2)
    assert LaMEEncoder(backbone, settings=settings).settings is settings
    assert LaMEEncoder(backbone).settings == EncodeSettings("lame", 8)  # the documented defaults
    with pytest.raises(TypeError, match="not both"):
        LaMEEncoder(backbone, num_reason_tokens=8, settings=settings)
