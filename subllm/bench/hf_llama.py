"""The Hugging Face baseline of `subllm bench train --hf` / `subllm bench infer --hf`: transformers'
`LlamaForCausalLM` holding exactly the weights of our LLaMA (`subllm.hf.llama.to_hf_llama`), timed
in the same interleaved rounds as our models.

Every SUBLLM speed-up here is quoted against our own `llama-*` path; this column keeps that baseline
honest - if our LLaMA ever became slower than transformers' (a regression in the shared layers,
attention or cache), SUBLLM's ratios would flatter it, and the column shows it. HF runs its SDPA
attention and its DynamicCache (rewound by `crop`), under the same autocast as ours. The cache's
name moved within transformers 5 (5.24: `cache=` / `.cache`; earlier 5.x, e.g. the 5.17 of a GPU
image: `past_key_values=`), so both are accepted.
"""

from __future__ import annotations

import torch

from subllm.dtype import autocast
from subllm.model.subllm import SubLLM


def hf_twin(llama: SubLLM, device) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with `llama`'s weights (same logits), SDPA attention, on `device`."""
    from subllm.hf.llama import to_hf_llama

    with torch.device(device):  # built where it runs (initialising 1.3B parameters on a CPU is slow)
        hf = to_hf_llama(llama)
    hf.config._attn_implementation = "sdpa"
    return hf.to(device).train(llama.training)


def hf_train_step(hf, ids: torch.Tensor, opt, dtype: str, device):
    """One full step (forward, loss, backward, optimizer) of `hf` on ids, as bench train times ours."""

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, device):
            loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _cache_kwarg(hf) -> str:
    """The name of the KV-cache argument of this transformers' `forward`."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def hf_prefill(hf, ids: torch.Tensor, dtype: str, device):
    """Prefill of the prompt (B, L) into a fresh DynamicCache; -> the cache."""

    def run():
        with torch.no_grad(), autocast(dtype, device):
            out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    return run


def hf_decode(hf, cache, start: int, dec: torch.Tensor, dtype: str, device):
    """Teacher-forced decode of dec (steps, B) from `cache` cropped back to `start` tokens each run;
    -> the last step's logits (B, V)."""
    name = _cache_kwarg(hf)

    def run():
        extra = cache.get_seq_length() - start
        if extra:
            cache.crop(-extra)  # transformers 5: a negative count removes that many tokens
        with torch.no_grad(), autocast(dtype, device):
            for tok in dec:
                out = hf(input_ids=tok[:, None], use_cache=True, **{name: cache})
        return out.logits[:, -1]

    return run
