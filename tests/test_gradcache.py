"""GradCache: chunks of rows give the gradients of the full batch, in one process and through the Trainer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, random_image
from lightning import Trainer

from lame_pl import LaMEModule, LoraSpec
from lame_pl.callbacks import DataHealth
from lame_pl.datamodules.collate import PairCollator
from lame_pl.gradcache import HostBatch, gradcache_step
from lame_pl.model import LaMEEncoder
from lame_pl.prompt import PromptProcessor, Side
from lame_pl.row_chunks import split_rows
from lame_pl.stages import Stage2Spec

ROWS = 7  # a chunk size of 3 leaves a short last chunk


@pytest.fixture(scope="module")
def batch(processor) -> dict:
    """Image queries, captions of different lengths, two hard negatives, three unlabelled rows."""
    rng = random.Random(0)
    samples = [
        {"key": f"{i}", "image": random_image(rng), "text": CAPTIONS[i % 4] + " and more" * i} for i in range(ROWS)
    ]
    out = PairCollator(processor, "Find the caption of this image.")(samples)
    out["negative"] = PromptProcessor(processor, 64)([Side("", "a black hexagon"), Side("", CAPTIONS[2][::-1])])
    out["decoder"]["labelled"] = torch.tensor([True, False, True, True, False, True, False])
    return out


def gradients(module: LaMEModule, batch: dict, chunk: int | None) -> tuple[float, dict[str, torch.Tensor]]:
    """The step's loss and every trainable parameter's gradient, with or without GradCache."""
    module.zero_grad(set_to_none=True)
    if chunk is None:
        loss, _, _ = module.model_step(batch, "train")
    else:
        loss, _ = gradcache_step(module, batch, chunk)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def assert_same(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 0.0
) -> None:
    """Equal to ``rtol`` of each tensor's largest entry (plus ``atol``)."""
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert (grad - got[name]).abs().max() <= rtol * scale + atol, name


CASES = {
    "stage 2, learnable temperature": dict(stage=2, learnable_temperature=True),
    "stage 1 (decoder loss only)": dict(stage=1),
    "stage 2, DoRA": dict(stage=2, stage2=Stage2Spec(lora=LoraSpec(dropout=0.0))),
    "stage 2, activation checkpointing": dict(stage=2, gradient_checkpointing=True),
}


@pytest.mark.parametrize("kwargs", CASES.values(), ids=CASES.keys())
def test_gradients_equal_those_of_the_full_batch(tiny_spec, tiny_decoder, batch, kwargs):
    torch.manual_seed(0)
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, **kwargs)
    full_loss, full = gradients(module, batch, None)
    for chunk in (3, 1, ROWS):
        loss, chunked = gradients(module, batch, chunk)
        assert loss == pytest.approx(full_loss, rel=1e-5)
        assert_same(full, chunked)
    assert any(g.abs().max() > 0 for g in full.values())


@pytest.mark.parametrize(
    "mode",
    [
        dict(),
        # Activation checkpointing drops latent_sequential's KV cache in training: the pass without
        # gradients must take the same recomputing path, with the same dropout draws.
        dict(encode_mode="latent_sequential", gradient_checkpointing=True),
    ],
    ids=["lame", "latent_sequential with checkpointing"],
)
def test_dropout_is_replayed_so_both_passes_agree(tiny_spec, tiny_decoder, batch, mode):
    """With adapter dropout, the gradient is that of the chunks encoded once, in pass 1's random order."""
    torch.manual_seed(0)
    module = LaMEModule(
        tiny_spec,
        tiny_decoder,
        num_reason_tokens=2,
        stage=2,
        stage2=Stage2Spec(lora=LoraSpec(dropout=0.5, init="kaiming")),
        **mode,
    )
    # B starts at 0, so the adapters' dropout would change nothing: move B first.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    spec = module.stage_spec
    chunk = 3
    # Reference: the same chunks, encoded once with a graph in pass 1's order (query, target,
    # negative chunks), the loss of the whole batch on them.
    torch.manual_seed(1)
    module.zero_grad(set_to_none=True)
    outs = {
        name: [module.encode(part) for part in split_rows(batch[name], chunk, 2)]
        for name in ("query", "target", "negative")
    }
    emb = {name: torch.cat([o.embedding for o in parts]) for name, parts in outs.items()}
    contrastive = module.criterion.contrastive(emb["query"], emb["target"], emb["negative"], module.logit_scale, True)
    labels = batch["decoder"]
    tokens = int(labels["attention_mask"][labels["labelled"]].sum())
    decoder = sum(
        module.criterion.decoder(
            module.decoder(o.reason_states, **{k: v[i * chunk : (i + 1) * chunk] for k, v in labels.items()}), tokens
        )
        for i, o in enumerate(outs["query"])
    )
    (spec.contrastive_loss_weight * contrastive + spec.decoder_loss_weight * decoder).backward()
    reference = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    _, cached = gradients(module, batch, chunk)
    assert_same(reference, cached)
    torch.manual_seed(1)
    _, plain = gradients(module, batch, None)  # other dropout masks: the test can tell
    adapters = [n for n in plain if "lora_A" in n]
    assert max((plain[n] - cached[n]).abs().max() / cached[n].abs().max() for n in adapters) > 1e-2


