"""`SubLLMLM`: a SubLLM + tokenizer as an lm-eval `LM` (loglikelihood, loglikelihood_rolling,
generate_until), batched, offline. lm-eval is imported when this module is.

Log-likelihoods go through `subllm.evals.scoring.score_tokens` (right-padded batches, shared
contexts run once); contexts longer than the model's window are cut from the left, as lm-eval's
Hugging Face backend does. Generation uses the KV-cached `subllm.inference.generation.generate` on
left-padded batches of prompts that share generation settings, then cuts each text at the first
stop string.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM

from subllm.errors import SubLLMError
from subllm.evals.scoring import KeepStats, autocast_context, rolling_windows, score_tokens


class SubLLMLM(TemplateLM):
    """lm-eval's view of a SubLLM (eval mode). `prefix` is the token put before an empty context
    and before a rolling text: by default the tokenizer's BOS if it adds one, else EOS (our packed
    training data separates documents with EOS)."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 64,
        dtype: str = "float32",
        prefix_token_id: int | None = None,
    ):
        super().__init__()
        if tokenizer is None:
            raise SubLLMError("the lm-eval adapter needs a tokenizer")
        if len(tokenizer) > model.config.vocab_size:
            raise SubLLMError(
                f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary {model.config.vocab_size}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        if self.max_length > model.config.max_seq_len:
            raise SubLLMError(f"max_length {self.max_length} exceeds max_seq_len {model.config.max_seq_len}")
        self.max_gen_toks = max_gen_toks
        self.dtype = dtype
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self._eot = int(eos)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else self._eot
        self.keep_stats = KeepStats()
        self.requests = self.truncated = 0  # requests seen / whose context was cut to fit the window

    # ---- TemplateLM plumbing ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def device(self):
        return self.model.embed.weight.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "subllm").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- scoring ------------------------------------------------------------------------------
    def _score(self, items):
        return score_tokens(self.model, items, self.batch_size, dtype=self.dtype, keep_stats=self.keep_stats)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_enc, continuation_enc)."""
        items = []
        for _, ctx, cont in requests:
            if not cont:
                raise SubLLMError("empty continuation in a loglikelihood request")
            whole = (ctx + cont)[-(self.max_length + 1) :]  # left-truncate to the window
            self.requests += 1
            self.truncated += len(whole) < len(ctx) + len(cont)
            n = min(len(cont), len(whole) - 1)
            items.append((whole, n))
        return [(s.logprob, s.greedy) for s in self._score(items)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (disjoint windows of max_length, after a prefix token)."""
        spans, items = [], []
        for req in requests:
            (text,) = req.args[:1]
            toks = self.tok_encode(text)
            windows = rolling_windows(toks, self.prefix_token_id, self.max_length, self.max_length)
            self.requests += 1
            spans.append((len(items), len(items) + len(windows)))
            items.extend(windows)
        scores = self._score(items)
        return [sum(s.logprob for s in scores[a:b]) for a, b in spans]

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from subllm.inference.generation import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idxs in groups.values():
            kw = dict(requests[idxs[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if not kw.pop("do_sample", False):
                temperature = 0.0
            max_new = max(1, min(max_new, self.max_length - 1))
            full = [self.tok_encode(requests[i].args[0]) for i in idxs]
            prompts = [p[-(self.max_length - max_new) :] for p in full]
            self.requests += len(full)
            self.truncated += sum(len(p) < len(f) for p, f in zip(prompts, full))
            order = sorted(range(len(idxs)), key=lambda j: -len(prompts[j]))
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                width = max(max(len(prompts[j]) for j in chunk), 1)
                ids = torch.full((len(chunk), width), self.model.config.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, j in enumerate(chunk):  # left padding
                    p = prompts[j] or [self.prefix_token_id]
                    ids[r, width - len(p) :] = torch.tensor(p)
                    mask[r, width - len(p) :] = 1
                with autocast_context(self.dtype, self.device):
                    gen = generate(
                        self.model,
                        ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        max_new_tokens=max_new,
                        temperature=temperature,
                        eos_token_id=self.eot_token_id,
                        seed=1234 if temperature > 0 else None,
                    )
                for r, j in enumerate(chunk):
                    text = self.tok_decode(_until_eos(gen[r, width:].tolist(), self.eot_token_id))
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[idxs[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[idxs[j]].args, text)
        return out  # type: ignore[return-value]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
