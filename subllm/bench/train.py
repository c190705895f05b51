"""`subllm bench train`: full training steps of SUBLLM vs the same-size LLaMA vs the zero-overhead
bound, interleaved in one process, across context lengths (docs/method.md sections 1 and 9).

The zero-overhead bound runs the SAME layers as plain LLaMA stacks on the sequence lengths that
SUBLLM's levels see (for the paper structure at T: embeddings, head and 10 layers at T, 10 layers
at ceil(0.64 T), 4 at ceil(0.64 ceil(0.64 T))) - no scoring, sorting, gathering, scattering or
bypass. Inner stacks take a prefix slice (a view) and feed the loss through a zero-weighted term,
so their backward runs in full. SUBLLM / bound is the overhead of our subsampling path.

Memory: on CUDA, peak allocated bytes; on CPU (no allocator statistics), the bytes autograd saves
for backward (activations), counted once per storage - what differs between the models.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.nn.functional as F

from subllm.bench.common import format_table, interleaved, median, min_med_max, spread, sync
from subllm.config import ModelConfig, Sub, get_preset, keep_count
from subllm.dtype import DTYPES, autocast, dtype_line, dtype_record
from subllm.errors import SubLLMError
from subllm.flops import ideal_speedup
from subllm.model.subllm import SubLLM

QUICK = dict(preset="subllm-tiny", lengths="64,128", reps=2, warmup=1, batch_size=2)


def bound_loss(model: SubLLM, ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The zero-overhead bound's forward: `model`'s layers (a SUBLLM or its LLaMA) arranged as
    `cfg`'s structure, level stacks on prefix slices, no S/U/B at all."""
    keep = cfg.keep_ratios
    B, T = ids.shape
    extras: list[torch.Tensor] = []

    def run(nodes, x):
        L = x.shape[1]
        level = model.make_level(torch.arange(L, device=x.device).expand(B, L), None)
        for node in nodes:
            if isinstance(node, Sub):
                k = keep_count(L, keep[node.index])
                if k:
                    extras.append(run(node.children, x[:, :k]))
            else:
                x = model.layers[node](x, level.cos, level.sin, None)
        return x

    x = run(cfg.tree, model.embed(ids))
    logits = model.head(model.norm(x))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    for h in extras:  # zero weight: inner stacks are back-propagated at full cost
        loss = loss + 0.0 * h.float().mean()
    return loss


class _NoLayer(torch.nn.Module):
    """Stands in for a transformer layer: returns its input (for timing everything else)."""

    def forward(self, x, cos, sin, mask):
        return x


def subsampling_overhead(model: SubLLM, ids: torch.Tensor, dtype: str, reps: int, device) -> float:
    """Seconds per fwd+bwd that SUBLLM spends outside its layers, minus the same for LLaMA: the
    cost of scoring, sorting, gathers, scatters, level positions and bypass, measured directly.
    (Small and layer-independent, so far less exposed to machine noise than step-time ratios.)"""
    import copy

    bare = copy.deepcopy(model)
    bare.layers = torch.nn.ModuleList(_NoLayer() for _ in bare.layers)
    bare_llama = copy.deepcopy(bare)
    bare_llama.tree = bare_llama.config.as_llama().tree
    bare_llama.config = bare_llama.config.as_llama()

    def fb(m):
        def f():
            with autocast(dtype, device):
                loss = m(ids, labels=ids).loss
            loss.backward()

        return f

    times, _ = interleaved(
        {"sub": fb(bare), "llama": fb(bare_llama)}, reps=max(5, reps), warmup=1, device=device
    )
    return min(times["sub"]) - min(times["llama"])