def test_bf16_autocast_steps_match_to_bf16_precision(tiny_spec, tiny_decoder, batch):
    torch.manual_seed(0)
    module = LaMEModule(tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full_loss, full = gradients(module, batch, None)
        loss, chunked = gradients(module, batch, 3)
    assert loss == pytest.approx(full_loss, rel=2e-2)
    cosine = [
        torch.nn.functional.cosine_similarity(full[n].flatten(), chunked[n].flatten(), dim=0)
        for n in full
        if full[n].abs().max() > 0
    ]
    assert min(cosine) > 0.98


# ----------------------------------------------------------------------------- row chunks


def _frames(seed: int, n: int = 2, side: int = 28) -> list:
    rng = random.Random(seed)
    return [random_image(rng, side) for _ in range(n)]


def test_chunks_of_a_mixed_batch_embed_as_the_whole_batch(tiny_spec, processor):
    """Rows with no image, one, two (of other sizes) and a video: each chunk carries exactly its rows' media."""
    rng = random.Random(3)
    sides = [
        Side("Represent the image.", "", (random_image(rng),)),
        Side("", "only text here, longer than the others by a good many words"),
        Side("Two images:", "", (random_image(rng, 28), random_image(rng, 84))),
        Side("A video:", "", video=_frames(1)),
        Side("", "short"),
        Side("Image and video.", "", (random_image(rng),), video=_frames(2, 4)),
    ]
    inputs = PromptProcessor(processor, 64)(sides)
    torch.manual_seed(0)
    from lame_pl.backbone import build_backbone

    encoder = LaMEEncoder(build_backbone(tiny_spec), num_reason_tokens=2).eval()
    with torch.no_grad():
        whole = encoder(**inputs).embedding
        for size in (1, 2, 4):
            chunks = split_rows(inputs, size, encoder.spatial_merge_size)
            assert [c["input_ids"].shape[0] for c in chunks] == [
                min(size, len(sides) - s) for s in range(0, len(sides), size)
            ]
            parts = torch.cat([encoder(**c).embedding for c in chunks])
            torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-4)
    # Leading padding that no row of a chunk needs is dropped.
    short = split_rows(inputs, 1, 2)[4]
    assert bool(short["attention_mask"].all()) and short["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    assert "pixel_values" not in short and "pixel_values_videos" not in split_rows(inputs, 1, 2)[2]


def test_inputs_that_cannot_be_cut_are_refused(processor):
    rng = random.Random(0)
    inputs = PromptProcessor(processor, 64)([Side("", "x", (random_image(rng),)), Side("", "y")])
    with pytest.raises(ValueError, match=r"cannot cut processor inputs \['position_ids'\]"):
        split_rows({**inputs, "position_ids": inputs["input_ids"]}, 1, 2)
    with pytest.raises(ValueError, match="spatial merge size 4"):
        split_rows(inputs, 1, 4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        split_rows(inputs, 0, 2)


def test_a_chunk_size_below_one_is_refused(tiny_spec):
    with pytest.raises(ValueError, match="gradcache_chunk_size must be >= 1"):
        LaMEModule(tiny_spec, None, num_reason_tokens=0, gradcache_chunk_size=0)


# ----------------------------------------------------------------------------- through the Trainer


def _fit_one_update(tiny_spec, tiny_decoder, batches: list[dict], chunk: int | None, **trainer_kwargs) -> dict:
    """How one optimiser update (SGD, lr 1: the update is the clipped gradient) moved each trainable parameter."""
    torch.manual_seed(0)
    module = LaMEModule(
        tiny_spec, tiny_decoder, num_reason_tokens=2, stage=2, learnable_temperature=True, gradcache_chunk_size=chunk
    )
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    # AdamW's first update is about lr * sign(gradient): it would amplify float noise in gradients
    # that are 0 in exact arithmetic (a key bias's).
    module.configure_optimizers = lambda: torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, loader)
    return {n: p.detach() - start[n] for n, p in module.named_parameters() if p.requires_grad}


def test_one_update_with_accumulation_and_clipping_equals_the_plain_one(tiny_spec, tiny_decoder, batch, processor):
    """Lightning zeroes the gradients after ``training_step``; the GradCache step's chunks must survive it,
    be accumulated over two batches and clipped as one gradient."""
    rng = random.Random(5)
    second = PairCollator(processor, "Find the caption of this image.")(
        [{"key": f"b{i}", "image": random_image(rng), "text": CAPTIONS[(i + 1) % 4]} for i in range(5)]
    )
    options = dict(accumulate_grad_batches=2, gradient_clip_val=0.05)
    plain = _fit_one_update(tiny_spec, tiny_decoder, [batch, second], None, **options)
    cached = _fit_one_update(tiny_spec, tiny_decoder, [batch, second], 2, **options)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in plain.values()]))
    assert norm.item() == pytest.approx(0.05, rel=1e-3)  # clipped, so the gradient was larger
    # Updates are differences of float32 weights (~0.02): they resolve ~2e-9.
    assert_same(plain, cached, rtol=1e-3, atol=1e-8)
    # Without accumulation the update is the first batch's alone: the second batch counted above.
    alone = _fit_one_update(tiny_spec, tiny_decoder, [batch], 2, gradient_clip_val=0.05)
    assert max((alone[n] - cached[n]).abs().max() for n in cached) > 1e-4


