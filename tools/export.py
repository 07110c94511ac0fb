"""Exports a trained LaME checkpoint as a folder in Hugging Face conventions (``lame_pl.export``).

    python tools/export.py --checkpoint runs/demo/stage2/checkpoints/last.ckpt --out runs/demo/exported

The folder loads without this training stack's Lightning parts:
``lame_pl.LaMEEmbedder.from_pretrained(DIR)``. The latent decoder is left out unless
``--with-decoder``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lame_pl.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a lightning fit checkpoint (.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--with-decoder", action="store_true", help="keep the latent decoder (not needed to embed)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, with_decoder=args.with_decoder, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
