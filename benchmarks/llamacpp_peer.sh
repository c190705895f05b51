#!/usr/bin/env bash
# Issue 22 item 5: llama.cpp as the peer (not run by CI). Builds llama-cpp-python (pinned, CPU only,
# from PyPI's sdist) into its own virtualenv outside the repo, skipped when already built; writes the
# GGUFs of our LLaMA at F32, BF16 and Q8_0 (benchmarks/llamacpp_gguf.py), skipped when present; then
# runs benchmarks/llamacpp_peer.py in our .venv, which drives llama.cpp in the built venv as a
# subprocess (benchmarks/llamacpp_worker.py). Arguments are passed on to llamacpp_peer.py:
#   bash benchmarks/llamacpp_peer.sh --subllm runs/grid/sub080
# From scratch on 2 vCPUs: ~14 min for the build (JOBS=1, cores shared), ~1 min for the GGUFs, then the
# run: 12 contestants x (512, 2048) x (1, 2 threads) x (1 warm-up + 3 rounds), roughly 15-25 min (an
# estimate from a smoke run on a loaded machine, not a measurement).
# Environment: LLAMACPP_VENV (default runs/llamacpp_venv), OUT (default runs/llamacpp_peer),
# LLAMA (our all-T LLaMA, default runs/real/llama: `make real-model` makes it), REFERENCE (the package's GGUF, source of the
# tokenizer metadata), PY (our interpreter, default .venv/bin/python), JOBS (build parallelism,
# default 2), BUILD_ONLY=1 to stop after the build. Everything runs under nice -n 19.
set -euo pipefail
VERSION=0.3.36
VENV=${LLAMACPP_VENV:-runs/llamacpp_venv}
OUT=${OUT:-runs/llamacpp_peer}
LLAMA=${LLAMA:-runs/real/llama}
REFERENCE=${REFERENCE:-data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${PY:-.venv/bin/python}
BASE_PY=${BASE_PY:-python3.11}

if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "building llama-cpp-python==$VERSION into $VENV (CPU only; log $VENV.build.log)" >&2
  "$BASE_PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # CPU only: no CUDA, Metal, Vulkan or BLAS; -march=native, llama.cpp's own default.
  CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON" \
    CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
    nice -n 19 "$VENV/bin/pip" install --no-binary llama-cpp-python --no-cache-dir --verbose \
    "llama-cpp-python==$VERSION" >"$VENV.build.log" 2>&1 || { tail -40 "$VENV.build.log" >&2; exit 1; }
fi
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0

NAME=$(basename "$LLAMA")
for T in F32 BF16 Q8_0; do
  if [ ! -s "$OUT/gguf/$NAME.$T.gguf" ]; then
    PYTHONPATH=. nice -n 19 "$PY" benchmarks/llamacpp_gguf.py --checkpoint "$LLAMA" --reference "$REFERENCE" \
      --types "$T" --out "$OUT/gguf"
  fi
done
PYTHONPATH=. exec nice -n 19 "$PY" benchmarks/llamacpp_peer.py --llamacpp-python "$VENV/bin/python" \
  --llama "$LLAMA" --reference "$REFERENCE" --gguf-dir "$OUT/gguf" --out "$OUT" "$@"
