"""Search an index built by ``tools/index.py``: with predicted query embeddings, a text or an image.

    python tools/search.py --index runs/demo/index --queries runs/demo/embeddings [-k 5] [--json]
    python tools/search.py --index runs/demo/index --checkpoint CKPT --text "a red circle" [-k 5]
    python tools/search.py --index runs/demo/index --checkpoint CKPT --image scene.png [--instruction "..."]

``--queries`` searches with the query side of an embeddings folder (``lightning predict``) and,
when their keys are in the index, prints recall@1/5/10 (each query's gold: the index row with its
key; ranked as ``lame_pl.retrieval`` ranks, ties against the query). ``--text``/``--image`` (one
query, both allowed) are embedded by the checkpoint with the training prompt layout; an image
gets the training run's query instruction unless ``--instruction`` is given, or, searching an
index of an image corpus (``datamodules.CorpusDataModule``), the instruction that corpus was
embedded with, so that an image finds itself. Prints the top-k keys, texts and scores, or JSON
with ``--json``.

``tools/search.py`` is the command line (``main``); the index and its recall: ``lame_pl.index``;
the embeddings folder: ``lame_pl.embeddings_folder``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lame_pl.embeddings_folder import EmbeddingsError, load_embeddings
from lame_pl.index import SearchIndex, index_recall, load_index

RECALL_AT = (1, 5, 10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="folder written by tools/index.py")
    parser.add_argument("--queries", help="embeddings folder whose query side to search with")
    parser.add_argument("--text", help="a free text to search with")
    parser.add_argument("--image", help="an image file to search with")
    parser.add_argument(
        "--instruction",
        help="instruction of the free query (default with an image: an image "
        "corpus's own instruction, else the run's query instruction; none for a text alone)",
    )
    parser.add_argument(
        "--checkpoint",
        help="the lightning fit checkpoint that embeds --text/--image (default: "
        "the one that embedded the index, which index.json names)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-k", type=int, default=10, help="hits per query")
    parser.add_argument(
        "--show", type=int, default=5, help="--queries: how many queries' hits to print (JSON holds all)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    free = args.text is not None or args.image is not None
    if free == (args.queries is not None):
        parser.error("give either --queries or --text/--image")
    if args.k < 1:
        parser.error(f"-k must be >= 1, got {args.k}")
    return args


def query_checkpoint(model: dict[str, Any], given: str | None, index: str) -> str:
    """The checkpoint that embeds a free query: the index's own, or ``given`` when it is that file.

    Raises:
        ValueError: When no checkpoint is known, or ``given`` is not the one that embedded the
            index (another model's query vectors would rank the index silently wrong).
    """
    recorded = model.get("checkpoint")
    if given is None:
        if not recorded:
            raise ValueError(f"{index}: index.json names no checkpoint; give --checkpoint to embed --text/--image")
        return recorded
    if recorded:
        stat = Path(given).stat() if Path(given).is_file() else None
        same_file = stat is not None and f"{stat.st_size}:{stat.st_mtime_ns}" == model.get("checkpoint_file")
        if Path(given).resolve() != Path(recorded) and not same_file:
            raise ValueError(f"--checkpoint {given} is not the checkpoint that embedded {index} ({recorded})")
    return given


def query_instruction(checkpoint: Path) -> str:
    """The ``data.query_instruction`` the checkpoint's run trained with ("" when it names none)."""
    from lame_pl.checkpoint import read_checkpoint

    return read_checkpoint(checkpoint).instructions.get("query", "")


def encode_query(
    checkpoint: str,
    text: str | None,
    image: str | None,
    instruction: str | None,
    device: str = "cpu",
    corpus_instruction: str | None = None,
) -> torch.Tensor:
    """``(1, D)`` embedding of one free query, through the checkpoint (the one place that encodes).

    ``lame_pl.evaluation.encode.CheckpointEncoder`` lays the query out as the training collator
    does (image, instruction, text); swap this function's body for another encoder to change it.
    Without ``instruction``, an image gets ``corpus_instruction`` when given (an index of an
    image corpus), else the checkpoint's query instruction; a text alone gets none.
    """
    from lame_pl.evaluation.encode import CheckpointEncoder
    from lame_pl.evaluation.task import Item

    path = Path(checkpoint)
    if not path.is_file():
        raise EmbeddingsError(f"{path}: no such checkpoint file")
    if instruction is None and image is not None:
        instruction = corpus_instruction if corpus_instruction is not None else query_instruction(path)
    if image is not None and not Path(image).is_file():
        raise EmbeddingsError(f"{image}: no such image file")
    # The encoder says on stdout what it reads from the checkpoint; keep stdout for the results.
    with contextlib.redirect_stdout(sys.stderr):
        encoder = CheckpointEncoder(path, device=device, batch_size=1)
    return encoder.encode([Item(instruction or "", text or "", (image,) if image is not None else ())])


def search_queries(index: SearchIndex, folder: str, k: int) -> dict[str, Any]:
    """Hits for every query row of an embeddings folder, and recall@k when their keys are in the index."""
    embeddings = load_embeddings(folder)
    query = embeddings.side("query")
    scores, ids = index.search(query, k)
    result: dict[str, Any] = {
        "queries": [
            {"key": key, "text": text, "hits": hits}
            for key, text, hits in zip(embeddings.keys, embeddings.texts, index.hits(scores, ids), strict=True)
        ]
    }
    # Recall only where a query's gold is the index row of its key: an index of targets.
    if index.meta.get("side", "target") == "target" and set(embeddings.keys) <= set(index.keys):
        result["metrics"] = index_recall(index, query, embeddings.keys, RECALL_AT)
    return result


def print_hits(queries: list[dict[str, Any]], show: int) -> None:
    """The hits of the first ``show`` queries, one line each."""
    for query in queries[:show]:
        label = query["key"] or " + ".join(filter(None, (query.get("image"), query.get("text"))))
        caption = f"  ({query['text']})" if query["key"] and query.get("text") else ""
        print(f"query {label}{caption}")
        for rank, hit in enumerate(query["hits"], 1):
            text = hit["text"] if hit["text"] != hit["key"] else ""  # an image corpus: the path twice
            print(f"  {rank:3d}. {hit['score']:+.4f}  {hit['key']}  {text or ''}")
    if len(queries) > show:
        print(f"... {len(queries) - show} more queries (--show N, or --json for all)")


def main(argv: list[str] | None = None) -> None:
    """Runs the search; one-line error for a bad path or file."""
    args = parse_args(argv)
    try:
        index = load_index(args.index)
        if args.queries is not None:
            result = search_queries(index, args.queries, args.k)
        else:
            checkpoint = query_checkpoint(index.meta.get("model") or {}, args.checkpoint, args.index)
            corpus_instruction = index.meta.get("instruction") if index.meta.get("corpus") == "images" else None
            vector = encode_query(checkpoint, args.text, args.image, args.instruction, args.device, corpus_instruction)
            scores, ids = index.search(vector, args.k)
            result = {
                "queries": [{"key": None, "text": args.text, "image": args.image, "hits": index.hits(scores, ids)[0]}]
            }
    except (EmbeddingsError, ValueError) as error:  # EvalDataError (a bad image) is a ValueError
        sys.exit(f"error: {error}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    print_hits(result["queries"], args.show if args.queries is not None else 1)
    for name, value in result.get("metrics", {}).items():
        print(f"{name}: {value:.4f}")
