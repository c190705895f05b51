#!/usr/bin/env bash
# GPU benchmark of the released 1.3B configs: subllm-1.3b vs llama-1.3b (identical weights in the
# shared layers), the zero-overhead bound and transformers' LlamaForCausalLM (same weights), in bf16:
#   train_<L>.txt      full training steps at L = 4k, 8k, 2k (batch 2), interleaved in one process
#   infer_<L>.txt      prefill, decode, KV bytes and the realised keep at 8k and 2k, batch 1 and 8
#   train_compiled.txt torch.compile'd SUBLLM and LLaMA steps beside the eager ones (8k)
#   infer_compiled.txt decode through compiled graphs (subllm/inference/compiled_decode.py), 2k
# Each stage is a process with its own time limit (T_LIMIT, I_LIMIT, C_LIMIT seconds), so a short
# GPU lease keeps every stage that finished; PACK=FILE.tar.gz re-packs OUT_DIR there after each
# stage. SMOKE=1 runs every CUDA path at tiny sizes plus one 1.3B step instead (minutes less).
# COMPILE=0 skips torch.compile. Offline; needs only PyTorch with CUDA and this repository.
# Without a CUDA device it runs tiny sizes on the CPU (the CI smoke test; compiling is covered by
# tests/test_compile.py there).
# Usage: bash benchmarks/gpu.sh [OUT_DIR]     (CPU: writes OUT_DIR/train.txt, OUT_DIR/infer.txt, a plot)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export PYTHONUNBUFFERED=1
  # Each stage is one process with its own time limit, writing OUT/<stage>.txt (stdout: tables, the
  # JSON line) and OUT/<stage>.log (stderr): a stage cut at its limit loses only itself. Lengths run
  # as separate stages, the paper's 4k and 8k first, so a lease that runs out keeps what finished.
  stage() {  # stage NAME LIMIT_S CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc=0
    timeout -k 15 "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.log" || rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s (limit $limit s)"
    grep -v '^{' "$OUT/$name.txt" | tail -n 25 || true
    [ "$rc" = 0 ] || tail -n 15 "$OUT/$name.log"
    if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$OUT" .; fi
  }
  { nvidia-smi -L || true; "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0],
"torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
torch.cuda.get_device_name(0))'; git log -1 --format='commit %H %cI' 2>/dev/null || true; date -u; } \
      | tee "$OUT/env.txt"
  B="$PY -m subllm bench"
  if [ "${SMOKE:-0}" = 1 ]; then  # every CUDA path at tiny sizes, then one 1.3B step for sizing
    stage smoke_train 120 $B train --quick --device cuda --hf
    stage smoke_infer 90 $B infer --quick --device cuda --hf
    stage smoke_1b 120 $B train --device cuda --preset subllm-1.3b --lengths 4k --batch-size 2 \
        --reps 1 --warmup 1
    stage smoke_1b_infer 90 $B infer --device cuda --preset subllm-1.3b --lengths 2k --batch-sizes 1 \
        --dtypes bf16 --decode-tokens 16 --reps 1 --warmup 1
    exit 0
  fi
  T_LIMIT=${T_LIMIT:-90} I_LIMIT=${I_LIMIT:-120} C_LIMIT=${C_LIMIT:-180}
  for L in ${TRAIN_LENGTHS:-4k 8k 2k}; do
    stage "train_$L" "$T_LIMIT" $B train --device cuda --preset subllm-1.3b --lengths "$L" --batch-size 2 \
        --reps 5 --warmup 2 --hf
  done
  for L in ${INFER_LENGTHS:-8k 2k}; do
    stage "infer_$L" "$I_LIMIT" $B infer --device cuda --preset subllm-1.3b --lengths "$L" \
        --batch-sizes 1,8 --dtypes bf16 --decode-tokens 32 --reps 5 --warmup 1 --hf
  done
  if [ "${COMPILE:-1}" = 1 ]; then  # torch.compile'd training steps (the slowest stage: compiling)
    stage train_compiled "$C_LIMIT" $B train --device cuda --preset subllm-1.3b \
        --lengths "${COMPILE_LENGTHS:-8k}" --batch-size 2 --reps 5 --warmup 2 --compile
    stage infer_compiled "$I_LIMIT" $B infer --device cuda --preset subllm-1.3b --lengths 2k \
        --batch-sizes 1 --dtypes bf16 --decode-tokens 32 --reps 3 --warmup 1 --no-bound --compile
  fi
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
