#!/usr/bin/env bash
# The long-context retrieval protocol of issue 11 (docs/RESULTS.md, "Long context (issue 11)"):
# SUBLLM and the same-size LLaMA trained on the corpus with retrieval examples mixed in at a short
# window W = 256 (the demo model and budget: 275 steps x 8 x 256 tokens, seed 0), then passkey and
# mqar accuracy at 1x-16x W (256 ... 4096) with
#   (a) plain RoPE                     - the base runs as trained
#   (b) YaRN without training          - the base runs with rope_scaling yarn, factor = length / W
#   (c) PoSE training                  - the same tokens with --pose-target 4096
#   (d) YaRN + a short fine-tune       - from the base run: yarn factor 4, 50 steps x 2 x 1024 tokens
# Stage `long` (not in the default): the base pair again with twice the retrieval share (0.5) and
# 600 steps, evaluated with (a) and (b).
# One thread, one job at a time. Stages: train finetune eval (default: all, in that order); a
# finished run or evaluation (its summary.json / JSON file exists) is skipped.
#   bash benchmarks/retrieval_protocol.sh [STAGE ...]
# Needs the demo corpus packed into runs/base/data/tokens and held-out prose in data/corpus/val.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/retrieval}
DATA=${DATA:-runs/base/data/tokens}
HELDOUT=${HELDOUT:-data/corpus/val}
EXAMPLES=${EXAMPLES:-5}
LENGTHS=256,512,1024,2048,4096
STAGES=${*:-train finetune eval}
export OMP_NUM_THREADS=1
mkdir -p "$OUT/eval/long"

train() {  # NAME ARGS...
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  while [ -e "$OUT/PAUSE" ]; do sleep 10; done  # touch $OUT/PAUSE to hold the queue between jobs
  mkdir -p "$OUT/$name"
  echo "$(date -u +%FT%TZ) train $name" >> "$OUT/times.log"
  "$PY" -m subllm train --threads 1 --no-progress --dtype bf16 --save-every 0 --eval-batches 6 \
    --retrieval-mix 0.25 --seed 0 "$@" --out "$OUT/$name" --overwrite > "$OUT/$name/train.log" 2>&1
  echo "$(date -u +%FT%TZ) done $name" >> "$OUT/times.log"
}

evaluate() {  # NAME CHECKPOINT LENGTHS [ARGS...]
  local name=$1 ck=$2 lengths=$3; shift 3
  [ -f "$OUT/eval/$name.json" ] && return 0
  while [ -e "$OUT/PAUSE" ]; do sleep 10; done
  echo "$(date -u +%FT%TZ) eval $name" >> "$OUT/times.log"
  "$PY" -m subllm eval --checkpoint "$ck" --tasks passkey,mqar --lengths "$lengths" \
    --examples "$EXAMPLES" --heldout "$HELDOUT" --dtype bf16 --threads 1 --out "$OUT/eval/$name.json" "$@" \
    > "$OUT/eval/$name.log" 2>&1
}

BASE="--data $DATA --set dim=256 --set n_heads=4 --set n_kv_heads=4 --set ffn_dim=688 --batch-size 8 \
  --seq-len 256 --steps 275 --eval-every 68 --schedule-steps scale"
SUB="--preset subllm-small --structure TTT(TT(TT)TTT)TT"
LLAMA="--preset llama-small --structure TTTTTTTTTTTT"
YARN4='rope_scaling={"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":256}'
# fine-tune: every weight from the base run (--init-from), yarn factor 4, 1024-token windows,
# the Balancer / bypass schedules held at their final values (where the base run ended)
FT="--data $DATA --batch-size 2 --seq-len 1024 --steps 50 --eval-every 25 --set bypass_steps=1 \
  --set balancer_steps=1 --set $YARN4"

for stage in $STAGES; do
  case $stage in
    train)
      # shellcheck disable=SC2086
      train subllm_base $SUB $BASE
      train llama_base $LLAMA $BASE
      train subllm_pose $SUB $BASE --pose-target 4096
      train llama_pose $LLAMA $BASE --pose-target 4096
      ;;
    finetune)
      # shellcheck disable=SC2086
      train subllm_yarn_ft --preset subllm-small --init-from "$OUT/subllm_base" $FT
      train llama_yarn_ft --preset llama-small --init-from "$OUT/llama_base" $FT
      ;;
    eval)
      for m in subllm llama; do
        evaluate "${m}_plain" "$OUT/${m}_base" $LENGTHS
        for n in 512 1024 2048 4096; do  # (b): factor = length / W, one evaluation per length
          evaluate "${m}_yarn_${n}" "$OUT/${m}_base" $n --rope-scaling "yarn:$((n / 256))"
        done
        evaluate "${m}_pose" "$OUT/${m}_pose" $LENGTHS
        evaluate "${m}_yarn_ft" "$OUT/${m}_yarn_ft" $LENGTHS
      done
      "$PY" benchmarks/retrieval_table.py "$OUT/eval" | tee "$OUT/table.md"
      ;;
    long)  # a larger retrieval budget: mix 0.5, 600 steps (1.23M tokens), (a) and (b) only
      # shellcheck disable=SC2086
      train subllm_long $SUB ${BASE/--steps 275/--steps 600} --retrieval-mix 0.5
      train llama_long $LLAMA ${BASE/--steps 275/--steps 600} --retrieval-mix 0.5
      for m in subllm llama; do
        evaluate "long/${m}_plain" "$OUT/${m}_long" $LENGTHS
        for n in 512 1024 2048 4096; do
          evaluate "long/${m}_yarn_${n}" "$OUT/${m}_long" $n --rope-scaling "yarn:$((n / 256))"
        done
      done
      "$PY" benchmarks/retrieval_table.py "$OUT/eval/long" | tee "$OUT/table_long.md"
      ;;
    *) echo "unknown stage $stage (train | finetune | eval | long)"; exit 2 ;;
  esac
done
