"""Quality ablation of the encode modes at demo scale: one table of per-kind recall and encode time.

    python tools/ablate_modes.py                       # make ablation
    python tools/ablate_modes.py --steps 800           # a longer budget per row
    python tools/ablate_modes.py --rows lame:8,discriminative:0 --out runs/ablation-quick
    python tools/ablate_modes.py --threads 1           # on a machine shared with other jobs

The rows, the data, the scoring and the budget are described by ``--help`` and in
``lame_pl/ablation/cli.py``; the ablation's code lives in ``lame_pl/ablation/``.
"""

import sys

from lame_pl.ablation.cli import main

if __name__ == "__main__":
    sys.exit(main())
