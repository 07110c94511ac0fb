"""Single-GPU memory model's command line (``lame_pl.benchmarks.memory_model``): peak GPU memory of one LaME
training step on one device, computed, and the model compared with a CPU step.

    python tools/estimate_memory.py                       # the 2B recipe: chunks that fit 24/48/80 GB
    python tools/estimate_memory.py --validate --json OUT.json   # the model against a measured CPU step

The memory model (its parts, margins and calibration: ``--help``) lives in
lame_pl/benchmarks/memory_model.py, the CPU measurement that checks it in
lame_pl/benchmarks/memory_probe.py. It sizes configs/qwen2vl-2b/single_gpu*.yaml.
"""

import sys

from lame_pl.benchmarks.memory_model import main

if __name__ == "__main__":
    sys.exit(main())
