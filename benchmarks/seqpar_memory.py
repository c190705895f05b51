"""Activation memory per rank under sequence parallelism (subllm/seqpar/) vs one process.

For each length, a fresh set of processes (gloo on CPU, 1 thread each) runs one training-mode
forward of the same model on the same row; N = 1 is the plain `SubLLM.forward`. Measured per rank:

- saved: bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
  each storage counted once) - the activation memory a training step holds between forward and
  backward. Parameters are excluded (they are not activations).
- peak RSS: the process's resident high-water mark (VmHWM) minus its RSS just before the forward
  (allocator and gloo buffers included; a looser, OS-level number); hwm_mib in the JSON: VmHWM whole.
- fwd_s (and step_s with --backward): wall time, 2 busy cores - not a speed benchmark.
- cpu_s: this process's CPU seconds over the same span (time.process_time; gloo's threads
  included) - the work a rank did, whatever else the machine was running.
- comm_s (N > 1, gloo): seconds this rank spent inside torch.distributed calls (all-to-all,
  all-gather, all-reduce: each call's wall time, gloo's CPU collectives return when done; the
  ring's isend/irecv: time to post plus time blocked in wait(), i.e. the part of the transfer
  compute did not hide). It includes waiting for the slower rank; comm_fwd_s: the forward's part.
- with --device cuda (nccl, one GPU per rank): also peak_cuda_mib, torch.cuda.max_memory_allocated
  minus what was allocated before the forward.

    python benchmarks/seqpar_memory.py --lengths 8k,16k,32k --n 2
    python benchmarks/seqpar_memory.py --lengths 8k --n 2 --backward --checkpointing
    python benchmarks/seqpar_memory.py --preset subllm-small --lengths 64k --n 2 --backward \
        --checkpointing --no-baseline
    python benchmarks/seqpar_memory.py --lengths 8k,16k --n 2 --backward --no-baseline --sp-attention ring

Prints a table, then one JSON line. The model: subllm-small's width (dim 256, 4 heads, vocab 8192)
with a shorter structure by default (--structure), so that 32k fits the time of a CPU run;
--preset NAME takes that preset whole (its own structure; --structure still overrides).
--no-baseline skips the one-process run (its columns are then empty).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class _CommTimer:
    """Wraps the torch.distributed calls subllm/seqpar makes with a stopwatch (this process)."""

    def __init__(self, dist):
        self.s = 0.0
        for name in ("all_to_all_single", "all_gather_into_tensor", "all_reduce", "batch_isend_irecv"):
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            self.s += time.perf_counter() - t0
            return [_TimedWork(w, self) for w in r] if isinstance(r, list) else r

        return call


class _TimedWork:
    def __init__(self, work, timer: _CommTimer):
        self.work, self.timer = work, timer

    def wait(self):
        t0 = time.perf_counter()
        r = self.work.wait()
        self.timer.s += time.perf_counter() - t0
        return r


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch

    from subllm import SubLLM
    from subllm.config import get_preset

    torch.set_num_threads(1)
    cuda = args["device"] == "cuda"
    dev = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    g = timer = None
    if world > 1:
        import torch.distributed as dist

        from subllm.seqpar import sequence_groups

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        g = sequence_groups(world)
        timer = _CommTimer(dist)
    T = args["length"]
    cfg = get_preset(args["preset"] or "subllm-small")
    structure = args["structure"] or (cfg.structure if args["preset"] else "TT(TT)TT")
    cfg = cfg.replace(structure=structure, max_seq_len=max(T, cfg.max_seq_len))
    torch.manual_seed(0)
    model = SubLLM(cfg).to(dev).train()
    model.set_step(0)
    model.activation_checkpointing = args["checkpointing"]
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(dev)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    base = _rss_kib("VmRSS")
    cuda_base = torch.cuda.memory_allocated() if cuda else 0
    t0, c0 = time.perf_counter(), time.process_time()
    amp = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=args["dtype"] == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        if g is None:
            out_ = model(ids, labels=ids)
        else:
            from subllm.seqpar import sp_forward

            out_ = sp_forward(model, ids, g, labels=ids, attention=args["sp_attention"])
    fwd = time.perf_counter() - t0
    rec = {"rank": rank, "saved_mib": sum(seen.values()) / 2**20, "fwd_s": fwd}
    if timer is not None:
        rec["comm_fwd_s"] = timer.s
    if args["backward"]:
        out_.loss.backward()
        if g is not None:
            from subllm.seqpar import sync_grads

            sync_grads(model.parameters(), g)
        rec["step_s"] = time.perf_counter() - t0
    rec["cpu_s"] = time.process_time() - c0
    if timer is not None:
        rec["comm_s"] = timer.s
    if cuda:
        torch.cuda.synchronize()
        rec["fwd_s" if not args["backward"] else "step_s"] = time.perf_counter() - t0
        rec["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    rec["peak_rss_mib"] = (_rss_kib("VmHWM") - base) / 1024
    rec["hwm_mib"] = _rss_kib("VmHWM") / 1024
    rec["imbalance"] = getattr(out_, "imbalance", None)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(rec, f)
    if g is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(length: int, n: int, args: dict) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(n, _port(), {**args, "length": length}, d), nprocs=n)
        return [json.load(open(os.path.join(d, f"{r}.json"))) for r in range(n)]


def _length(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="8k,16k,32k")
    p.add_argument("--n", type=int, default=2, help="ranks sharing each row")
    p.add_argument("--preset", default=None, help="a preset whole (default: subllm-small's width)")
    p.add_argument("--structure", default=None, help="default TT(TT)TT, or the preset's with --preset")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-process run")
    p.add_argument("--sp-attention", default="ulysses", choices=("ulysses", "ring"))
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--backward", action="store_true", help="also run backward (+ gradient sync)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: nccl, one GPU per rank")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast")
    a = p.parse_args()
    args = {"preset": a.preset, "structure": a.structure, "checkpointing": a.checkpointing}
    args.update(backward=a.backward, device=a.device, dtype=a.dtype, sp_attention=a.sp_attention)
    rows = []
    t_col = "step s" if a.backward else "fwd s"
    print(
        f"{'T':>7} {'ranks':>5} {'saved MiB/rank':>15} {'peak RSS MiB/rank':>18} {t_col:>7} {'ratio':>6} "
        f"{'comm s':>7} {'share':>6}"
    )
    for T in [_length(x) for x in a.lengths.split(",")]:
        one = None if a.no_baseline else run(T, 1, args)[0]
        sp = run(T, a.n, args)
        worst = max(r["saved_mib"] for r in sp)
        ratio = None if one is None else worst / one["saved_mib"]
        rows.append({"length": T, "one": one, "sp": sp, "saved_ratio": ratio})
        for name, recs in (("1", [one] if one else []), (str(a.n), sp)):
            for r in recs:
                rel = f"{r['saved_mib'] / one['saved_mib']:>6.3f}" if one else f"{'-':>6}"
                t = r.get("step_s", r["fwd_s"])
                c = r.get("comm_s")
                comm = f"{c:>7.1f} {c / t:>6.3f}" if c is not None else f"{'-':>7} {'-':>6}"
                mem = f"{r['saved_mib']:>15.1f} {r['peak_rss_mib']:>18.1f}"
                print(f"{T:>7} {name:>5} {mem} {t:>7.1f} {rel} {comm}")
    print(json.dumps({"bench": "seqpar_memory", "n": a.n, **args, "rows": rows}))


if __name__ == "__main__":
    main()
