#!/usr/bin/env bash
# GPU benchmark of the released 1.3B configs: subllm-1.3b vs llama-1.3b (identical weights in the
# shared layers), the zero-overhead bound and transformers' LlamaForCausalLM (same weights), in bf16:
#   train.txt  full training steps at 2k, 4k, 8k - eager and torch.compile'd, interleaved in one run
#   infer.txt  prefill, decode, KV bytes and the realised keep at 2k, 4k, 8k, batch 1 and 8
# Offline; needs only PyTorch with CUDA and this repository. Budget: about 10 minutes on one H200
# (most of it compiling the two 1.3B graphs). Without a CUDA device it runs tiny sizes on the CPU
# (the CI smoke test; compiling is covered by tests/test_compile.py there).
# Set COMPILE=0 to skip torch.compile.
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
  COMPILE_FLAG=$([ "${COMPILE:-1}" = 1 ] && echo --compile || true)
  "$PY" -m subllm bench infer --device cuda --preset subllm-1.3b --lengths 2k,4k,8k --batch-sizes 1,8 \
      --dtypes bf16 --decode-tokens 64 --reps 5 --warmup 2 --hf | tee "$OUT/infer.txt"
  "$PY" -m subllm bench train --device cuda --preset subllm-1.3b --lengths 2k,4k,8k --batch-size 2 \
      --reps 5 --warmup 2 --hf $COMPILE_FLAG --plot "$OUT/train_speedup.png" | tee "$OUT/train.txt"
  # sequence parallelism (subllm/seqpar/): activation memory per GPU vs one, 2 GPUs over nccl
  if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    "$PY" benchmarks/seqpar_memory.py --device cuda --dtype bf16 --n 2 --lengths 8k,16k,32k --backward \
        --structure 'TTTTT(TTTTT(TTTT)TTTTT)TTTTT' | tee "$OUT/seqpar.txt"
    "$PY" benchmarks/seqpar_memory.py --device cuda --dtype bf16 --n 2 --lengths 8k,16k,32k --backward \
        --structure 'TTTTT(TTTTT(TTTT)TTTTT)TTTTT' --no-baseline --sp-attention ring | tee "$OUT/seqpar_ring.txt"
  else
    echo "one CUDA device: sequence-parallel run skipped (needs 2)"
  fi
else
  echo "no CUDA device: CPU smoke run at tiny sizes"
  "$PY" -m subllm bench train --quick --hf --plot "$OUT/train_speedup.png" | tee "$OUT/train.txt"
  "$PY" -m subllm bench infer --quick --hf | tee "$OUT/infer.txt"
fi
