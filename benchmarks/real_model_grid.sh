#!/usr/bin/env bash
# Issue 20 item 4: the comparison grid on SmolLM2-135M, every point from the same source (an all-T
# SubLLM folder, e.g. made by `subllm data fetch-model smollm2 --convert-to runs/real/llama`), the same
# tokens (same data, seed and order) and the same recipe: identity start, keep ratio annealed from 1.0,
# pure distillation (w = 1: KL to the source only, so the corpus' register is not learned on top).
# Per point: training with in-run evaluations (loss-vs-tokens curves in its metrics.jsonl), held-out loss on
# three registers, speed against its own LLaMA (bench infer, 2k context, batch 1, bf16) and passkey
# retrieval at 512-4k (PASSKEY examples per length and depth, filler from the prose register); the same
# for NAME_recal, the point's weights with each S's threshold set by `subllm recalibrate` (RECAL=1).
# Points whose name ends in m train (and recalibrate) on data/mix instead: the same prose plus the Python
# documentation (`subllm data fetch --technical`), at lr 1e-4, a quarter of the rows passkey / mqar
# (--retrieval-mix 0.25). Finished points are skipped, so the script can be re-run after a crash or with
# more points.
#   SOURCE=runs/real/llama STEPS=48 THREADS=1 bash benchmarks/real_model_grid.sh runs/grid [POINT ...]
# (docs/RESULTS.md: STEPS=48 THREADS=1, two drivers at once on the two cores, each with its own points)
# benchmarks/real_model_table.py then writes the table, the curves and the speed-vs-loss frontier.
set -euo pipefail
OUT=${1:-runs/grid}
shift || true
SOURCE=${SOURCE:-runs/real/llama}
STEPS=${STEPS:-64}
ANNEAL=${ANNEAL:-$((STEPS * 5 / 8))}
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-16384}  # held-out tokens per register
RECAL=${RECAL:-1}        # 1: also each point with its thresholds recalibrated on the training text
PASSKEY=${PASSKEY:-7}    # passkey examples per length and depth (x 3 depths; 0: no passkey)
PY=${PY:-.venv/bin/python}
NESTED='TTTTTT(TTTTTT(TTTTTT)TTTTTT)TTTTTT'  # the paper's 5:5:2 shape on 30 layers
WIDE='TTTT(TTTTTTTTTTTTTTTTTTTTTT)TTTT'       # one S over the middle 22 layers
MOD='TMTMTMTMTMTMTMTMTMTMTMTMTMTMTM'          # MoD: every other layer routed
SEQ='TTTTTT(TTTTTT)(TTTTTT)(TTTTTT)TTTTTT'    # three S of 6 layers one after another, not nested
RECIPE=(--optimizer adamw --lr 3e-5 --set score_lr_scale=10 --set balancer_prob_start=0 --set balancer_prob_end=0
  --distill-weight 1.0)
ROUTER=(--train-only subsample,bypass --optimizer adamw --lr 1e-3 --set score_lr_scale=1 --set balancer_prob_start=0
  --set balancer_prob_end=0 --distill-weight 1.0)

point_args() {  # name -> the train arguments of that point
  case "$1" in
    sub090) echo "--structure $NESTED --keep-ratio 0.9 ${RECIPE[*]}" ;;
    sub080) echo "--structure $NESTED --keep-ratio 0.8 ${RECIPE[*]}" ;;
    sub064) echo "--structure $NESTED --keep-ratio 0.64 ${RECIPE[*]}" ;;
    sub064g) echo "--structure $NESTED --keep-ratio 0.64 ${RECIPE[*]} --set subtraction=grad" ;;
    sub064s) echo "--structure $NESTED --keep-ratio 0.64 ${RECIPE[*]} --set subtraction=straight" ;;
    router064) echo "--structure $NESTED --keep-ratio 0.64 ${ROUTER[*]} --set subtraction=straight" ;;
    sub050) echo "--structure $NESTED --keep-ratio 0.5 ${RECIPE[*]}" ;;
    wide064) echo "--structure $WIDE --keep-ratio 0.64 ${RECIPE[*]}" ;;
    router080) echo "--structure $NESTED --keep-ratio 0.8 ${ROUTER[*]}" ;;
    mod050) echo "--structure $MOD --set mod_capacity=0.5 ${RECIPE[*]}" ;;
    sub064m) echo "--structure $NESTED --keep-ratio 0.64 ${RECIPE[*]/3e-5/1e-4} --set subtraction=straight \
      --retrieval-mix 0.25" ;;
    router064m) echo "--structure $NESTED --keep-ratio 0.64 ${ROUTER[*]} --set subtraction=straight \
      --retrieval-mix 0.25" ;;  # router tuning on sub064m's data and schedule
    seq056m) echo "--structure $SEQ --keep-ratio 0.563 ${RECIPE[*]/3e-5/1e-4} --set subtraction=straight \
      --retrieval-mix 0.25" ;;  # sub064m's FLOP ideal: 12 + 18 r = 12 + 12 (0.64) + 6 (0.64^2) layers a token
    *) echo "unknown point $1" >&2; return 1 ;;
  esac
}

