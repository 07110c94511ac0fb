"""Data-throughput benchmark's command line (``lame_pl.benchmarks.data``): is the input pipeline ever the
bottleneck of a training step?

    python tools/make_shards.py synthetic --out /tmp/bench_data
    python tools/decoder_vocab.py /tmp/bench_data/train --out /tmp/bench_data/vocab.json
    python tools/bench_data.py --shards /tmp/bench_data/train --decoder-vocab /tmp/bench_data/vocab.json

Times the training loader at each worker count against one demo stage-2 training step (data time
per batch / step time: below 1, the loader keeps up). The benchmark lives in lame_pl/benchmarks/data.py.
"""

import sys

from lame_pl.benchmarks.data import main

if __name__ == "__main__":
    sys.exit(main())