def activation_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during fn() (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def make_step(model: SubLLM, forward, opt, dtype: str, device) -> callable:
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, device):
            loss = forward()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def bench_length(
    cfg: ModelConfig, T: int, batch_size: int, dtype: str, reps: int, warmup: int, device, seed: int,
    compile: bool = False, hf: bool = False, checkpointing: bool = False,
):  # fmt: skip
    torch.manual_seed(seed)
    with device:  # build directly on the device (a 1.3B model initialised on CPU is slow)
        sub = SubLLM(cfg).train()
        llama = SubLLM(cfg.as_llama()).train()
    sub.activation_checkpointing = llama.activation_checkpointing = checkpointing  # per layer, both
    sub.set_step(0)
    llama.load_state_dict(sub.state_dict(), strict=False)  # identical weights in the shared layers
    ids = torch.randint(0, cfg.vocab_size, (batch_size, T), device=device)
    fused = device.type == "cuda"
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused) for n, m in (("s", sub), ("l", llama))}
    fns = {
        "subllm": make_step(sub, lambda: sub(ids, labels=ids).loss, opts["s"], dtype, device),
        "llama": make_step(llama, lambda: llama(ids, labels=ids).loss, opts["l"], dtype, device),
        "bound": make_step(llama, lambda: bound_loss(llama, ids, cfg), opts["l"], dtype, device),
    }
    if hf:  # transformers' LlamaForCausalLM with the LLaMA's weights (subllm/bench/hf_llama.py)
        from subllm.bench.hf_llama import hf_train_step, hf_twin

        hfm = hf_twin(llama, device)
        hopt = torch.optim.AdamW(hfm.parameters(), lr=1e-4, fused=fused)
        fns["hf_llama"] = hf_train_step(hfm, ids, hopt, dtype, device)
    if compile:  # the same models and optimizers, called through torch.compile (subllm/trainer/compiled.py)
        from subllm.trainer.compiled import compile_for_training

        csub, cllama = compile_for_training(sub, cfg, device), compile_for_training(llama, cfg, device)
        fns["subllm_compiled"] = make_step(sub, lambda: csub(ids, labels=ids).loss, opts["s"], dtype, device)
        fns["llama_compiled"] = make_step(
            llama, lambda: cllama(ids, labels=ids).loss, opts["l"], dtype, device
        )
        warmup = max(warmup, 1)  # the first call compiles
    times, _ = interleaved(fns, reps=reps, warmup=warmup, device=device)
    mem, above = {}, {}  # above: the peak over what was allocated before the step (every model resident)
    for name, fwd in (
        ("subllm", lambda: sub(ids, labels=ids).loss),
        ("llama", lambda: llama(ids, labels=ids).loss),
    ):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fns[name]()
            sync(device)
            mem[name] = torch.cuda.max_memory_allocated(device)
            above[name] = mem[name] - before
        else:
            with autocast(dtype, device):
                mem[name] = activation_bytes(fwd)
    med = {k: median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    overhead = subsampling_overhead(sub, ids, dtype, reps, device)
    ideal = ideal_speedup(cfg, T)
    speedup = med["llama"] / med["subllm"]
    compiled = {"llama_over_hf": round(med["llama"] / med["hf_llama"], 4)} if hf else {}
    if compile:
        compiled |= {
            "compiled": {
                "speedup": round(med["llama_compiled"] / med["subllm_compiled"], 4),
                "subllm_compiled_over_eager": round(med["subllm_compiled"] / med["subllm"], 4),
                "llama_compiled_over_eager": round(med["llama_compiled"] / med["llama"], 4),
            }
        }
    return {
        "T": T,
        "batch_size": batch_size,
        "dtype": dtype,
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "spread": {k: round(spread(v), 3) for k, v in times.items()},
        "step_s_min_med_max": {k: [round(x, 4) for x in min_med_max(v)] for k, v in times.items()},
        "tokens_per_s": {k: round(batch_size * T / v, 1) for k, v in med.items()},
        "speedup": round(speedup, 4),
        "bound_speedup": round(med["llama"] / med["bound"], 4),
        "ideal_speedup": round(ideal, 4),
        "achieved_over_ideal": round(speedup / ideal, 4),
        "subllm_over_bound": round(med["subllm"] / med["bound"], 4),
        "step_s_min": {k: round(v, 4) for k, v in best.items()},
        "subllm_over_bound_min": round(best["subllm"] / best["bound"], 4),
        "subsampling_overhead_s": round(overhead, 5),
        "overhead_share": round(overhead / med["subllm"], 5),
        "memory_kind": "cuda_peak_allocated" if device.type == "cuda" else "saved_activations",
        "memory_bytes": mem,
        "memory_ratio": round(mem["subllm"] / mem["llama"], 4),
        **({"memory_step_bytes": above} if above else {}),
        **compiled,
    }


def run_train_bench(
    preset, lengths, batch_size, dtype, reps, warmup, device="cpu", seed=0, log=print, compile=False,
    hf=False, checkpointing=False, overrides: dict | None = None,
) -> dict:  # fmt: skip
    """`dtype`: auto | bf16 | fp32, resolved for `device` (subllm/dtype.py); the report records both.
    `overrides`: ModelConfig fields set on the preset (`--set`, e.g. structure=TMTMTMTM)."""
    device = torch.device(device)
    record = dtype_record(dtype, device.type)  # resolves (and warns once about a slow bf16)
    log(f"[bench train] dtype {dtype_line(dtype, device.type)}")
    dtype = record["dtype"]
    try:
        cfg = get_preset(preset).replace(**(overrides or {}))
    except TypeError as e:
        raise SubLLMError(f"bad --set: {e}") from None
    for T in lengths:
        if T > cfg.max_seq_len:
            cfg = cfg.replace(max_seq_len=T)
    results = []
    for T in lengths:
        log(f"[bench train] {preset} T={T} batch={batch_size} {dtype}: {warmup} warm-up + {reps} interleaved")
        results.append(
            bench_length(cfg, T, batch_size, dtype, reps, warmup, device, seed, compile, hf, checkpointing)
        )
        gc.collect()
    return {
        "preset": preset,
        "structure": cfg.structure,
        "keep_ratios": cfg.keep_ratios,
        "schedule_step": 0,
        "optimizer": "AdamW",
        "compile": compile,
        "hf": hf,
        "checkpointing": checkpointing,
        **record,
        "results": results,
    }


def print_report(report: dict, env: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time (a default would freeze it at import)
    rows = []
    for r in report["results"]:
        s, m = r["step_s"], r["memory_bytes"]
        rows.append([
            r["T"], f"{s['llama']:.3f}", f"{s['subllm']:.3f}", f"{s['bound']:.3f}",
            f"{r['tokens_per_s']['subllm']:.0f}", f"{r['speedup']:.3f}x", f"{r['ideal_speedup']:.3f}x",
            f"{r['achieved_over_ideal']:.1%}", f"{r['subllm_over_bound']:.3f}",
            f"{r['subllm_over_bound_min']:.3f}", f"{r['overhead_share']:.2%}",
            f"{m['subllm'] / 2**20:.0f}/{m['llama'] / 2**20:.0f}", f"{r['memory_ratio']:.3f}",
        ])  # fmt: skip
    headers = ["T", "llama s", "subllm s", "bound s", "subllm tok/s", "speed-up", "ideal", "ach/ideal",
               "sub/bound", "(min)", "S/U/B share", "mem MiB s/l", "mem ratio"]  # fmt: skip
    print(
        f"bench train: {report['preset']} {report['structure']} keep {report['keep_ratios']}, "
        f"full steps (fwd+bwd+{report['optimizer']}), schedules at step {report['schedule_step']}",
        file=out,
    )
    print(
        f"{env.get('cpu')} x{env.get('threads')} threads, torch {env.get('torch')}, {env.get('date_utc')}, "
        f"commit {env.get('commit')}, memory = {report['results'][0]['memory_kind']}",
        file=out,
    )
    print(format_table(headers, rows), file=out)
    if report.get("hf"):
        for r in report["results"]:
            print(
                f"T={r['T']}: HF LlamaForCausalLM {r['step_s']['hf_llama']:.3f} s/step vs our LLaMA "
                f"{r['step_s']['llama']:.3f} s: ours takes {r['llama_over_hf']:.3f}x HF's time",
                file=out,
            )
    if report.get("compile"):
        rows = [
            [
                r["T"], f"{r['step_s']['llama_compiled']:.3f}", f"{r['step_s']['subllm_compiled']:.3f}",
                f"{r['compiled']['speedup']:.3f}x", f"{r['speedup']:.3f}x",
                f"{r['compiled']['subllm_compiled_over_eager']:.3f}",
                f"{r['compiled']['llama_compiled_over_eager']:.3f}",
            ]
            for r in report["results"]
        ]  # fmt: skip
        headers = ["T", "llama s (compiled)", "subllm s (compiled)", "speed-up compiled", "speed-up eager",
                   "subllm compiled/eager", "llama compiled/eager"]  # fmt: skip
        print(
            "torch.compile (inductor, fullgraph, static shapes), interleaved with the eager runs:", file=out
        )
        print(format_table(headers, rows), file=out)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = [r["T"] for r in report["results"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(Ts, [r["speedup"] for r in report["results"]], "o-", label="SUBLLM measured")
    ax.plot(Ts, [r["bound_speedup"] for r in report["results"]], "s--", label="zero-overhead bound")
    ax.plot(Ts, [r["ideal_speedup"] for r in report["results"]], "k:", label="FLOP ideal")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("training speed-up over LLaMA")
    ax.set_title(f"{report['preset']}: training step speed-up vs context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_train_arguments(sub) -> None:
    """Register `subllm bench train` on the `bench` sub-parsers."""
    p = sub.add_parser("train", help="training step time and memory vs LLaMA and the zero-overhead bound")
    p.add_argument("--preset", default="subllm-small", help="model preset (default subllm-small)")
    p.add_argument("--lengths", default="1k,2k,4k,8k", help="context lengths, comma-separated (2k = 2048)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="bf16 autocast or fp32; auto (default): bf16 on a GPU or CPU that does bf16 natively, else fp32",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write speed-up vs context length (PNG) here")
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd SUBLLM and LLaMA (same weights)"
    )
    p.add_argument(
        "--hf", action="store_true", help="also time transformers' LlamaForCausalLM with the LLaMA's weights"
    )
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a ModelConfig field of the preset (repeatable), e.g. --set structure=TMTMTMTM",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (overrides the sizes above)")


def run_train(args) -> int:
    from subllm.bench.common import environment, int_list, json_line
    from subllm.errors import SubLLMError
    from subllm.trainer.config import parse_overrides

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.reps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SubLLMError("--reps and --batch-size must be >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SubLLMError("--device cuda asked for, but torch sees no CUDA device")
    report = run_train_bench(
        args.preset, int_list(args.lengths), args.batch_size, args.dtype, args.reps, args.warmup,
        device=args.device, seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True),
        compile=args.compile, hf=args.hf, checkpointing=args.checkpointing,
        overrides=parse_overrides("--set", args.set),
    )  # fmt: skip
    env = environment(args.device)
    print_report(report, env)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}")
    command = "subllm " + " ".join(sys.argv[1:]) if sys.argv[1:3] == ["bench", "train"] else None  # as typed
    print(json_line({"bench": "train", "command": command, "env": env, **report}))
    return 0
