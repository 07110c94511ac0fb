"""The exported folder: written by tools/export.py, read without Lightning, equal to the module."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_embedder import _module_embeddings, _rows, trained  # noqa: F401 (trained is a fixture)

from lame_pl.embedder import LaMEEmbedder
from lame_pl.export import FORMAT, read_decoder

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle at the top left", "two blue squares in the center"]


def readme_snippet() -> str:
    """The Python block of the README's "Using a trained model" section, as written."""
    section = (ROOT / "README.md").read_text().split("## Using a trained model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def export_tool(*args: str) -> int:
    """tools/export.py run as ``__main__`` in this process; its exit status."""
    argv = sys.argv
    sys.argv = ["export.py", *args]
    try:
        runpy.run_path(str(ROOT / "tools" / "export.py"), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
    return 0


@pytest.mark.parametrize("name", ["plain", "dora"])
def test_the_exported_folder_embeds_as_the_lightning_module(trained, name, tmp_path):  # noqa: F811
    out = tmp_path / "exported"
    assert export_tool("--checkpoint", str(trained[name]), "--out", str(out)) == 0
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    lame = json.loads((out / "config.json").read_text())["lame"]
    assert lame["format"] == FORMAT and lame["num_reason_tokens"] == 2 and lame["encode_mode"] == "lame"
    assert lame["decoder"] is None and (lame["merged_adapters"] is not None) == (name == "dora")
    weights = load_file(str(out / "model.safetensors"))
    assert "lame.reason_embeddings" in weights and "lame.embed_embedding" in weights
    assert not any(k.startswith("decoder.") or "lora_" in k for k in weights)  # decoder left out, adapters merged
    # The backbone under Hugging Face's own names: transformers loads the trained backbone alone.
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(str(out), local_files_only=True)
    loaded = backbone.state_dict()
    backbone_keys = [k for k in weights if not k.startswith("lame.")]
    assert backbone_keys and all(torch.equal(loaded[k], weights[k]) for k in backbone_keys)
    card = (out / "README.md").read_text()
    assert "| reason tokens (K) | 2 |" in card and "LaMEEmbedder.from_pretrained" in card

    embedder = LaMEEmbedder.from_pretrained(out, device="cpu")
    assert embedder.embedding_dim == (24 if name == "dora" else 64)
    rows = _rows(tmp_path)
    got = embedder.encode(**rows)
    expected = _module_embeddings(trained[name], embedder, rows)
    assert (got - expected).abs().max() <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(got)), atol=1e-5)


def test_export_refuses_a_non_empty_folder_and_keeps_the_decoder_when_asked(trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_tool("--checkpoint", str(trained["plain"]), "--out", str(out)) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert export_tool("--checkpoint", str(trained["plain"]), "--out", str(out), "--with-decoder", "--overwrite") == 0
    assert not (out / "notes.txt").exists()
    decoder = read_decoder(out)
    saved = torch.load(trained["plain"], map_location="cpu", weights_only=True)["state_dict"]
    state = decoder.state_dict()
    for key, value in saved.items():
        if key.startswith("decoder."):
            assert torch.equal(state[key.removeprefix("decoder.")], value), key
    assert decoder.restricted and torch.equal(decoder.output_ids, saved["decoder.output_ids"])
    assert export_tool("--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")) == 2
    assert "missing.ckpt' is not a file" in capsys.readouterr().err


BLOCKED = """
import sys
for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
    sys.modules[name] = None  # any import of them now fails
import torch
from lame_pl import LaMEEmbedder

checkpoint, folder, out = sys.argv[1:4]
texts = {texts!r}
from_checkpoint = LaMEEmbedder.from_checkpoint(checkpoint, device="cpu").encode(texts=texts)
from_folder = LaMEEmbedder.from_pretrained(folder, device="cpu").encode(texts=texts)
torch.save({{"checkpoint": from_checkpoint, "folder": from_folder}}, out)
"""


