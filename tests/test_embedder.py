"""LaMEEmbedder and self-contained checkpoints, on tiny checkpoints trained for one step."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, random_image

from lame_pl.backbone import qwen2_tokenizer
from lame_pl.checkpoint import DECODER_OUTPUT_IDS
from lame_pl.embedder import LaMEEmbedder
from lame_pl.stages import LoraSpec, Stage2Spec

VOCAB = "vocab.json"  # relative, as the demo's decoder.vocab_file is
INSTRUCTION = "Find the caption of this image."


def _train(module, batch, path: Path, perturb_adapters: bool = False) -> Path:
    """One optimiser step through the Trainer, then ``trainer.save_checkpoint``."""
    from lightning import Trainer

    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    if perturb_adapters:  # one step leaves DoRA close to its base: move it, so that the merge matters
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
                elif "lora_magnitude" in name:
                    param.mul_(1.2)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def trained(module_tmp, tiny_spec, tiny_decoder, make_batch) -> dict[str, Path]:
    """Tiny checkpoints written from a training folder holding the relative ``vocab.json`` and
    ``init.ckpt`` they name: ``plain`` (stage 2, full weights) and ``dora`` (stage 2, DoRA)."""
    from lame_pl import LaMEModule

    root = module_tmp("train")
    tokenizer = qwen2_tokenizer()
    ids = {tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    for caption in CAPTIONS:
        ids.update(tokenizer(caption)["input_ids"])
    (root / VOCAB).write_text(json.dumps(sorted(ids)))
    batch = make_batch(4)
    here = os.getcwd()
    os.chdir(root)
    try:
        decoder = type(tiny_decoder)(preset="tiny", vocab_file=VOCAB)
        common = dict(backbone=tiny_spec, decoder=decoder, num_reason_tokens=2, lr=1e-2)
        _train(LaMEModule(stage=1, **common), batch, root / "init.ckpt")
        plain = _train(LaMEModule(stage=2, init_from="init.ckpt", **common), batch, root / "plain.ckpt")
        dora = Stage2Spec(lora=LoraSpec(r=4, alpha=8, dropout=0.0, use_dora=True))
        adapted = _train(
            LaMEModule(stage=2, stage2=dora, embed_dim=24, **common), batch, root / "dora.ckpt", perturb_adapters=True
        )
    finally:
        os.chdir(here)
    return {"root": root, "plain": plain, "dora": adapted}


def _rows(tmp_path: Path) -> dict:
    """Text-only, image-only and text+image rows; one image given as a path."""
    rng = random.Random(1)
    image = random_image(rng)
    path = tmp_path / "scene.png"
    random_image(rng).save(path)
    return dict(
        texts=["a red circle at the top left", "", "two blue squares in the center"],
        images=[None, image, str(path)],
        instructions=["", INSTRUCTION, INSTRUCTION],
    )


def _module_embeddings(checkpoint: Path, embedder: LaMEEmbedder, rows: dict) -> torch.Tensor:
    """What the Lightning module itself embeds for the same rows, through the same prompt builder."""
    from lame_pl import LaMEModule

    module = LaMEModule.load_from_checkpoint(str(checkpoint), map_location="cpu").eval()
    with torch.no_grad():
        return module.encode(embedder.prompts(embedder.sides(**rows))).embedding


@pytest.mark.parametrize("name", ["plain", "dora"])
def test_embedder_from_a_checkpoint_equals_the_lightning_module(trained, name, tmp_path):
    embedder = LaMEEmbedder.from_checkpoint(trained[name], device="cpu")
    rows = _rows(tmp_path)
    got = embedder.encode(**rows, batch_size=2)
    assert got.dtype == torch.float32 and got.shape == (3, embedder.embedding_dim)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    expected = _module_embeddings(trained[name], embedder, rows)
    assert (got - expected).abs().max() <= 1e-5
    if name == "dora":  # merged: plain linear layers, no adapter left
        assert embedder.embedding_dim == 24
        assert not any("lora_" in n for n, _ in embedder.encoder.named_parameters())


def test_embedder_rows_take_text_image_or_both_and_instructions_matter(trained, tmp_path):
    embedder = LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu")
    rng = random.Random(3)
    image = random_image(rng)
    path = tmp_path / "img.png"
    image.save(path)
    both = embedder.encode(texts=["a caption", "a caption"], images=[image, str(path)], instructions=INSTRUCTION)
    assert torch.allclose(both[0], both[1], atol=1e-5)  # a PIL image and its file embed alike
    alone = embedder.encode(images=[image])
    text = embedder.encode(texts=["a caption"])
    assert not torch.allclose(both[0], alone[0], atol=1e-3) and not torch.allclose(both[0], text[0], atol=1e-3)
    plain = embedder.encode(texts=["a caption"], instructions=["Represent the text:"])
    assert not torch.allclose(plain, text, atol=1e-3)
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        embedder.encode(texts=["a", "b"], images=[image])
    with pytest.raises(ValueError, match="3 instructions for 1 rows"):
        embedder.encode(texts=["a"], instructions=["x", "y", "z"])
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        embedder.encode(images=[str(tmp_path / "nowhere.png")])
    with pytest.raises(TypeError, match="lists"):
        embedder.encode(texts="a caption")


def test_encode_mode_comes_from_the_model_and_can_be_overridden(trained):
    default = LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu")
    assert (default.encode_mode, default.num_reason_tokens) == ("lame", 2)
    sequential = LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu", encode_mode="latent_sequential")
    assert sequential.encode_mode == "latent_sequential"
    texts = ["two blue squares in the center"]
    assert not torch.allclose(default.encode(texts=texts), sequential.encode(texts=texts), atol=1e-4)
    with pytest.raises(ValueError, match="'discriminative' has no reason tokens"):
        LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu", encode_mode="discriminative")


def test_a_checkpoint_loads_and_embeds_away_from_the_files_its_run_named(trained, tmp_path, monkeypatch):
    """Neither vocab.json nor init.ckpt (both relative) is reachable: the checkpoint carries what it needs."""
    from lame_pl import LaMEModule

    copy = tmp_path / "moved" / "model.ckpt"
    copy.parent.mkdir()
    shutil.copy(trained["plain"], copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    module = LaMEModule.load_from_checkpoint(str(copy), map_location="cpu").eval()
    trained_ids = json.loads((trained["root"] / VOCAB).read_text())
    assert module.decoder.restricted and module.decoder.output_ids.tolist() == trained_ids
    assert module.hparams.init_from is None
    embedder = LaMEEmbedder.from_checkpoint(copy, device="cpu")
    rows = _rows(tmp_path)
    expected = _module_embeddings(copy, embedder, rows)
    assert (embedder.encode(**rows) - expected).abs().max() <= 1e-5


def test_an_older_checkpoint_without_stored_ids_reads_its_vocab_file_or_names_it(trained, tmp_path, monkeypatch):
    from lame_pl import LaMEModule

    checkpoint = torch.load(trained["plain"], map_location="cpu", weights_only=True)
    ids = checkpoint["state_dict"].pop(DECODER_OUTPUT_IDS)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    monkeypatch.chdir(trained["root"])  # where its relative vocab.json is
    module = LaMEModule.load_from_checkpoint(str(old), map_location="cpu")
    assert torch.equal(module.decoder.output_ids, ids)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"decoder.vocab_file 'vocab.json' is not a file from "):
        LaMEModule.load_from_checkpoint(str(old), map_location="cpu")
    # Embedding builds no decoder, so it needs no vocabulary file at all.
    assert LaMEEmbedder.from_checkpoint(old, device="cpu").encode(texts=["a"]).shape[0] == 1


def test_init_from_takes_weights_but_keeps_this_runs_output_ids(trained, tiny_spec, tmp_path):
    """A stage-2 run started from a checkpoint uses its own vocabulary, whatever the checkpoint stored."""
    from lame_pl import LaMEModule
    from lame_pl.backbone import DecoderSpec

    (tmp_path / "small.json").write_text(json.dumps([0, 1, 2, 151643]))
    module = LaMEModule(
        backbone=tiny_spec,
        decoder=DecoderSpec(preset="tiny", vocab_file=str(tmp_path / "small.json")),
        num_reason_tokens=2,
        stage=2,
        init_from=str(trained["plain"]),
    )
    assert module.decoder.output_ids.tolist() == [0, 1, 2, 151643]
    saved = torch.load(trained["plain"], map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(module.encoder.reason_embeddings, saved["encoder.reason_embeddings"])


def test_explain_decodes_the_reason_states_with_the_checkpoints_decoder(trained, tmp_path):
    """explain() runs the checkpoint's decoder greedily on the reason states the module computes."""
    from lame_pl import LaMEModule
    from lame_pl.latent_text import decode_reason_states

    embedder = LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu")
    assert embedder.decoder is None  # embedding never loads it
    decoder = embedder.load_decoder()
    seen = []
    generate = decoder.generate
    decoder.generate = lambda states, **kw: seen.append(states) or generate(states, **kw)
    rows = _rows(tmp_path)
    texts = embedder.explain(**rows, max_tokens=6)
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts)
    module = LaMEModule.load_from_checkpoint(str(trained["plain"]), map_location="cpu").eval()
    with torch.no_grad():
        states = module.encode(embedder.prompts(embedder.sides(**rows))).reason_states
        expected = decode_reason_states(module.decoder, embedder.processor.tokenizer, states, max_tokens=6)
    assert len(seen) == 1 and torch.allclose(seen[0], states, atol=1e-5)
    assert texts == expected
    # The same weights as the module's decoder (a one-step model writes much the same text for every input).
    module_state = {k: v for k, v in module.decoder.state_dict().items()}
    assert all(torch.equal(v, module_state[k]) for k, v in decoder.state_dict().items())
    embedder.set_encode_mode("explicit_cot", cot_tokens=2)  # K = 2, but no reason states in this mode
    with pytest.raises(ValueError, match="encode_mode 'explicit_cot' with K = 2 yields no reason states"):
        embedder.explain(**rows)


