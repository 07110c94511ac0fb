"""Encode-speed benchmark's command line (``lame_pl.benchmarks.encode``): the four encode modes on one
backbone, the same weights and inputs.

    python tools/bench_encode.py --preset small --json /tmp/bench_small.json
    python tools/bench_encode.py --preset qwen2vl-2b-shape --device cuda --dtype bf16 --json OUT.json

Times ``discriminative``, ``lame``, ``latent_sequential`` and ``explicit_cot`` (and transformers'
``generate``, and the CLIP anchor's ``clip`` row) round-robin, the stage-2 training step of ``lame``
against ``discriminative``, and reports medians, their ratios and the FLOP floor. ``--help`` says
the whole of it; the benchmark lives in lame_pl/benchmarks/encode.py.
"""

import sys

from lame_pl.benchmarks.encode import main

if __name__ == "__main__":
    sys.exit(main())