def test_ddp_passes_the_host_batch_as_is():
    """DDP on a GPU (``device_ids`` set) moves its forward's inputs to its device before the module
    sees them; the batch GradCache keeps in host memory must reach ``training_step`` untouched."""
    from torch.distributed.utils import _to_kwargs

    rows = {"query": {"input_ids": torch.ones(2, 3, dtype=torch.long)}, "keys": ["a", "b"]}
    host = HostBatch(rows)
    moved, _ = _to_kwargs((host, 0), None, torch.device("cuda", 0), False)
    assert moved[0][0] is host and host["query"]["input_ids"].device.type == "cpu"
    assert dict(host) == rows and "query" in host and host.get("skipped") is None
    if not torch.cuda.is_available():  # the same batch as a dict is moved (here: fails to be)
        with pytest.raises((AssertionError, RuntimeError)):
            _to_kwargs((rows, 0), None, torch.device("cuda", 0), False)


def test_the_trainer_hands_a_gradcache_step_a_host_batch_that_callbacks_read(tiny_spec, tiny_decoder, batch):
    class Seen(DataHealth):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch_type = type(batch)

    seen = Seen()
    _fit_one_update(tiny_spec, tiny_decoder, [dict(batch, skipped={"bad_image": 2})], 3, callbacks=[seen])
    assert seen.batch_type is HostBatch
    assert seen.train_total == {"bad_image": 2}


# ----------------------------------------------------------------------------- two processes


def test_two_process_gradients_equal_the_single_process_global_batch(tmp_path):
    """Each rank holds half the rows, different numbers of labelled rows, and one rank all the hard
    negatives; the synchronised gradient equals the one-process gradient of the whole batch: DDP and
    FSDP2 (ModelParallelStrategy), each with and without GradCache."""
    script = Path(__file__).with_name("gradcache_ddp_run.py")
    grads, losses = {}, {}
    # Two launches: the one process, then two ranks that run DDP and FSDP2, each with GradCache and without.
    for devices, strategies, chunks in ((1, ["ddp"], [0]), (2, ["ddp", "fsdp"], [2, 0])):
        out = tmp_path / f"{devices}-process"
        out.mkdir()
        run = subprocess.run(
            [
                sys.executable,
                str(script),
                "--devices",
                str(devices),
                "--strategy",
                ",".join(strategies),
                "--chunk",
                ",".join(map(str, chunks)),
                "--out",
                str(out),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        for strategy in strategies:
            for chunk in chunks:
                saved = out if devices == 1 else out / f"{strategy}-{chunk}"
                grads[devices, strategy, chunk] = torch.load(saved / "grads.pt", weights_only=True)
                losses[devices, strategy, chunk] = json.loads((saved / "losses.json").read_text())
    reference = grads.pop((1, "ddp", 0))
    # What the ranks log is the global batch's loss, term by term.
    logged = losses.pop((1, "ddp", 0))
    assert set(logged) == {"train/loss", "train/loss/contrastive", "train/loss/decoder"}
    for run, got in losses.items():
        assert got.keys() == logged.keys() and all(got[k] == pytest.approx(v, rel=1e-5) for k, v in logged.items()), run
    assert len(reference) > 40 and "log_logit_scale" in reference
    for run, got in grads.items():
        try:
            assert_same(reference, got)
        except AssertionError as err:
            raise AssertionError(f"run {run}: {err}") from None
