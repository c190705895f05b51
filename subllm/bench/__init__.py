"""Benchmarks of SUBLLM against the same-size LLaMA, always side by side in one process.

- `infer`  prefill time, decode tokens/s, KV-cache bytes, keep fractions, FLOP-ideal ratios
- `train`  training step time and memory vs LLaMA and the zero-overhead bound
- `common` timing with warm-up and interleaved repetitions, tables, environment, the JSON line
- `cli`    `subllm bench infer | train`

Each benchmark prints a table and then ONE JSON line last (docs/design.md).
"""
