"""A FAISS index over predicted embeddings, and recall@k read from its hits.

The embeddings it indexes are read from the folder ``lightning predict`` writes (format and reader:
``lame_pl.embeddings_folder``).

**Index folder** (``tools/index.py``): ``index.faiss`` (inner product over L2-normalised rows;
``IndexFlatIP`` by default, exact), ``items.jsonl`` (the key and text of each index row, in id
order) and ``index.json`` (what was indexed: side, kind, count, dimension; for a corpus also
``corpus`` and the ``instruction`` it was embedded with).

Ranking follows ``lame_pl.retrieval``: ties count against the query (a candidate scoring the same
as the gold ranks above it), so recall@k from the index equals the module's on the same rows, up
to float rounding of scores that differ by ~1e-7 (FAISS and torch sum the dot products in
different orders).

FAISS (``pip install -e '.[index]'``, part of ``.[dev]``) is imported on first use, so that
importing this module does not need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lame_pl.embeddings_folder import Embeddings, EmbeddingsError, read_items

INDEX_FORMAT = "lame_pl.index/1"
KINDS = ("flat", "hnsw", "ivf")
INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.jsonl", "index.json"


def _faiss() -> Any:
    """The ``faiss`` module, or an error saying how to install it (an optional extra)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("the index needs FAISS: pip install -e '.[index]' (faiss-cpu)") from None
    return faiss


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
    items = read_items(directory / ITEMS_FILE)
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