point_data() {  # name -> its training text (recalibration uses its train/ split)
  case "$1" in
    *m) echo data/mix ;;  # the literary mix + the Python documentation (data fetch --technical)
    *) echo data/corpus ;;
  esac
}

POINTS=("$@")
[ ${#POINTS[@]} -gt 0 ] || POINTS=(sub080 sub064g sub064s router064 mod050 wide064 sub090 sub050 sub064)
$PY -m subllm data fetch --extra  # the corpus + Brown, KJV, Austen (training text and two registers), if absent
if printf '%s\n' "${POINTS[@]}" | grep -q 'm$'; then  # a point trained on the mix (see point_data)
  $PY -m subllm data fetch --extra --technical --out data/mix
fi
mkdir -p "$OUT/registers/val" "$OUT/registers/prose" "$OUT/registers/legal"
copy_new() {  # FILE DIR: copy unless present (another driver's eval may be reading the copy)
  if [ -f "$1" ] && [ ! -f "$2/$(basename "$1")" ]; then cp "$1" "$2/"; fi
}
for f in shakespeare_hamlet milton_areopagitica; do copy_new "data/corpus/val/$f.txt" "$OUT/registers/val"; done
for f in austen_persuasion kjv_john; do copy_new "data/corpus/val/$f.txt" "$OUT/registers/prose"; done
for f in GPL-3 Apache-2.0 MPL-2.0 LGPL-2.1; do  # nothing like it in the training text
  if [ -f "/usr/share/common-licenses/$f" ] && [ ! -f "$OUT/registers/legal/$f.txt" ]; then
    cp "/usr/share/common-licenses/$f" "$OUT/registers/legal/$f.txt"
  fi
done

evaluate() {  # checkpoint name -> $OUT/evals/name_{val,prose,legal}.json
  mkdir -p "$OUT/evals"
  for reg in val prose legal; do
    [ -f "$OUT/evals/$2_$reg.json" ] && continue
    $PY -m subllm eval --checkpoint "$1" --tasks loss --text "$OUT/registers/$reg" --seq-len 512 \
      --max-tokens "$TOKENS" --batch-size 4 --dtype bf16 --threads "$THREADS" --out "$OUT/evals/$2_$reg.json" \
      > "$OUT/evals/$2_$reg.log" 2>&1
  done
}

passkey() {  # checkpoint name -> $OUT/evals/name_passkey.json (filler: the prose register)
  [ "$PASSKEY" -gt 0 ] && [ ! -f "$OUT/evals/$2_passkey.json" ] || return 0
  $PY -m subllm eval --checkpoint "$1" --tasks passkey --lengths 512,1k,2k,4k --examples "$PASSKEY" \
    --heldout "$OUT/registers/prose" --dtype bf16 --threads "$THREADS" --out "$OUT/evals/$2_passkey.json" \
    > "$OUT/evals/$2_passkey.log" 2>&1
}

measure() {  # checkpoint name -> held-out losses, speed against its LLaMA, passkey
  evaluate "$1" "$2"
  if [ ! -f "$OUT/evals/$2_speed.log" ]; then
    $PY -m subllm bench infer --checkpoint "$1" --text "$OUT/registers/prose/austen_persuasion.txt" \
      --lengths 2k --batch-sizes 1 --dtypes bf16 --decode-tokens 32 --reps 3 --threads "$THREADS" \
      > "$OUT/evals/$2_speed.tmp" 2>&1 && mv "$OUT/evals/$2_speed.tmp" "$OUT/evals/$2_speed.log"
  fi
  passkey "$1" "$2"
}

evaluate "$SOURCE" source
passkey "$SOURCE" source
for p in "${POINTS[@]}"; do
  args=$(point_args "$p")
  data=$(point_data "$p")
  if [ ! -f "$OUT/$p/summary.json" ]; then
    resume=--overwrite
    [ -d "$OUT/$p/checkpoints" ] && resume=--resume
    # shellcheck disable=SC2086  # args is a word list on purpose
    $PY -m subllm train --init-from "$SOURCE" --distill-from "$SOURCE" --data "$data" $args \
      --set keep_anneal_steps="$ANNEAL" --batch-size 4 --seq-len 512 --steps "$STEPS" --eval-every $((STEPS / 4)) \
      --eval-batches 4 --save-every $((STEPS / 4)) --schedule-steps scale --dtype bf16 --threads "$THREADS" \
      --seed 0 --no-progress --out "$OUT/$p" $resume > "$OUT/$p.log" 2>&1
  fi
  measure "$OUT/$p" "$p"
  if [ "$RECAL" = 1 ]; then  # the same weights, thresholds set from the training text (subllm recalibrate)
    [ -f "$OUT/${p}_recal/config.json" ] || $PY -m subllm recalibrate --checkpoint "$OUT/$p" --text "$data/train" \
      --out "$OUT/${p}_recal" --seq-len 512 --max-tokens 16384 --dtype bf16 --threads "$THREADS" > "$OUT/${p}_recal.log" 2>&1
    measure "$OUT/${p}_recal" "${p}_recal"
  fi
  echo "$p done $(date -u +%H:%M)"
done