def test_the_embedder_runs_with_lightning_blocked(trained, tmp_path):  # noqa: F811
    out = tmp_path / "exported"
    assert export_tool("--checkpoint", str(trained["dora"]), "--out", str(out)) == 0
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED.format(texts=TEXTS))
    result = subprocess.run(
        [sys.executable, str(script), str(trained["dora"]), str(out), str(tmp_path / "e.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(tmp_path / "e.pt", weights_only=True)
    embedder = LaMEEmbedder.from_pretrained(out, device="cpu")
    expected = _module_embeddings(trained["dora"], embedder, {"texts": TEXTS})
    for source in ("checkpoint", "folder"):
        assert (got[source] - expected).abs().max() <= 1e-5, source


def test_the_readme_snippet_runs_on_a_tiny_checkpoint(trained, tmp_path, monkeypatch, capsys):  # noqa: F811
    snippet = readme_snippet().replace('"runs/demo/stage2/checkpoints/last.ckpt"', repr(str(trained["plain"])))
    snippet = snippet.replace('"runs/demo/exported"', repr(str(tmp_path / "exported")))
    assert snippet.count(str(tmp_path)) == 1 and str(trained["plain"]) in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README snippet", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "lame 2 (2, 64)"
    scores = json.loads(lines[-1].removeprefix("cosine: "))
    assert len(scores) == 2 and all(-1.0 <= s <= 1.0 for s in scores)


def test_explain_needs_a_folder_exported_with_the_decoder(trained, tmp_path):  # noqa: F811
    with_decoder, without = tmp_path / "with", tmp_path / "without"
    assert export_tool("--checkpoint", str(trained["plain"]), "--out", str(with_decoder), "--with-decoder") == 0
    assert export_tool("--checkpoint", str(trained["plain"]), "--out", str(without)) == 0
    expected = LaMEEmbedder.from_checkpoint(trained["plain"], device="cpu").explain(texts=TEXTS, max_tokens=5)
    assert LaMEEmbedder.from_pretrained(with_decoder).explain(texts=TEXTS, max_tokens=5) == expected
    with pytest.raises(ValueError, match="exported without the decoder"):
        LaMEEmbedder.from_pretrained(without).explain(texts=TEXTS)


def test_adapters_on_a_bfloat16_backbone_stay_as_trained_and_export_merges_in_float32(
    tiny_spec, tiny_decoder, make_batch, tmp_path
):
    """Merging DoRA into bfloat16 weights would round the adapters' update away: embedding keeps them,
    the export merges in float32."""
    import dataclasses

    from test_embedder import _train

    from lame_pl import LaMEModule
    from lame_pl.stages import LoraSpec, Stage2Spec

    spec = dataclasses.replace(tiny_spec, dtype="bfloat16")
    dora = Stage2Spec(lora=LoraSpec(r=4, alpha=8, dropout=0.0, use_dora=True))
    module = LaMEModule(backbone=spec, decoder=tiny_decoder, num_reason_tokens=2, stage=2, stage2=dora)
    checkpoint = _train(module, make_batch(4), tmp_path / "bf16.ckpt", perturb_adapters=True)
    embedder = LaMEEmbedder.from_checkpoint(checkpoint, device="cpu")
    assert any("lora_" in n for n, _ in embedder.encoder.named_parameters())  # not merged
    rows = _rows(tmp_path)
    expected = _module_embeddings(checkpoint, embedder, rows)
    assert (embedder.encode(**rows) - expected).abs().max() <= 1e-5
    out = export_tool("--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported"))
    assert out == 0
    exported = LaMEEmbedder.from_pretrained(tmp_path / "exported", device="cpu")
    assert {p.dtype for p in exported.encoder.parameters()} == {torch.float32}
    assert not any("lora_" in n for n, _ in exported.encoder.named_parameters())
    # float32 arithmetic on the merged weights against bfloat16 activations: close, not equal.
    assert (exported.encode(**rows) - expected).abs().max() <= 5e-2