def test_rows_are_laid_out_as_the_training_collator_lays_them_out(trained, processor):
    """The embedder's inputs for an image + instruction and for a caption are the training batch's, token for token."""
    from lame_pl.datamodules.collate import PairCollator

    embedder = LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu")
    rng = random.Random(7)
    samples = [{"key": str(i), "image": random_image(rng), "text": CAPTIONS[i]} for i in range(3)]
    batch = PairCollator(processor, INSTRUCTION)(samples)
    queries = embedder.prompts(embedder.sides(images=[s["image"] for s in samples], instructions=INSTRUCTION))
    targets = embedder.prompts(embedder.sides(texts=[s["text"] for s in samples]))
    for got, expected in ((queries, batch["query"]), (targets, batch["target"])):
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_a_checkpoint_of_a_local_backbone_embeds_without_that_folder(tmp_path, make_batch, tiny_decoder, monkeypatch):
    """The backbone folder's configs and processor files travel in the checkpoint; its weights are the checkpoint's."""
    from transformers import Qwen2VLForConditionalGeneration

    from lame_pl import BackboneSpec, LaMEModule
    from lame_pl.backbone import backbone_config, build_processor

    folder = tmp_path / "vlm"
    Qwen2VLForConditionalGeneration(backbone_config("tiny", "sdpa")).save_pretrained(folder)
    build_processor(BackboneSpec(preset="tiny", min_pixels=3136, max_pixels=3136)).save_pretrained(folder)
    spec = BackboneSpec(path=str(folder), min_pixels=3136, max_pixels=3136)
    module = LaMEModule(backbone=spec, decoder=tiny_decoder, num_reason_tokens=2, stage=2)
    checkpoint = _train(module, make_batch(4), tmp_path / "local.ckpt")
    expected = LaMEEmbedder.from_checkpoint(checkpoint, device="cpu").encode(texts=["a red circle at the top left"])
    shutil.rmtree(folder)
    monkeypatch.setenv("LAME_PL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match=r"backbone.path .*vlm' is not here: the backbone's configs and processor"):
        embedder = LaMEEmbedder.from_checkpoint(checkpoint, device="cpu")
    assert torch.equal(embedder.encode(texts=["a red circle at the top left"]), expected)
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "cache").rglob("*"))  # no weights copied
