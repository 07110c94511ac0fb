"""Predicted embeddings on disk: the shards ``lightning predict`` writes, and reading them back.

**Embeddings folder** (written by ``callbacks.EmbeddingWriter`` during ``lightning predict``):
one shard per rank and row range, ``rank{R:03d}-{first_row:09d}.safetensors`` holding float32
``query`` and ``target`` tensors ``(N, D)`` (L2-normalised, as the model returns them), beside
``rank{R:03d}-{first_row:09d}.jsonl`` with one ``{"key": ..., "text": ...}`` line per row in the
same order (``text``: the target's text, the caption; ``null`` when the batch has none). Read in
(rank, row) order, the rows line up with ``LaMEModule``'s whole-split retrieval: queries and
targets in rank order, query ``i``'s gold target is row ``i``.

A user's own corpus (``datamodules.CorpusDataModule``) is one-sided: a folder of images is
embedded in the query layout (image, then the optional instruction) and written as ``query``, a
file of text lines in the target layout (a caption) and written as ``target``; the tensor name is
the side. Each shard's safetensors metadata says ``corpus`` (``images``/``texts``; absent for a
split of pairs), ``source`` (the folder or file), ``instruction`` (the corpus's, ``""`` for
none) and ``skipped`` (a JSON list of the keys left out as unreadable in the batches that shard
closes). ``embeddings.json`` sums up the last run (rows, rows computed and resumed, skipped count,
blank lines); it is informative, the shards alone are the data. A ``.safetensors`` is written under
a temporary name and renamed last, so a shard whose ``.safetensors`` exists is whole (what resuming
relies on).

A FAISS index over one side of them: ``lame_pl.index``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

EMBEDDINGS_FORMAT = "lame_pl.embeddings/1"
SIDES = ("query", "target")
SUMMARY_FILE = "embeddings.json"
CORPUS_SIDES = {"images": "query", "texts": "target"}  # the layout a corpus is embedded in
_SHARD = re.compile(r"^rank(\d{3,})-(\d{9,})\.safetensors$")
_TMP_SUFFIX = ".tmp"


class EmbeddingsError(ValueError):
    """An embeddings or index folder that is missing, incomplete or unreadable (the message names the path)."""


@dataclass
class Embeddings:
    """Rows read from an embeddings folder, in (rank, row) order.

    Attributes:
        keys: Sample key of each row.
        texts: The target's text of each row (``None`` when unknown).
        query: ``(N, D)`` float32 query embeddings, or ``None`` when not written.
        target: ``(N, D)`` float32 target embeddings, or ``None`` when not written.
        corpus: ``images`` or ``texts`` for a user's corpus, ``None`` for a split of pairs.
        instruction: The instruction a corpus was embedded with (``""`` for none).
        skipped: Keys left out as unreadable, as the shards record them.
        model: What embedded the rows (``callbacks.embedding_writer.model_identity``: the
            checkpoint file, the encode mode, the prompt layout); empty for older folders.
    """

    keys: list[str]
    texts: list[str | None]
    query: torch.Tensor | None
    target: torch.Tensor | None
    corpus: str | None = None
    instruction: str = ""
    skipped: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    def default_side(self) -> str:
        """The side to index when none is named: ``target`` when written, else ``query``."""
        return "target" if self.target is not None else "query"

    def side(self, name: str) -> torch.Tensor:
        """The ``query`` or ``target`` embeddings; an error naming the side when they were not written."""
        if name not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}; got {name!r}")
        value = getattr(self, name)
        if value is None:
            raise EmbeddingsError(f"the embeddings hold no {name} side")
        return value


# ----------------------------------------------------------------------------- embeddings files


def shard_stem(rank: int, first_row: int) -> str:
    """The file name, without suffix, of the shard of ``rank`` starting at its row ``first_row``."""
    return f"rank{rank:03d}-{first_row:09d}"


def shard_files(directory: Path) -> list[Path]:
    """The ``.safetensors`` shards of an embeddings folder, in (rank, row) order."""
    found = [(m, p) for p in directory.iterdir() if (m := _SHARD.match(p.name))] if directory.is_dir() else []
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0][1]), int(mp[0][2])))]


def write_shard(
    directory: Path,
    stem: str,
    keys: list[str],
    texts: list[str | None],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes one shard: ``{stem}.safetensors`` (float32 tensors) and ``{stem}.jsonl`` (keys, texts).

    The JSONL goes first and the tensors last, under a temporary name renamed at the end, so a
    shard whose ``.safetensors`` exists is whole. ``metadata`` (``corpus``, ``instruction``,
    ``skipped``) goes into the safetensors header beside the format and the row count.
    """
    from safetensors.torch import save_file

    for name, value in tensors.items():
        if value.shape[0] != len(keys):
            raise ValueError(f"{name} has {value.shape[0]} rows for {len(keys)} keys")
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{stem}.jsonl").open("w", encoding="utf-8") as out:
        for key, text in zip(keys, texts, strict=True):
            out.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
    path = directory / f"{stem}.safetensors"
    partial = path.with_name(path.name + _TMP_SUFFIX)
    save_file(
        {name: value.detach().float().cpu().contiguous() for name, value in tensors.items()},
        str(partial),
        metadata={**(metadata or {}), "format": EMBEDDINGS_FORMAT, "rows": str(len(keys))},
    )
    partial.replace(path)
    return path


