"""Evaluation internals behind `subllm eval` (subllm/evals/suite.py): batched scoring, the lm-eval
adapter `SubLLMLM`, task builders and the offline lm-eval harness. Modules that need lm-eval
import it themselves; importing this package imports nothing heavy."""
