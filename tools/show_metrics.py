"""Prints a test-metrics JSON (from ``callbacks.MetricsFile``) as retrieval metrics beside chance.

    python tools/show_metrics.py runs/demo/test_metrics.json

Given several files (runs tested on the same split), it prints them side by side, one column
per run, named by ``--names`` (default: each file's folder):

    python tools/show_metrics.py runs/demo/test_metrics.json runs/clip/test_metrics.json --names LaME CLIP

``--expected FILE`` then says of each metric the file names whether it lies inside the range
that the file's reference runs span, widened by its tolerance; ``make demo`` passes
``configs/demo/expected_metrics.json``. A value outside is reported, not an error: the exit
status stays 0.
"""

import sys

from lame_pl.metrics_table import main

if __name__ == "__main__":
    sys.exit(main())
