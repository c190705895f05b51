#!/usr/bin/env bash
# GPU benchmark of the released 1.3B configs: subllm-1.3b vs llama-1.3b (identical weights in the
# shared layers) and the zero-overhead bound, full training steps in bf16 at 2k, 4k and 8k.
# (The inference benchmark is CPU-only so far.) Offline; needs only PyTorch with CUDA and this repository.
# Without a CUDA device it runs tiny sizes on the CPU (the CI smoke test).
# Usage: bash benchmarks/gpu.sh [OUT_DIR]     (writes OUT_DIR/train.txt, OUT_DIR/infer.txt, plots)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
  "$PY" -m subllm bench train --device cuda --preset subllm-1.3b --lengths 2k,4k,8k --batch-size 2 \
      --reps 5 --warmup 2 --plot "$OUT/train_speedup.png" | tee "$OUT/train.txt"
else
  echo "no CUDA device: CPU smoke run at tiny sizes"
  "$PY" -m subllm bench train --quick --plot "$OUT/train_speedup.png" | tee "$OUT/train.txt"
  "$PY" -m subllm bench infer --quick | tee "$OUT/infer.txt"
fi
