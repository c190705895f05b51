"""`subllm bench infer`: SUBLLM against the same-size LLaMA at inference, side by side.

docs/method.md sections 1 (FLOP and KV arithmetic) and 3 (inference mode). Both models live in one
process: the LLaMA is `config.as_llama()` loaded non-strictly from SUBLLM's state dict, so every
shared layer has identical weights. Both run through the same engine (subllm/inference/engine.py).

Per (dtype, batch, prompt length), after warm-up, with interleaved repetitions:
- prefill seconds for LLaMA, SUBLLM and the zero-overhead bound: SUBLLM's own layers run as plain
  causal LLaMA stacks on the sequence lengths SUBLLM's levels saw (no score, gather, scatter);
- decode tokens/s over `decode_tokens` teacher-forced tokens from the prefilled caches;
- KV-cache bytes held (counted) and allocated (measured from torch storages after the decode), and
  the allocated ratio against the ideal ratio of held entries;
- realised keep fraction per S in prefill and in decode;
- the ideal speed-up from FLOPs of the actual kept counts: per layer and row, 2 * params FLOPs per
  token (linear) plus 4 * dim FLOPs per (query, key) pair of causal attention; the LM head (2 * dim *
  vocab per logit computed: the last prompt token, then every decoded token); S scores and U + B;
  the embedding is a lookup (0 FLOPs). achieved / ideal is the efficiency.

Prompts are uniform random token ids. Without `--checkpoint` the score layers are calibrated so
that the realised keep fraction over each benchmark's prompt + decode tokens (rows pooled) equals
the configured ratio r (see `calibrate_scores`); the prefill and decode fractions are reported
separately as measured. With a checkpoint its trained scores are used.

With `--text FILE` (needs `--checkpoint`: a trained model's scores on random ids say nothing about
its keep on real text) the prompts are real text instead: FILE tokenized with the checkpoint's
tokenizer (no special tokens), row b of a (batch B, context L) setting takes the window of tokens
[b L, (b + 1) L), and decode is teacher-forced on the text's next `decode_tokens` tokens after that
window (`text_windows`). The keep columns are then the trained model's realised keep on real text
and its continuation, and "dec x" / "ideal" / "eff" the decode speed-up that keep buys.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from subllm.bench.common import format_table, interleaved, median, min_med_max, spread
from subllm.bench.roofline import decode_bytes, measure_bandwidth
from subllm.bench.score_calibration import calibrate_scores
from subllm.config import get_preset
from subllm.dtype import autocast, describe_hardware
from subllm.dtype_calibration import choose_dtype
from subllm.errors import SubLLMError
from subllm.flops import flops_between, keep_fractions
from subllm.inference import hugepages, native, native_layers, prefill_attention
from subllm.inference.cache import layer_levels
from subllm.inference.engine import decode_step, level_inputs, new_cache, prefill, prefill_layer, set_kv_dtype
from subllm.model.subllm import SubLLM

# ---- one benchmark setting ------------------------------------------------------------------------


@dataclass
class Setting:
    dtype: str
    batch: int
    length: int
    decode_tokens: int
    reps: int
    warmup: int
    bound: bool = True
    device: str = "cpu"
    hf: bool = False  # also time transformers' LlamaForCausalLM (subllm/bench/hf_llama.py)
    prefill_reps: int | None = None  # None: reps (long prefills are costly when decode is the point)
    bandwidth: float | None = None  # measured bytes/s (subllm/bench/roofline.py): the roofline columns


def _groups(layer_level: list[int]) -> list[tuple[int, list[int]]]:
    """Consecutive runs of layers (structure order) at one level: [(level, [layer, ...]), ...]."""
    out: list[tuple[int, list[int]]] = []
    for i, lv in enumerate(layer_level):
        if out and out[-1][0] == lv:
            out[-1][1].append(i)
        else:
            out.append((lv, [i]))
    return out


def _bound_fn(sub: SubLLM, ids: torch.Tensor, snap: list[list[int]], dtype: str, seed: int, device="cpu"):
    """The zero-overhead bound: SUBLLM's layers as plain causal LLaMA stacks (the engine's prefill
    layer, K/V written to a cache as LLaMA's prefill does) on (B, longest row of the level) random
    inputs - no score, gather, upsample or bypass - plus the embedding and the last-token head."""
    cfg = sub.config
    B = ids.shape[0]
    layer_level, _ = layer_levels(cfg.tree)
    g = torch.Generator().manual_seed(seed)
    groups = []
    for lv, layers in _groups(layer_level):
        n = max(snap[lv])
        if n == 0:
            continue
        x = torch.randn(B, n, cfg.dim, generator=g).to(device) * 0.3
        groups.append((lv, x, torch.arange(n, device=device).expand(B, n), layers))

    def run():
        with torch.no_grad(), autocast(dtype, device):
            cache = new_cache(sub, B)
            x0 = sub.embed(ids)
            for lv, x, pos, layers in groups:
                if cache.capacity[lv] < pos.shape[1]:
                    cache.start_level(lv, pos, [pos.shape[1]] * B)
                lvl = level_inputs(sub, pos, [pos.shape[1]] * B)
                for i in layers:
                    x = prefill_layer(sub, cache, i, x, lvl)
            return sub.head(sub.norm(x0[:, -1]))

    return run


def bench_setting(
    sub: SubLLM, llama: SubLLM, st: Setting, ids: torch.Tensor, dec: torch.Tensor, seed: int
) -> dict:
    """ids (B, L) prompt, dec (decode_tokens, B) tokens fed during decode."""
    cfg = sub.config
    B, L = st.batch, st.length

    dev = st.device

    def prefill_fn(model):
        def run():
            with torch.no_grad(), autocast(st.dtype, dev):
                cache = new_cache(model, B)
                prefill(model, ids, None, cache, extra=st.decode_tokens)
            return cache

        return run

    fns = {"llama": prefill_fn(llama), "subllm": prefill_fn(sub)}
    first = fns["subllm"]()  # also a warm-up; gives the level lengths the bound needs
    snap = {"subllm": first.snapshot()}
    if st.bound:
        fns["bound"] = _bound_fn(sub, ids, snap["subllm"], st.dtype, seed, dev)
    if st.hf:
        from subllm.bench.hf_llama import hf_decode, hf_prefill, hf_twin

        hf = hf_twin(llama, dev)
        fns["hf_llama"] = hf_prefill(hf, ids, st.dtype, dev)
    pre_reps = st.prefill_reps or st.reps
    t_pre, caches = interleaved(fns, pre_reps, st.warmup if pre_reps == st.reps else 0, device=dev)
    snap["llama"] = caches["llama"].snapshot()
    assert caches["subllm"].snapshot() == snap["subllm"]

    def decode_fn(model, cache, start):
        def run():
            cache.rewind(start)
            with torch.no_grad(), autocast(st.dtype, dev):
                for tok in dec:
                    decode_step(model, cache, tok)
            return cache.snapshot()

        return run

    dfns = {m: decode_fn(mod, caches[m], snap[m]) for m, mod in (("llama", llama), ("subllm", sub))}
    if st.hf:
        dfns["hf_llama"] = hf_decode(hf, caches["hf_llama"], L, dec, st.dtype, dev)
    t_dec, ends = interleaved(dfns, st.reps, st.warmup, device=dev)
    read = {}  # bytes each decoded token reads: one untimed pass that snapshots every step
    for m, mod in (("llama", llama), ("subllm", sub)):
        caches[m].rewind(snap[m])
        steps = [caches[m].snapshot()]
        with torch.no_grad(), autocast(st.dtype, dev):
            for tok in dec:
                decode_step(mod, caches[m], tok)
                steps.append(caches[m].snapshot())
        assert steps[-1] == ends[m]
        read[m] = decode_bytes(mod, steps, caches[m].bytes_per_token())
    bytes_held, bytes_alloc = {}, {}
    for m in ("llama", "subllm"):
        bytes_alloc[m] = caches[m].allocated_nbytes()  # measured (torch storages), prompt + decode
        caches[m].rewind(snap[m])
        bytes_held[m] = caches[m].nbytes()

    zero = {m: [[0] * B for _ in s] for m, s in snap.items()}
    lcfg = llama.config
    f_pre = {"llama": flops_between(lcfg, zero["llama"], snap["llama"], B)}
    f_pre["subllm"] = flops_between(cfg, zero["subllm"], snap["subllm"], B)
    n_dec = st.decode_tokens * B
    f_dec = {"llama": flops_between(lcfg, snap["llama"], ends["llama"], n_dec)}
    f_dec["subllm"] = flops_between(cfg, snap["subllm"], ends["subllm"], n_dec)
    layer_level, _ = layer_levels(cfg.tree)
    entries = sum(sum(snap["subllm"][lv]) for lv in layer_level)
    entries_llama = lcfg.n_layers * sum(snap["llama"][0])
    pre = {m: median(t) for m, t in t_pre.items()}
    dps = {m: n_dec / median(t) for m, t in t_dec.items()}
    out = dict(
        dtype=st.dtype,
        batch=B,
        prompt_len=L,
        decode_tokens=st.decode_tokens,
        keep_prefill=[round(f, 4) for f in keep_fractions(cfg, zero["subllm"], snap["subllm"])],
        keep_decode=[round(f, 4) for f in keep_fractions(cfg, snap["subllm"], ends["subllm"])],
        prefill_s={m: round(v, 4) for m, v in pre.items()},
        prefill_s_min_med_max={m: [round(x, 4) for x in min_med_max(t)] for m, t in t_pre.items()},
        prefill_spread={m: round(spread(t), 3) for m, t in t_pre.items()},
        prefill_speedup=round(pre["llama"] / pre["subllm"], 4),
        prefill_ideal=round(f_pre["llama"] / f_pre["subllm"], 4),
        decode_tok_s={m: round(v, 2) for m, v in dps.items()},
        decode_tok_s_min_med_max={
            m: [round(n_dec / x, 2) for x in min_med_max(t)[::-1]] for m, t in t_dec.items()
        },
        decode_spread={m: round(spread(t), 3) for m, t in t_dec.items()},
        decode_speedup=round(dps["subllm"] / dps["llama"], 4),
        decode_ideal=round(f_dec["llama"] / f_dec["subllm"], 4),
        kv_bytes=bytes_held,
        kv_bytes_allocated=bytes_alloc,
        kv_ratio=round(bytes_held["subllm"] / bytes_held["llama"], 6),
        kv_ideal_ratio=round(entries / entries_llama, 6),
        kv_alloc_ratio=round(bytes_alloc["subllm"] / bytes_alloc["llama"], 6),
        decode_bytes_per_token={m: round(r["per_token"]) for m, r in read.items()},
        decode_bytes_read={m: {k: r[k] for k in ("weights", "kv", "tokens")} for m, r in read.items()},
    )
    if st.bandwidth:  # achieved bytes/s over the measured bandwidth
        out["decode_roofline"] = {
            m: round(read[m]["per_token"] * dps[m] / st.bandwidth, 4) for m in ("llama", "subllm")
        }
    if st.hf:  # our LLaMA's time over transformers' (< 1: ours is faster)
        out["llama_over_hf"] = {
            "prefill": round(pre["llama"] / pre["hf_llama"], 4),
            "decode": round(dps["hf_llama"] / dps["llama"], 4),
        }
    out["prefill_efficiency"] = round(out["prefill_speedup"] / out["prefill_ideal"], 4)
    out["decode_efficiency"] = round(out["decode_speedup"] / out["decode_ideal"], 4)
    if st.bound:
        out["prefill_over_bound"] = round(pre["subllm"] / pre["bound"] - 1, 4)
    return out


# ---- real text as prompts (--text) -----------------------------------------------------------------


def load_text_tokens(path: str, checkpoint: str, vocab_size: int) -> list[int]:
    """The token ids of the text file `path` under the tokenizer saved in `checkpoint`."""
    from subllm.data.tokenizer import load_tokenizer

    f = Path(path)
    if not f.is_file():
        raise SubLLMError(f"--text {path}: no such file")
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SubLLMError(f"--text {path}: cannot read it as UTF-8 text ({type(e).__name__}: {e})") from None
    tok = load_tokenizer(Path(checkpoint))
    ids = list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    if ids and max(ids) >= vocab_size:
        raise SubLLMError(
            f"the tokenizer in {checkpoint} gives id {max(ids)} >= the model's vocab_size {vocab_size}"
        )
    return ids


def text_windows(tokens: list[int], length: int, batch: int, decode_tokens: int):
    """Consecutive windows of the text: prompt row b = tokens[b L : (b + 1) L], and the tokens
    decoded after it = the next `decode_tokens` of the text. -> ids (B, L), dec (decode_tokens, B)."""
    need = length * batch + decode_tokens
    if len(tokens) < need:
        raise SubLLMError(
            f"--text has {len(tokens)} tokens; ctx {length} x batch {batch} + {decode_tokens} decode "
            f"tokens needs {need}"
        )
    t = torch.tensor(tokens[:need], dtype=torch.long)
    ids = torch.stack([t[b * length : (b + 1) * length] for b in range(batch)])
    dec = torch.stack([t[(b + 1) * length : (b + 1) * length + decode_tokens] for b in range(batch)], 1)
    return ids, dec


# ---- the whole run ---------------------------------------------------------------------------------


def build_models(
    preset: str, checkpoint: str | None, seed: int, device="cpu", max_len: int = 0
) -> tuple[SubLLM, SubLLM]:
    """A checkpoint, or a preset with random weights whose max_seq_len is raised to `max_len` when
    that is longer (RoPE has no built-in limit; a benchmark of random weights may go past it)."""
    if checkpoint:
        sub = SubLLM.from_pretrained(checkpoint)
    else:
        torch.manual_seed(seed)
        cfg = get_preset(preset)
        with torch.device(device):  # built on the device (a 1.3B model initialised on a CPU is slow)
            sub = SubLLM(cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len)))
    if sub.config.n_subsamples == 0:
        raise SubLLMError(f"{preset or checkpoint} has no subsampling module: nothing to compare")
    with torch.device(device):
        llama = SubLLM(sub.config.as_llama())
    missing, unexpected = llama.load_state_dict(sub.state_dict(), strict=False)
    assert not missing and all(k.startswith(("subsamples.", "bypasses.")) for k in unexpected)
    return sub.to(device).eval(), llama.to(device).eval()


ROW_HEADERS = [
    "dtype", "B", "ctx", "keep pre", "keep dec", "pre LLaMA s", "pre SUB s", "bound s", "SUB/bound",
    "pre x", "ideal", "dec LLaMA t/s", "dec SUB t/s", "dec x", "ideal", "eff", "KV alloc", "KV ideal",
    "MB/tok LLaMA", "MB/tok SUB", "roof LLaMA", "roof SUB",
]  # fmt: skip


def table_row(r: dict) -> list:
    pf = r["prefill_s"]
    return [
        r["dtype"], r["batch"], r["prompt_len"],
        "/".join(f"{f:.3f}" for f in r["keep_prefill"]),
        "/".join(f"{f:.2f}" for f in r["keep_decode"]),
        f"{pf['llama']:.3f}", f"{pf['subllm']:.3f}",
        f"{pf['bound']:.3f}" if "bound" in pf else "-",
        f"{r['prefill_over_bound'] + 1:.3f}" if "prefill_over_bound" in r else "-",
        f"{r['prefill_speedup']:.3f}", f"{r['prefill_ideal']:.3f}",
        f"{r['decode_tok_s']['llama']:.1f}", f"{r['decode_tok_s']['subllm']:.1f}",
        f"{r['decode_speedup']:.3f}", f"{r['decode_ideal']:.3f}", f"{r['decode_efficiency']:.3f}",
        f"{r['kv_alloc_ratio']:.4f}", f"{r['kv_ideal_ratio']:.4f}",
        *(f"{r['decode_bytes_per_token'][m] / 1e6:.2f}" for m in ("llama", "subllm")),
        *(f"{r['decode_roofline'][m]:.3f}" if "decode_roofline" in r else "-" for m in ("llama", "subllm")),
    ]  # fmt: skip


def run_infer(
    preset: str,
    checkpoint: str | None,
    lengths: list[int],
    batches: list[int],
    dtypes: list[str],
    decode_tokens: int,
    reps: int,
    warmup: int,
    seed: int = 0,
    bound: bool = True,
    log=print,
    text: str | None = None,
    device: str = "cpu",
    hf: bool = False,
    prefill_reps: int | None = None,
    bandwidth: bool = True,
    quantize: str = "none",
    compile: bool = False,
    kv_dtype: str = "same",
) -> dict:
    if text and not checkpoint:
        raise SubLLMError("--text needs --checkpoint (a trained model and the tokenizer saved with it)")
    requested = list(dtypes)  # auto | bf16 | fp32 -> bf16 / fp32 (auto: measured on SUBLLM's decode)
    kind = torch.device(device).type
    sub, llama = build_models(preset, checkpoint, seed, device, max(lengths) + decode_tokens)
    params = sub.num_params()
    if quantize != "none":  # both alike, after LLaMA took SUBLLM's weights
        from subllm.inference.quantize import apply_quantization

        sub, llama = apply_quantization(sub, quantize), apply_quantization(llama, quantize)
    sub, llama = set_kv_dtype(sub, kv_dtype), set_kv_dtype(llama, kv_dtype)
    if kind == "cpu":  # both alike: weights on huge pages, as generate and serve keep them
        sub, llama = hugepages.place(sub), hugepages.place(llama)
    choices = [choose_dtype(d, sub, "decode", kind, log) for d in requested]
    dtypes = list(dict.fromkeys(c.dtype for c in choices))
    log(f"[bench infer] dtype {', '.join(c.line for c in choices)}")
    if compile:  # both alike; every graph the settings need compiled before anything is timed
        from subllm.inference.compiled_decode import compile_and_warm

        for m in (sub, llama):
            for d in dtypes:
                dt = compile_and_warm(m, d, batches)
                log(f"[bench infer] compiled {m.config.structure} decode ({d}) in {dt:.0f} s")
    cfg = sub.config
    too_long = [n for n in lengths if n + decode_tokens > cfg.max_seq_len]
    if too_long:
        raise SubLLMError(
            f"prompt lengths {too_long} + {decode_tokens} decode tokens exceed max_seq_len {cfg.max_seq_len}"
        )
    tokens = None
    if text:
        tokens = load_text_tokens(text, checkpoint, cfg.vocab_size)
        L, B = max(((n, b) for n in lengths for b in batches), key=lambda lb: lb[0] * lb[1])
        text_windows(tokens, L, B, decode_tokens)  # too short for the largest setting: fail up front
    bw = None  # this machine's streaming bandwidth, in this process (CPU only: the roofline columns)
    if bandwidth and kind == "cpu":
        bw = measure_bandwidth()
        log(
            f"memory bandwidth {bw['bytes_per_s'] / 1e9:.2f} GB/s (best of {bw['reps']} sums over "
            f"{bw['buffer_bytes'] / 2**20:.0f} MiB on huge pages: {bw['huge_pages']}; 4 KiB pages "
            f"{bw['bytes_per_s_4k'] / 1e9:.2f} GB/s; L3 {bw['l3_bytes']} bytes; {bw['threads']} threads)"
        )
    results, calibration = [], {}
    for L in lengths:
        for B in batches:
            if tokens is not None:
                ids, dec = text_windows(tokens, L, B, decode_tokens)
            else:
                g = torch.Generator().manual_seed(seed * 1000003 + L * 31 + B)
                ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
                dec = torch.randint(3, cfg.vocab_size, (decode_tokens, B), generator=g)
            ids, dec = ids.to(device), dec.to(device)
            if not checkpoint:
                seq = torch.cat([ids, dec.T], 1)  # the prompt and the decode tokens, pooled
                calibration[f"{L}x{B}"] = calibrate_scores(sub, seq, seed + L + B)
                log(f"calibrated scores on the {B}x{L} prompt + decode tokens: {calibration[f'{L}x{B}']}")
            for dtype in dtypes:
                st = Setting(dtype, B, L, decode_tokens, reps, warmup, bound, device, hf, prefill_reps,
                             bw["bytes_per_s"] if bw else None)  # fmt: skip
                r = bench_setting(sub, llama, st, ids, dec, seed)
                results.append(r)
                log(format_table(ROW_HEADERS, [table_row(r)]).splitlines()[-1])
    return dict(
        model=dict(
            preset=None if checkpoint else preset,
            checkpoint=checkpoint,
            structure=cfg.structure,
            keep_ratios=cfg.keep_ratios,
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            params=params,
            quantize=quantize,
            int8_kernel=getattr(sub, "int8_kernel", None),  # the decode kernel quantize_ timed and chose
            compiled_decode=compile,
            kv_dtype=kv_dtype,
            attention_kernel=native.status() if kind == "cpu" else "torch SDPA",
            decode_layers=native_layers.status(kind),
            prefill_attention=prefill_attention.status(kind),
        ),
        scores="trained (checkpoint)"
        if checkpoint
        else "calibrated: random direction (orthogonal to the positional drift of x) shifted along "
        "the least-squares constant direction, "
        "realised keep = r over each benchmark's prompt + decode tokens, rows pooled (key: length x batch)",
        calibration=calibration,
        prompts="uniform random token ids; decode feeds random token ids (teacher-forced)"
        if tokens is None
        else f"text {text} ({len(tokens)} tokens, the checkpoint's tokenizer): row b = tokens "
        "[b*ctx, (b+1)*ctx); decode feeds the text's next tokens after each row's window (teacher-forced)",
        text=None if tokens is None else dict(path=text, tokens=len(tokens)),
        flops="linear 2*params/token/layer + causal attention 4*dim per (query, key) + LM head + S + U/B; "
        "embedding lookup 0",
        dtypes=dtypes,
        dtypes_requested=requested,
        dtype_choices=[{"requested": d, **c.record()} for d, c in zip(requested, choices)],
        memory_bandwidth=bw,
        decode_bytes="per decoded token: weights (stored dtype) of the layers, S modules and bypasses of "
        "each level some row reached in a step, the final norm and LM head every step, one embedding row "
        "per token, plus each row's K/V (cache dtype) at its exact length; roofline = bytes/token x tok/s "
        "/ measured DRAM bandwidth (> 1: the step streams from L3)",
        device=str(device),
        **describe_hardware(),
        results=results,
    )


def summary_lines(results: list[dict]) -> list[str]:
    """Plain-language checks against the targets of the issue (benchmarks, not tests)."""
    lines = []
    for r in results:
        tag = f"{r['dtype']} B={r['batch']} ctx={r['prompt_len']}"
        bound = (
            f"{100 * r['prefill_over_bound']:+.1f}% vs zero-overhead bound; "
            if "prefill_over_bound" in r
            else ""
        )
        lines.append(
            f"{tag}: decode {r['decode_speedup']:.3f}x vs ideal {r['decode_ideal']:.3f}x "
            f"({100 * r['decode_efficiency']:.1f}% of ideal); prefill {bound}"
            f"KV allocated ratio {r['kv_alloc_ratio']:.4f} vs ideal {r['kv_ideal_ratio']:.4f}"
        )
        if "decode_roofline" in r:
            b, f = r["decode_bytes_per_token"], r["decode_roofline"]
            lines.append(
                f"{tag}: decode reads {b['subllm'] / 1e6:.2f} MB/token (LLaMA {b['llama'] / 1e6:.2f}): "
                f"{100 * f['subllm']:.1f}% of the memory-bandwidth roofline (LLaMA {100 * f['llama']:.1f}%)"
            )
        if "llama_over_hf" in r:
            h = r["llama_over_hf"]
            lines.append(
                f"{tag}: our LLaMA vs HF LlamaForCausalLM (same weights): prefill time {h['prefill']:.3f}x, "
                f"decode time per token {h['decode']:.3f}x HF's (< 1: ours faster)"
            )
    return lines


def print_report(report: dict, env: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time (a default would freeze it at import)
    rows = [table_row(r) for r in report["results"]]
    print("", file=out)
    print(f"subllm bench infer  |  {report['model']}  |  {env}", file=out)
    print(f"scores: {report['scores']}", file=out)
    print(f"prompts: {report['prompts']}", file=out)
    print(format_table(ROW_HEADERS, rows), file=out)
    for line in summary_lines(report["results"]):
        print(line, file=out)
