#!/usr/bin/env bash
# The selection ablation of docs/RESULTS.md (issue 9): 8 groups x 3 seeds at the demo's model and
# the 2026-11-28 demo budget (275 steps x 8 x 256 tokens), then `subllm bench selection`.
# About 4 CPU-hours on 2 cores (two runs at a time). Needs the demo corpus packed into
# runs/base/data/tokens (e.g. run `make demo` once, or `subllm train ... --data data/corpus`)
# and, for the unseen-prose rows, `subllm data fetch --extra --out data/extra`.
#   bash benchmarks/selection_ablation.sh [LANES]
set -euo pipefail
cd "$(dirname "$0")/.."
LANES=${1:-2}
OUT=runs/ablate
DATA=${DATA:-runs/base/data/tokens}
mkdir -p "$OUT"
CAL="--set threshold=calibrated"  # theta only observes training: each run is also measured with theta = 0
ALIGNED="$CAL --set select_loss=0.1 --set score_norm=true --set score_init_std=0.0625"
jobs=()
for seed in 0 1 2; do
  jobs+=("llama_s$seed --seed $seed --preset llama-small --structure TTTTTTTTTTTT")
  jobs+=("paper_s$seed --seed $seed $CAL")
  jobs+=("aux_s$seed --seed $seed $CAL --set select_loss=0.1")
  jobs+=("direct_s$seed --seed $seed $CAL --set balancer_fraction=direct")
  jobs+=("aligned_s$seed --seed $seed $ALIGNED")
  jobs+=("aligned_detach_s$seed --seed $seed $ALIGNED --set select_loss_detach=true")
  jobs+=("detach_l1_s$seed --seed $seed $ALIGNED --set select_loss=1.0 --set select_loss_detach=true")
  jobs+=("aligned_direct_s$seed --seed $seed $ALIGNED --set balancer_fraction=direct")
done
run_one() {
  name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  mkdir -p "$OUT/$name"
  OMP_NUM_THREADS=1 .venv/bin/python -m subllm train --preset subllm-small --data "$DATA" \
    --structure 'TTT(TT(TT)TTT)TT' --set dim=256 --set n_heads=4 --set n_kv_heads=4 --set ffn_dim=688 \
    --batch-size 8 --seq-len 256 --steps 275 --eval-every 68 --eval-batches 6 --save-every 0 \
    --dtype bf16 --schedule-steps scale --threads 1 --no-progress --out "$OUT/$name" --overwrite "$@" \
    > "$OUT/$name/train.log" 2>&1
}
export -f run_one; export OUT DATA
printf '%s\n' "${jobs[@]}" | xargs -P "$LANES" -I{} bash -c 'run_one {}'
OMP_NUM_THREADS=1 .venv/bin/python -m subllm bench selection --runs "$OUT/*" --unseen data/extra/val --max-tokens 16384
