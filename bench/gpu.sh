#!/usr/bin/env bash
# GPU checks, one after the other, each with its own time limit, each logged to LOGS/<name>.log:
#   env          the device, torch and CUDA versions, bf16 support
#   throughput   bench/train.py --gpu-only: fp32 vs bf16-mixed, batch 64 and 512, MFU
#   train_auto   `python train.py` as shipped (trainer.accelerator=auto: GPU, bf16-mixed)
#   train_fp32   the same run in fp32, to compare the test metrics with bf16-mixed
#   rollout      bench/rollout.py on the GPU (LSTM and transformer, cached steps)
#   transformer  experiment=cdnow_transformer on the GPU (scaled_dot_product_attention in bf16)
# A failing check does not stop the next one; the exit status counts the failures.
# Run:  bash bench/gpu.sh [LOGS]   (default outputs/gpu; PYTHON=... picks the interpreter,
#       RUNS=... where the training runs go, default LOGS/runs)
set -uo pipefail

LOGS=${1:-outputs/gpu}
PY=${PYTHON:-python3}
RUNS=${RUNS:-$LOGS/runs}  # the training runs' directories
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failures=0

check() {  # check NAME SECONDS COMMAND...: run, log, print the tail and the wall time
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  tail -n "${TAIL:-14}" "$LOGS/$name.log" | cut -c1-200
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

train_run() {  # train_run NAME SECONDS OVERRIDES...: train.py, which logs its test metrics last
  local name=$1 limit=$2
  shift 2
  TAIL=${TAIL:-26} check "$name" "$limit" "$PY" train.py "hydra.run.dir=$RUNS/$name" "$@"
}

check env 60 "$PY" -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print(torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
check throughput 200 "$PY" bench/train.py --gpu-only --customers 80000 --steps 30 --warmup 5
train_run train_auto 150
train_run train_fp32 120 trainer.precision=32-true
check rollout 100 "$PY" bench/rollout.py --transformer-customers 10000
train_run transformer 240 experiment=cdnow_transformer
echo "== $failures failed check(s); logs in $LOGS"
exit "$failures"
