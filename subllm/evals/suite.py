"""`subllm eval`: evaluate a checkpoint - text loss / bits per byte and few-shot tasks via lm-eval.

    subllm eval --checkpoint runs/demo/subllm --tasks loss,mmlu,bbh,cloze,next_sentence

- loss: mean next-token loss (nats), perplexity and bits per byte on any text (a .txt file or a
  folder of them; default data/corpus/val), scored with sliding windows (default: the training
  sequence length from the run's train_config.json, else max_seq_len; stride default half a
  window), every token exactly once, each file starting after
  one prefix token (EOS: the document separator of our packed training data). Bytes are the
  UTF-8 bytes of the text, so bits per byte compares models with different tokenizers. Also
  reports the realised eval-mode keep fraction of every S (docs/method.md section 3).
- mmlu, bbh, bbh_mc, cloze, next_sentence: the tasks of subllm/tasks/, built at run time into a
  cache directory (subllm/evals/tasks.py) and run through lm-eval with the `SubLLMLM` adapter.

Prints a results table, then one JSON line with every number (also written to --out).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from subllm.config import module_names
from subllm.data.tokenizer import load_tokenizer_for
from subllm.dtype import autocast, dtype_line, dtype_record
from subllm.errors import SubLLMError
from subllm.evals.selection import format_selection
from subllm.evals.tasks import read_texts
from subllm.model.io import resolve_checkpoint
from subllm.model.subllm import load_model

DEFAULT_TEXT = Path("data/corpus/val")
ALL_TASKS = ("loss", "mmlu", "bbh", "bbh_mc", "cloze", "next_sentence")
RETRIEVAL_TASKS = ("passkey", "mqar")  # long-range, at --lengths (subllm/evals/retrieval.py); not in 'all'
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}  # --dtype's names before `auto`


# ---- loading --------------------------------------------------------------------------------------


def default_window(checkpoint, model) -> int:
    """The sequence length the model was trained with (`seq_len` of the train_config.json that
    `subllm train` writes beside the model) capped at max_seq_len; else max_seq_len. Windows longer
    than training would measure RoPE extrapolation, not the model."""
    ck = resolve_checkpoint(checkpoint)
    for d in (ck, ck.parent.parent):
        f = d / "train_config.json"
        if f.is_file():
            try:
                n = int(json.loads(f.read_text()).get("seq_len") or 0)
            except (ValueError, TypeError, json.JSONDecodeError):
                n = 0
            if n > 0:
                return min(n, model.config.max_seq_len)
    return model.config.max_seq_len


# ---- text loss / bits per byte --------------------------------------------------------------------
def text_loss(
    model,
    tokenizer,
    texts: list[str],
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    prefix_token_id: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Loss (nats/token), perplexity and bits per byte over `texts` (each scored from its start).
    With `max_tokens`, stops after that many tokens; the bytes are those of the text they cover."""
    from subllm.evals.scoring import KeepStats, rolling_windows, score_tokens

    L = seq_len or model.config.max_seq_len
    if L > model.config.max_seq_len:
        raise SubLLMError(f"--seq-len {L} exceeds the model's max_seq_len {model.config.max_seq_len}")
    S = stride or max(1, L // 2)
    prefix = prefix_token_id if prefix_token_id is not None else model.config.eos_token_id
    nll = n_tok = n_bytes = 0.0
    keep = KeepStats()
    budget = max_tokens
    for text in texts:
        if budget is not None and budget <= 0:
            break
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=budget is not None)
        ids = enc["input_ids"]
        if budget is not None and len(ids) > budget:
            ids = ids[:budget]
            text = text[: enc["offset_mapping"][budget - 1][1]]
        if not ids:
            continue
        if max(ids) >= model.config.vocab_size:
            raise SubLLMError("the tokenizer produces ids beyond the model's vocabulary (wrong --tokenizer?)")
        scores = score_tokens(
            model, rolling_windows(ids, prefix, L, S), batch_size, dtype=dtype, keep_stats=keep
        )
        nll -= sum(s.logprob for s in scores)
        n_tok += len(ids)
        n_bytes += len(text.encode("utf-8"))
        if budget is not None:
            budget -= len(ids)
    if not n_tok:
        raise SubLLMError("no tokens to score (empty text?)")
    loss = nll / n_tok
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nll / math.log(2) / n_bytes,
        "tokens": int(n_tok),
        "bytes": int(n_bytes),
        "bytes_per_token": n_bytes / n_tok,
        "seq_len": L,
        "stride": S,
        "keep_fractions": keep.fractions(),
    }


