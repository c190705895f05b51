#!/usr/bin/env bash
# The keep-ratio sweep of issue 11 (item 6), docs/RESULTS.md: the demo SUBLLM (TTT(TT(TT)TTT)TT,
# d 256) trained at W = 1024 tokens with r in {0.8, 0.64, 0.5, 0.4, 0.3} at both S, on the same
# tokens (STEPS=200 x 2 x 1024 = 410k tokens, 73% of the demo budget, cut to fit one session;
# seed 0; retrieval examples mixed in at 0.25), then per r: eval-mode validation loss (the run's
# final evaluation, 12 x 2 x 1024 tokens), passkey / mqar accuracy at W, and the training speed-up
# over the same-size LLaMA at W (benchmarks/keep_ratio_sweep.py --bench: interleaved `subllm bench
# train` steps). One thread, one job at a time; finished runs are skipped.
#   bash benchmarks/keep_ratio_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/sweep}
DATA=${DATA:-runs/base/data/tokens}
HELDOUT=${HELDOUT:-data/corpus/val}
RATIOS=${RATIOS:-0.8 0.64 0.5 0.4 0.3}
W=1024
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
for r in $RATIOS; do
  run="$OUT/r$r"
  if [ ! -f "$run/summary.json" ]; then
    while [ -e "$OUT/PAUSE" ]; do sleep 10; done
    mkdir -p "$run"
    echo "$(date -u +%FT%TZ) train r$r" >> "$OUT/times.log"
    "$PY" -m subllm train --preset subllm-small --structure 'TTT(TT(TT)TTT)TT' --keep-ratio "$r,$r" \
      --data "$DATA" --set dim=256 --set n_heads=4 --set n_kv_heads=4 --set ffn_dim=688 \
      --batch-size 2 --seq-len $W --steps ${STEPS:-200} --eval-every 0 --eval-batches 12 --save-every 0 \
      --schedule-steps scale --retrieval-mix 0.25 --seed 0 --dtype bf16 --threads 1 --no-progress \
      --out "$run" --overwrite > "$run/train.log" 2>&1
  fi
  if [ ! -f "$run/retrieval.json" ]; then
    echo "$(date -u +%FT%TZ) eval r$r" >> "$OUT/times.log"
    "$PY" -m subllm eval --checkpoint "$run" --tasks passkey,mqar --lengths $W --examples 8 \
      --heldout "$HELDOUT" --dtype bf16 --threads 1 --out "$run/retrieval.json" > "$run/eval.log" 2>&1
  fi
done
echo "$(date -u +%FT%TZ) bench" >> "$OUT/times.log"
[ -f "$OUT/speed.json" ] || "$PY" benchmarks/keep_ratio_sweep.py "$OUT" --bench --ratios "${RATIOS// /,}" \
  --length $W --reps 3
"$PY" benchmarks/keep_ratio_sweep.py "$OUT" --plot docs/keep_ratio_sweep.png | tee "$OUT/table.md"
