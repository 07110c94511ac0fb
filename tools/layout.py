"""Prints, writes or checks README.md's Layout block, generated from the tree (``lame_pl.layout``).

python tools/layout.py            # print the block
python tools/layout.py --write    # rewrite it between <!-- layout:start --> and <!-- layout:end -->
python tools/layout.py --check    # exit 1 with the difference when README.md's block is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lame_pl.layout import LayoutError, difference, generate, replace_block

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the block in README.md")
    action.add_argument("--check", action="store_true", help="exit 1 when README.md's block differs")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    readme = args.root / "README.md"
    try:
        if args.check:
            diff = difference(args.root, readme)
            if diff:
                print(
                    f"{readme}: the layout block is stale; run python tools/layout.py --write\n{diff}", file=sys.stderr
                )
                return 1
            print(f"{readme}: the layout block matches the tree")
        elif args.write:
            block = generate(args.root)
            if not readme.is_file():
                raise LayoutError(f"{readme} is not a file")
            text = readme.read_text(encoding="utf-8")
            updated = replace_block(text, block)
            if updated != text:
                readme.write_text(updated, encoding="utf-8")
            print(f"{readme}: layout block {'rewritten' if updated != text else 'already up to date'}")
        else:
            print(generate(args.root))
    except LayoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
