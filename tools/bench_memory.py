"""Weight-dtype memory benchmark's command line (``lame_pl.benchmarks.memory``): weight bytes and the peak RSS
of building a backbone plus one forward.

    python tools/bench_memory.py --preset qwen2vl-2b-shape --dtype float32,bfloat16 --json mem_2b.json

Each dtype is built in a fresh process (``python -m lame_pl.benchmarks.memory``) when several are
asked for. The benchmark lives in lame_pl/benchmarks/memory.py.
"""

import sys

from lame_pl.benchmarks.memory import main

if __name__ == "__main__":
    sys.exit(main())