def text_windows(model, tokenizer, texts, seq_len, batch_size, max_tokens=None) -> list:
    """Non-overlapping windows (B, seq_len) of `texts` (eos after each), as in training; with
    `max_tokens`, at most max_tokens / len(texts) tokens from each text (diverse, not the first),
    and when that is less than a window, one window from each of an even spread of the texts (a
    folder of many files is sampled across, not read from its first files)."""
    from subllm.evals.selection import token_windows

    ids: list[int] = []
    fit = None if max_tokens is None else max(1, max_tokens // seq_len)
    if fit is not None and len(texts) > fit:
        texts = [texts[i * len(texts) // fit] for i in range(fit)]
    per_text = None if max_tokens is None else max(seq_len, max_tokens // max(1, len(texts)))
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"][:per_text] + [model.config.eos_token_id]
    windows = token_windows(ids[:max_tokens], seq_len, batch_size)
    if not windows:
        raise SubLLMError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return windows


def text_selection(model, tokenizer, texts, seq_len, batch_size, dtype, max_tokens=None) -> dict:
    """Keep per S under the inference rule and under training top-k, their agreement, the score
    distribution and the loss in both modes (subllm/evals/selection.py) over non-overlapping windows of
    `texts`, as in training; with `max_tokens`, at most max_tokens / len(texts) from each text."""
    from subllm.evals.scoring import autocast_context
    from subllm.evals.selection import measure_selection

    windows = text_windows(model, tokenizer, texts, seq_len, batch_size, max_tokens)
    device = next(model.parameters()).device
    res = measure_selection(model, [w.to(device) for w in windows], lambda: autocast_context(dtype, device))
    return {"tokens": sum(w.numel() for w in windows), **res}


# ---- the whole evaluation ------------------------------------------------------------------------
def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    bad = [t for t in names if t not in ALL_TASKS + RETRIEVAL_TASKS]
    if bad or not names:
        choices = ", ".join(ALL_TASKS + RETRIEVAL_TASKS)
        raise SubLLMError(f"unknown task(s) {bad}; choose from {choices} or 'all'")
    return list(dict.fromkeys(names))


def evaluate(
    checkpoint,
    tasks: list[str],
    tokenizer=None,
    text=None,
    heldout=None,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    limit: int | None = None,
    max_tokens: int | None = None,
    n_text: int = 200,
    mmlu_shots: int = 5,
    bbh_shots: int = 2,
    cache_dir=None,
    seed: int = 1234,
    verbose: bool = False,
    log=print,
    lengths: list[int] | None = None,
    depths: list[float] | None = None,
    examples: int = 5,
    pairs: int = 8,
    rope_scaling: str | None = None,
    quantize: str = "none",
    device: str = "cpu",
) -> dict:
    """Every number of `subllm eval` as a dict: {"checkpoint", "model", "loss"?, "tasks"?}.
    `dtype`: auto | bf16 | fp32 (or float32 / bfloat16), resolved for the model's device.
    `device`: where the model runs ("cpu", "cuda"); the weight-only quantizations are CPU kernels.
    `rope_scaling`: evaluate with this RoPE scaling instead of the checkpoint's (e.g. "yarn:4":
    YaRN without training; subllm/model/rope.py parse_rope_override)."""
    torch.manual_seed(seed)
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SubLLMError("--device cuda asked for, but torch sees no CUDA device")
    if quantize != "none" and not str(device).startswith("cpu"):
        raise SubLLMError(f"--quantize {quantize} runs CPU kernels: use it with --device cpu")
    model = load_model(checkpoint).to(device)
    params = model.num_params()  # before quantization turns the layers' weights into buffers
    if quantize != "none":
        from subllm.inference.quantize import apply_quantization

        model = apply_quantization(model, quantize)
    if rope_scaling is not None:
        from subllm.model.rope import parse_rope_override, with_rope_scaling

        trained = default_window(checkpoint, model)
        model.config = with_rope_scaling(model.config, parse_rope_override(rope_scaling, trained))
        log(f"RoPE scaling overridden: {model.config.rope_scaling or 'plain'} (trained at {trained} tokens)")
    device = str(next(model.parameters()).device)
    tok = load_tokenizer_for(checkpoint, tokenizer)
    c = model.config
    seq_len = seq_len or default_window(checkpoint, model)
    out: dict = {
        "checkpoint": str(checkpoint),
        "model": {"structure": c.structure, "keep_ratios": c.keep_ratios, "params": params},
        "rope_scaling": c.rope_scaling,
        "rope_override": rope_scaling,
        "quantize": quantize,
        "window": seq_len,
        **dtype_record(dtype, device),
    }
    log(f"dtype {dtype_line(dtype, device)}")
    dtype = "bfloat16" if out["dtype"] == "bf16" else "float32"  # the names subllm/evals/scoring.py takes
    if "loss" in tasks:
        src = text if text is not None else DEFAULT_TEXT
        if text is None and not DEFAULT_TEXT.exists():
            raise SubLLMError(f"task 'loss' needs --text FILE_OR_DIR ({DEFAULT_TEXT} does not exist)")
        t0 = time.time()
        texts = read_texts(src)
        out["loss"] = {
            "text": str(src),
            **text_loss(model, tok, texts, seq_len, stride, batch_size, dtype, max_tokens=max_tokens),
        }
        log(f"loss on {src}: {out['loss']['loss']:.4f} nats/token in {time.time() - t0:.1f} s")
        if c.n_subsamples:
            out["selection"] = text_selection(model, tok, texts, seq_len, batch_size, dtype, max_tokens)
            log(f"selection on {src} (windows of {seq_len} tokens, eval rule vs training top-k):")
            log(format_selection(out["selection"], c.keep_ratios, module_names(c.structure)))
    retrieval = [t for t in tasks if t in RETRIEVAL_TASKS]
    if retrieval:
        from subllm.evals.retrieval import run_retrieval

        src = heldout or text or DEFAULT_TEXT
        if not Path(src).exists():
            raise SubLLMError(f"passkey/mqar need filler prose: --heldout FILE_OR_DIR ({src} does not exist)")
        filler = "\n".join(read_texts(src))
        amp = (lambda: autocast(dtype, device)) if dtype == "bfloat16" else None
        out["retrieval"] = {
            "filler": str(src),
            **run_retrieval(
                model, tok, filler, retrieval, lengths or [seq_len], depths or [0.1, 0.5, 0.9],
                examples, pairs, seed, amp, log,
            ),
        }  # fmt: skip
    lm_tasks = [t for t in tasks if t not in ("loss", *RETRIEVAL_TASKS)]
    if lm_tasks:
        from subllm.evals.harness import build_tasks, default_cache_dir, run_tasks
        from subllm.evals.lm import SubLLMLM

        if heldout is None and any(t in ("cloze", "next_sentence") for t in lm_tasks):
            heldout = text if text is not None else (DEFAULT_TEXT if DEFAULT_TEXT.exists() else None)
        key = json.dumps(
            [
                sorted(lm_tasks),
                str(Path(heldout).resolve()) if heldout else None,
                mmlu_shots,
                bbh_shots,
                n_text,
                seed,
            ]
        )
        built = Path(cache_dir or default_cache_dir()) / hashlib.sha256(key.encode()).hexdigest()[:16]
        info = build_tasks(lm_tasks, built, heldout, mmlu_shots, bbh_shots, n_text, seed)
        lm = SubLLMLM(model, tok, batch_size=batch_size, max_length=seq_len, dtype=dtype)
        out["tasks"] = {}
        for name in lm_tasks:  # one lm-eval run per task, so truncation is counted per task
            t0, seen, cut = time.time(), lm.requests, lm.truncated
            res = run_tasks(lm, [name], built, limit=limit, verbose=verbose, seed=seed)[name]
            res["truncated"] = f"{lm.truncated - cut}/{lm.requests - seen}"
            out["tasks"][name] = {**res, **info[name]}
            log(f"{name}: {time.time() - t0:.1f} s, {res['truncated']} requests cut to the window")
        log(f"task files in {built}")
        out["tasks_keep_fractions"] = lm.keep_stats.fractions()
    return out


_NOT_METRICS = ("n", "docs", "chance", "source", "truncated")


def format_table(res: dict) -> str:
    """Task, metric, value, stderr, documents, chance level, requests cut to the window."""
    rows = [("task", "metric", "value", "stderr", "n", "chance", "cut")]
    if "loss" in res:
        r = res["loss"]
        rows.append(("loss", "nats/token", f"{r['loss']:.4f}", "", str(r["tokens"]), "", ""))
        rows.append(("", "perplexity", f"{r['ppl']:.2f}", "", "", "", ""))
        rows.append(("", "bits/byte", f"{r['bpb']:.4f}", "", str(r["bytes"]), "", ""))
        rows += [("", f"keep S{i}", f"{f:.3f}", "", "", "", "") for i, f in enumerate(r["keep_fractions"])]
    sel = res.get("selection", {})
    rows += [
        ("", f"agreement S{i}", f"{a:.3f}", "", "", "", "") for i, a in enumerate(sel.get("agreement", []))
    ]
    for name, r in res.get("tasks", {}).items():
        metrics = [(k, v) for k, v in r.items() if not k.endswith("_stderr") and k not in _NOT_METRICS]
        for j, (label, v) in enumerate(kv for kv in metrics if kv[1] is not None):
            se = r.get(label + "_stderr")
            chance = r.get("chance") if label.startswith("acc") else None
            first = j == 0
            rows.append((name if first else "", label, f"{v:.4f}", "" if se is None else f"{se:.4f}",
                         str(r.get("n") or r.get("docs")) if first else "",
                         "" if chance is None else f"{chance:.3f}",
                         r.get("truncated", "") if first else ""))  # fmt: skip
    for r in res.get("retrieval", {}).get("results", []):
        where = f"{r['length']}" + (f" @{r['depth']:.2f}" if r["depth"] is not None else "")
        rows.append((r["task"], f"acc {where}", f"{r['accuracy']:.4f}", "", str(r["answers"]), "", ""))
        rows += [
            ("", f"needle kept S{i}", f"{k:.3f}", "", "", "", "") for i, k in enumerate(r["needle_keep"])
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------------


__all__ = ["evaluate", "text_loss", "format_table"]
