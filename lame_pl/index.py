"""Predicted embeddings on disk, a FAISS index over them, and recall@k read from its hits.

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
none) and ``skipped`` (a JSON list of
the keys left out as unreadable in the batches that shard closes). ``embeddings.json`` sums up
the last run (rows, rows computed and resumed, skipped count, blank lines); it is informative,
the shards alone are the data. A ``.safetensors`` is written under a temporary name and renamed
last, so a shard whose ``.safetensors`` exists is whole (what resuming relies on).

**Index folder** (``tools/index.py``): ``index.faiss`` (inner product over L2-normalised rows;
``IndexFlatIP`` by default, exact), ``items.jsonl`` (the key and text of each index row, in id
order) and ``index.json`` (what was indexed: side, kind, count, dimension; for a corpus also
``corpus`` and the ``instruction`` it was embedded with).

Ranking follows ``lame_pl.retrieval``: ties count against the query (a candidate scoring the same
as the gold ranks above it), so recall@k from the index equals the module's on the same rows, up
to float rounding of scores that differ by ~1e-7 (FAISS and torch sum the dot products in
different orders).

FAISS (``pip install -e '.[index]'``, part of ``.[dev]``) is imported on first use, so that the
writer callback does not need it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

EMBEDDINGS_FORMAT = "lame_pl.embeddings/1"
INDEX_FORMAT = "lame_pl.index/1"
SIDES = ("query", "target")
KINDS = ("flat", "hnsw", "ivf")
INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.jsonl", "index.json"
SUMMARY_FILE = "embeddings.json"
CORPUS_SIDES = {"images": "query", "texts": "target"}  # the layout a corpus is embedded in
_SHARD = re.compile(r"^rank(\d{3,})-(\d{9,})\.safetensors$")
_TMP_SUFFIX = ".tmp"


def _faiss() -> Any:
    """The ``faiss`` module, or an error saying how to install it (an optional extra)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("the index needs FAISS: pip install -e '.[index]' (faiss-cpu)") from None
    return faiss


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
            items = _read_items(path.with_suffix(".jsonl"))
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


def _read_items(path: Path) -> list[dict[str, Any]]:
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
        items = _read_items(shard.with_suffix(".jsonl"))
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


# ----------------------------------------------------------------------------- the index