@dataclass
class ShardInfo:
    """What a whole shard holds, read without its tensors (``scan_shards``)."""

    path: Path
    rank: int
    first_row: int
    keys: list[str]
    skipped: list[str]
    metadata: dict[str, str]

    @property
    def end_row(self) -> int:
        """The rank's row after this shard's last one."""
        return self.first_row + len(self.keys)


def shard_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a shard (an error naming it when unreadable)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise EmbeddingsError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def _skipped_keys(path: Path, metadata: dict[str, str]) -> list[str]:
    try:
        skipped = json.loads(metadata.get("skipped", "[]"))
    except ValueError:
        skipped = None
    if not isinstance(skipped, list) or not all(isinstance(k, str) for k in skipped):
        raise EmbeddingsError(f"{path}: metadata 'skipped' is not a JSON list of keys")
    return skipped


def scan_shards(directory: Path) -> tuple[list[ShardInfo], list[Path]]:
    """The whole shards of an embeddings folder, and the files of the broken or unfinished ones.

    A shard is whole when its ``.safetensors`` header reads and says as many rows as its
    ``.jsonl`` holds. The second list holds the files a resumed run must remove and redo: broken
    shards (both files), ``.jsonl`` files without their tensors, and temporary files.
    """
    whole: list[ShardInfo] = []
    broken: list[Path] = []
    if not directory.is_dir():
        return whole, broken
    for path in shard_files(directory):
        match = _SHARD.match(path.name)
        assert match is not None
        try:
            metadata = shard_metadata(path)
            items = read_items(path.with_suffix(".jsonl"))
            if metadata.get("rows") != str(len(items)):
                raise EmbeddingsError(f"{path}: {metadata.get('rows')} rows for {len(items)} JSONL rows")
            skipped = _skipped_keys(path, metadata)
        except EmbeddingsError:
            broken += [path, path.with_suffix(".jsonl")]
            continue
        whole.append(ShardInfo(path, int(match[1]), int(match[2]), [i["key"] for i in items], skipped, metadata))
    names = {p.with_suffix(".jsonl").name for p in shard_files(directory)}
    broken += [p for p in directory.glob("rank*-*.jsonl") if p.name not in names]
    broken += list(directory.glob(f"rank*-*.safetensors{_TMP_SUFFIX}"))
    return whole, broken


def read_items(path: Path) -> list[dict[str, Any]]:
    """The ``{"key", "text"}`` rows of a JSONL file (a shard's or an index's), in order; an error names the line."""
    if not path.is_file():
        raise EmbeddingsError(f"{path}: missing (each shard needs its keys and texts beside it)")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise ValueError("no string 'key'")
        except ValueError as error:
            raise EmbeddingsError(f'{path}:{number}: not a {{"key", "text"}} JSON line ({error})') from None
        items.append(item)
    return items


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise EmbeddingsError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def load_embeddings(path: str | Path) -> Embeddings:
    """Reads an embeddings folder written by ``callbacks.EmbeddingWriter``.

    Raises:
        EmbeddingsError: When the folder is missing or holds no shard, or a shard is unreadable,
            disagrees with its JSONL or comes from another corpus than the shards before it (the
            message names the file).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise EmbeddingsError(f"{directory}: no such embeddings folder (write one with lightning predict)")
    shards = shard_files(directory)
    if not shards:
        raise EmbeddingsError(f"{directory}: holds no rank*-*.safetensors shard (write one with lightning predict)")
    keys: list[str] = []
    texts: list[str | None] = []
    skipped: list[str] = []
    sides: dict[str, list[torch.Tensor]] = {}
    corpora: set[tuple[str | None, str]] = set()
    models: set[str] = set()
    for shard in shards:
        metadata = shard_metadata(shard)
        corpora.add((metadata.get("corpus"), metadata.get("instruction", "")))
        models.add(metadata.get("model") or "")
        if len(corpora) > 1:  # a rerun on another corpus without resume removes the old shards
            raise EmbeddingsError(f"{shard}: of corpus {metadata.get('corpus')!r} unlike the shards before it")
        if len(models) > 1:
            raise EmbeddingsError(f"{shard}: embedded by another model than the shards before it")
        skipped += _skipped_keys(shard, metadata)
        tensors = _read_tensors(shard)
        items = read_items(shard.with_suffix(".jsonl"))
        if set(tensors) - set(SIDES) or not tensors:
            raise EmbeddingsError(f"{shard}: holds tensors {sorted(tensors)}; expected {' and/or '.join(SIDES)}")
        for name, value in tensors.items():
            if value.ndim != 2 or value.shape[0] != len(items):
                raise EmbeddingsError(f"{shard}: {name} has shape {tuple(value.shape)} for {len(items)} JSONL rows")
            sides.setdefault(name, []).append(value.float())
        if sides and any(len(parts) != len(sides[next(iter(sides))]) for parts in sides.values()):
            raise EmbeddingsError(f"{shard}: holds sides {sorted(tensors)} unlike the shards before it")
        keys += [item["key"] for item in items]
        texts += [item.get("text") for item in items]
    joined = {name: torch.cat(parts) for name, parts in sides.items()}
    corpus, instruction = corpora.pop()
    model = json.loads(models.pop() or "{}")
    return Embeddings(keys, texts, joined.get("query"), joined.get("target"), corpus, instruction, skipped, model)
