"""Write WebDataset shards: image-caption pairs (img2dataset layout) or instruction pairs.

    python tools/make_shards.py synthetic --out data/synthetic
    python tools/make_shards.py folder --src photos/ --out data/photos [--split-name train]
    python tools/make_shards.py folder --src photos/ --out data/photos --val-fraction 0.1 --test-fraction 0.1
    python tools/make_shards.py manifest --manifest pairs.jsonl --out data/pairs [--image-root imgs/]

The subcommands, the shard sizes and the input layouts: ``--help`` and ``lame_pl/data/shards_cli.py``
(the command line); what each subcommand writes: ``lame_pl/data/shard_commands.py``.
"""

import sys

from lame_pl.data.shards_cli import main

if __name__ == "__main__":
    sys.exit(main())