def normalised(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float32, C-contiguous copy with each row scaled to unit L2 norm (zero rows stay zero)."""
    array = vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
    array = np.array(array, dtype=np.float32, order="C", copy=True)
    if array.ndim != 2:
        raise ValueError(f"vectors must be (N, D); got shape {array.shape}")
    faiss = _faiss()

    faiss.normalize_L2(array)
    return array


def build_index(vectors: torch.Tensor | np.ndarray, kind: str = "flat", nlist: int | None = None) -> Any:
    """A FAISS inner-product index over the L2-normalised rows of ``vectors``.

    Args:
        vectors: ``(N, D)`` embeddings, row ``i`` gets id ``i``.
        kind: ``flat`` (exact, ``IndexFlatIP``), ``hnsw`` (graph, approximate) or ``ivf``
            (inverted lists, approximate; trained on the rows themselves).
        nlist: Lists of an ``ivf`` index; default ``~sqrt(N)``.
    """
    faiss = _faiss()

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    rows = normalised(vectors)
    count, dim = rows.shape
    if count == 0:
        raise ValueError("no rows to index")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        lists = nlist or max(1, int(round(count**0.5)))
        if lists > count:
            raise ValueError(f"nlist {lists} exceeds the {count} rows an ivf index trains on")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(rows)
        index.nprobe = min(lists, 8)
    index.add(rows)
    return index


@dataclass
class SearchIndex:
    """A FAISS index with the key and text of each of its rows.

    Attributes:
        index: The FAISS index (inner product over L2-normalised rows).
        keys: Key of each index id.
        texts: Text of each index id (``None`` when unknown).
        meta: What ``index.json`` says (side, kind, count, dimension).
    """

    index: Any
    keys: list[str]
    texts: list[str | None]
    meta: dict[str, Any]

    def search(self, vectors: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids, ``(Q, k)`` each, of the ``k`` best rows for each (normalised) query row.

        Where the index holds fewer than ``k`` rows, the missing hits have id -1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = normalised(vectors)
        if queries.shape[1] != self.index.d:
            raise ValueError(f"queries have dimension {queries.shape[1]}; the index has {self.index.d}")
        return self.index.search(queries, k)

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict[str, Any]]]:
        """``search``'s output as ``{"key", "text", "score"}`` hits per query, best first."""
        return [
            [
                {"key": self.keys[i], "text": self.texts[i], "score": float(s)}
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def save(self, path: str | Path) -> Path:
        """Writes ``index.faiss``, ``items.jsonl`` and ``index.json`` into the folder ``path``."""
        faiss = _faiss()

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ITEMS_FILE).open("w", encoding="utf-8") as out:
            for key, text in zip(self.keys, self.texts, strict=True):
                out.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
        meta = {**self.meta, "format": INDEX_FORMAT, "count": int(self.index.ntotal), "dim": int(self.index.d)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        return directory


def index_embeddings(
    embeddings: Embeddings,
    side: str | None = None,
    kind: str = "flat",
    nlist: int | None = None,
    source: str | None = None,
) -> SearchIndex:
    """A ``SearchIndex`` over one side of predicted embeddings, keyed and captioned like them.

    ``side`` defaults to ``Embeddings.default_side`` (the targets, or a one-sided corpus's side).
    """
    side = side or embeddings.default_side()
    index = build_index(embeddings.side(side), kind, nlist)
    meta = {"side": side, "kind": kind, "source": source, "model": embeddings.model}
    if embeddings.corpus is not None:  # tools/search.py lays an image query out as the corpus was
        meta.update(corpus=embeddings.corpus, instruction=embeddings.instruction)
    return SearchIndex(index, list(embeddings.keys), list(embeddings.texts), meta)


def load_index(path: str | Path) -> SearchIndex:
    """Reads an index folder written by ``SearchIndex.save``.

    Raises:
        EmbeddingsError: When a file is missing or unreadable, or the files disagree (the
            message names the path).
    """
    faiss = _faiss()

    directory = Path(path)
    if not directory.is_dir():
        raise EmbeddingsError(f"{directory}: no such index folder (build one with tools/index.py)")
    index_path, meta_path = directory / INDEX_FILE, directory / META_FILE
    if not index_path.is_file():
        raise EmbeddingsError(f"{index_path}: missing (build the index with tools/index.py)")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as error:
        raise EmbeddingsError(f"{index_path}: not a readable FAISS index ({_first_line(error)})") from None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EmbeddingsError(f"{meta_path}: unreadable ({_first_line(error)})") from None
    items = _read_items(directory / ITEMS_FILE)
    if len(items) != index.ntotal:
        raise EmbeddingsError(f"{directory / ITEMS_FILE}: {len(items)} rows for an index of {index.ntotal}")
    return SearchIndex(index, [i["key"] for i in items], [i.get("text") for i in items], meta)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


# ----------------------------------------------------------------------------- recall


def gold_ranks_from_hits(scores: np.ndarray, ids: np.ndarray, gold: np.ndarray) -> torch.Tensor:
    """The gold's rank per query, from ``search`` run with ``k + 1`` hits, exact below ``k``.

    As ``lame_pl.retrieval.gold_ranks``: the rank counts the other candidates scoring at least the
    gold's score, ties against the query. A query whose gold is among its hits gets the count of
    other hits scoring at least the gold (the gold's score taken from the same search, so rounding
    cannot part a tie); one whose gold is not gets ``k + 1``. With ``k + 1`` hits this is exact for
    every rank below ``k`` (so for recall@1..k): if ``k`` or more other candidates score at least
    the gold, the ``k + 1`` best hold ``k`` of them.

    Args:
        scores: ``(Q, k + 1)`` hit scores, best first.
        ids: ``(Q, k + 1)`` hit ids (-1 for none).
        gold: ``(Q,)`` index id of each query's gold.

    Returns:
        ``(Q,)`` long tensor of ranks, capped at ``k + 1``.
    """
    hits = ids.shape[1]
    ranks = np.full(ids.shape[0], hits, dtype=np.int64)
    is_gold = ids == gold[:, None]
    found = is_gold.any(axis=1)
    gold_score = np.where(is_gold, scores, -np.inf).max(axis=1)
    ahead = ((scores >= gold_score[:, None]) & ~is_gold & (ids >= 0)).sum(axis=1)
    ranks[found] = ahead[found]
    return torch.from_numpy(ranks)


def index_recall(
    search_index: SearchIndex, queries: torch.Tensor, query_keys: list[str], ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k of ``queries`` through the index, each query's gold being the index row with its key.

    Computed with ``lame_pl.retrieval.metrics_from_ranks`` on ``gold_ranks_from_hits``, so it
    equals the module's whole-split recall on the same rows (see the module docstring).

    Raises:
        EmbeddingsError: When a query's key is not in the index, or a key names two index rows.
    """
    from lame_pl.retrieval import metrics_from_ranks

    row = {key: i for i, key in enumerate(search_index.keys)}
    if len(row) != len(search_index.keys):  # a key naming two rows names no gold
        seen: set[str] = set()
        twice = next(key for key in search_index.keys if key in seen or seen.add(key))
        raise EmbeddingsError(f"the index holds key {twice!r} more than once; recall needs unique keys")
    missing = [key for key in query_keys if key not in row]
    if missing:
        raise EmbeddingsError(f"{len(missing)} query keys are not in the index, e.g. {missing[:3]}")
    gold = np.array([row[key] for key in query_keys], dtype=np.int64)
    scores, ids = search_index.search(queries, max(ks) + 1)
    ranks = gold_ranks_from_hits(scores, ids, gold)
    metrics = metrics_from_ranks(ranks, ks=ks)
    return {f"recall@{k}": metrics[f"recall@{k}"] for k in ks}
