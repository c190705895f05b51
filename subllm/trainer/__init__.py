"""The training wing, one concern per module: `config` (TrainConfig, flag/file parsing and
validation), `data` (resolving --data to packed shards + tokenizer), `evaluation` (eval-mode and
train-mode validation), `loop` (the training loop), `uptrain` (--init-from: starting from a trained
LLaMA), `checkpoint` (atomic, verified checkpoints and exact resume), `distributed` (DDP / FSDP2
wrapping applied from outside the model), `compiled` (torch.compile of the model), `metrics`
(the metrics log and plots), `pose` and `retrieval_mix` (long-context data). The CLI verb is
subllm/cli/train.py."""
