"""Training-step benchmark's command line (``lame_pl.benchmarks.train``): the plain step against the
GradCache step, throughput and peak memory.

    python tools/bench_train.py --preset small --threads 2 --json /tmp/bench_train_small.json
    python tools/bench_train.py --preset qwen2vl-2b-shape --device cuda --dtype bf16 --json OUT.json

On a CPU each configuration runs in a fresh process (``python -m lame_pl.benchmarks.train``), so
that each has its own peak RSS. ``--help`` says how the steps, the memory and the ratios are
measured; the benchmark lives in lame_pl/benchmarks/train.py.
"""

import sys

from lame_pl.benchmarks.train import main

if __name__ == "__main__":
    sys.exit(main())
