"""Training, split by concern: `config` (TrainConfig, flag/file parsing and validation), `data`
(resolving --data to packed shards + tokenizer), `evaluation` (eval-mode and train-mode validation),
`loop` (the training loop itself), `uptrain` (--init-from: starting from a trained LLaMA). The CLI
verb is `subllm.train`; checkpoints are `subllm.checkpoint`, scale-out `subllm.distributed`, metrics
and plots `subllm.metrics`."""
