#!/usr/bin/env bash
# Issue 20 with the tokens a CPU cannot give: SmolLM2-135M -> SUBLLM by distillation on one GPU, the
# grid's recipe (benchmarks/real_model_grid.sh: identity start, keep annealed from 1.0, pure KL to
# the source, AdamW 3e-5, scores 10x, Balancer off, bf16) at batch 16 x 512 for up to STEPS steps or
# TRAIN_S seconds of training, several points at once on the one GPU; then each point's held-out loss
# on the three registers (and the source's), on the GPU.
#
# Inputs, made here by:
#   python benchmarks/pack_weights.py pack runs/smol_llama .devpack --parts 2     # 2 x 46 MiB, lossless
#   tar cJf .devpack/text.tar.xz -C data corpus -C ../runs/grid registers      # corpus + registers
#   cp -r RUN/data/tokens .devpack/part0/tokens   # optional: the corpus packed by a trainer run here
#                                                 # (WORK=/tmp/upt), so no trainer tokenizes there
# carried in two calls of a lease (64 MiB each): .devpack/part0 first, then .devpack/part1 and
# .devpack/text.tar.xz with this script. Between the calls the warm machine kept part0's weights file
# but not its small files or its tokens folder (2026-12-04): every part holds index.json, and
# without the tokens each trainer tokenizes the corpus there (~15 s).
# Output: OUT/uptrain.tar.gz (logs, metrics.jsonl, summaries, eval JSONs; no weights), re-packed every
# 15 s so a lease that runs out keeps what was done.
#   PACK_OUT=$OUT bash benchmarks/gpu_uptrain.sh [WORK_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/uptrain}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1200}
ANNEAL=${ANNEAL:-300}
TRAIN_S=${TRAIN_S:-100}
BATCH=${BATCH:-16}
EVAL_EVERY=${EVAL_EVERY:-100}
TOKENS=${TOKENS:-16384}  # held-out tokens per register
POINTS=${POINTS:-sub064s router064 sub080s}
PACK_OUT=${PACK_OUT:-$WORK}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
NESTED='TTTTTT(TTTTTT(TTTTTT)TTTTTT)TTTTTT'
RECIPE="--optimizer adamw --lr 3e-5 --set score_lr_scale=10 --set balancer_prob_start=0 --set balancer_prob_end=0 --distill-weight 1.0"
ROUTER="--train-only subsample,bypass --optimizer adamw --lr 1e-3 --set score_lr_scale=1 --set balancer_prob_start=0 --set balancer_prob_end=0 --distill-weight 1.0"
point_args() {
  case "$1" in
    sub064s) echo "--structure $NESTED --keep-ratio 0.64 $RECIPE --set subtraction=straight" ;;
    sub080s) echo "--structure $NESTED --keep-ratio 0.8 $RECIPE --set subtraction=straight" ;;
    sub090s) echo "--structure $NESTED --keep-ratio 0.9 $RECIPE --set subtraction=straight" ;;
    router064) echo "--structure $NESTED --keep-ratio 0.64 $ROUTER --set subtraction=straight" ;;
    *) echo "unknown point $1" >&2; return 1 ;;
  esac
}
mkdir -p "$WORK/evals" "$PACK_OUT"
repack() {
  (cd "$WORK" && tar czf "$PACK_OUT/uptrain.tar.gz.tmp" --ignore-failed-read ./*.log ./*.txt evals \
    $(ls -d ./*/metrics.jsonl ./*/summary.json ./*/train_config.json 2>/dev/null) 2>/dev/null) \
    && mv "$PACK_OUT/uptrain.tar.gz.tmp" "$PACK_OUT/uptrain.tar.gz"
}
{ nvidia-smi -L 2>/dev/null; "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch",
torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")'; date -u; } \
  | tee "$WORK/env.txt"
(while sleep 15; do repack; done) &
REPACKER=$!
t0=$SECONDS
"$PY" benchmarks/pack_weights.py unpack .devpack/part0 .devpack/part1 --out "$WORK/source" || exit 1
tar xJf .devpack/text.tar.xz -C "$WORK" || exit 1
DATA="$WORK/corpus"  # raw text, tokenized by each trainer; or the shards packed here beforehand:
if [ -d .devpack/part0/tokens ]; then DATA="$PWD/.devpack/part0/tokens"; fi
echo "inputs ready in $((SECONDS - t0)) s; data $DATA"

evaluate() {  # checkpoint name
  for reg in val prose legal; do
    "$PY" -m subllm eval --checkpoint "$1" --tasks loss --text "$WORK/registers/$reg" --seq-len 512 \
      --max-tokens "$TOKENS" --batch-size 8 --dtype bf16 --device "$DEVICE" --out "$WORK/evals/$2_$reg.json" \
      > "$WORK/evals/$2_$reg.log" 2>&1
  done
}
evaluate "$WORK/source" source &
pids=($!)
for p in $POINTS; do
  # shellcheck disable=SC2046  # word lists on purpose
  ( "$PY" -m subllm train --init-from "$WORK/source" --distill-from "$WORK/source" --data "$DATA" \
      $(point_args "$p") --set keep_anneal_steps="$ANNEAL" --batch-size "$BATCH" --seq-len 512 --steps "$STEPS" \
      --time-limit "$TRAIN_S" --eval-every "$EVAL_EVERY" --eval-batches 8 --save-every 0 --schedule-steps scale \
      --dtype bf16 --device "$DEVICE" --seed 0 --no-progress --out "$WORK/$p" > "$WORK/$p.log" 2>&1 \
    && evaluate "$WORK/$p" "$p" ) &
  pids+=($!)
done
wait "${pids[@]}"
echo "all done in $((SECONDS - t0)) s"
for p in $POINTS; do echo "== $p"; tail -n 4 "$WORK/$p.log"; done
for f in "$WORK"/evals/*.json; do
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1].rsplit("/", 1)[1], round(r["loss"]["loss"], 4), r["loss"].get("keep_fractions"))' "$f"
done
kill "$REPACKER" 2>/dev/null
repack
