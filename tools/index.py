"""Build a FAISS index from the embeddings ``lightning predict`` wrote.

    python tools/index.py --embeddings runs/demo/embeddings --out runs/demo/index [--side target] [--kind flat]

Indexes one side of the embeddings folder with the key and text of each row beside it:
``OUT/index.faiss``, ``OUT/items.jsonl``, ``OUT/index.json``. The side defaults to the targets
(the captions) of a split of pairs, and to the one side written for a corpus of images (embedded
as queries) or of texts (as targets).
Inner product over L2-normalised rows; ``flat`` is exact, ``hnsw`` and ``ivf`` approximate.
Formats: ``lame_pl/embeddings_folder.py`` (what it reads), ``lame_pl/index.py`` (what it writes).
"""

from __future__ import annotations

import argparse
import sys

from lame_pl.embeddings_folder import SIDES, EmbeddingsError, load_embeddings
from lame_pl.index import KINDS, index_embeddings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", required=True, help="folder written by callbacks.EmbeddingWriter")
    parser.add_argument("--out", required=True, help="index folder to write")
    parser.add_argument(
        "--side",
        choices=SIDES,
        default=None,
        help="which embeddings to index (default: target, or the one side a corpus has)",
    )
    parser.add_argument("--kind", choices=KINDS, default="flat", help="flat (exact), hnsw or ivf")
    parser.add_argument("--nlist", type=int, default=None, help="lists of an ivf index (default ~sqrt(N))")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Builds and saves the index; one-line error for bad input."""
    args = parse_args(argv)
    try:
        embeddings = load_embeddings(args.embeddings)
        index = index_embeddings(embeddings, args.side, args.kind, args.nlist, source=str(args.embeddings))
        out = index.save(args.out)
    except (EmbeddingsError, ValueError) as error:
        sys.exit(f"error: {error}")
    corpus = f" of the {embeddings.corpus} corpus" if embeddings.corpus else ""
    print(
        f"indexed {index.index.ntotal} {index.meta['side']} rows{corpus} (dim {index.index.d}, {args.kind}) into {out}/"
    )


if __name__ == "__main__":
    main()
