"""What the bottleneck carries: the latent decoder's text for test images, beside their captions.

    python tools/explain.py --checkpoint runs/demo/stage2/checkpoints/last.ckpt --shards data/demo/test

What it decodes and how the texts are scored against chance: ``--help`` and ``lame_pl/explain.py``.
"""

import sys

from lame_pl.explain import main

if __name__ == "__main__":
    sys.exit(main())
