"""Writes the token ids that a shard set's captions use, for ``decoder.vocab_file`` (``lame_pl.decoder_vocab``).

python tools/decoder_vocab.py data/demo/train data/demo/val data/demo/test --out data/demo/decoder_vocab.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lame_pl.decoder_vocab import write_decoder_vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "shard_dirs", type=Path, nargs="+", help="folders of .tar shards whose captions the decoder must emit"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    try:
        ids = write_decoder_vocab(args.shard_dirs, args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(ids)} token ids -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
