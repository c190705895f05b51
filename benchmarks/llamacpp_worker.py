"""llama.cpp's side of benchmarks/llamacpp_peer.py: a worker that runs in llama.cpp's own virtualenv
(llama-cpp-python, numpy; no torch, no subllm) and answers one JSON request per stdin line with one
JSON line on stdout, so that the driver can interleave llama.cpp with our models call by call.
It computes only when asked: between requests it blocks on stdin.

Requests ("op"):
- info: llama_cpp version and llama.cpp's system info line (CPU features it was built for)
- open {name, path, n_ctx, n_batch, flash_attn}: load a GGUF as llama_cpp.Llama (logits_all=False)
- prefill {name, threads, ids}: clear the KV cache, evaluate the prompt ids (llama.cpp splits it
  into n_batch-token batches) -> seconds
- decode {name, threads, start, ids}: drop the cache past `start` tokens, then evaluate the ids one at
  a time (teacher-forced decode; each call computes the logits of its token) -> seconds
- close {name}: free that Llama (its context and buffers)
- check {path, ids, n_ctx, threads, greedy, kv_f32, out}: a Llama with logits_all=True (and an F32 KV
  cache with kv_f32; llama.cpp's default is F16); logits of every prompt position saved to `out`
  (.npy), then `greedy` tokens decoded by argmax -> the greedy ids
- quit

    LLAMACPP_VENV/bin/python benchmarks/llamacpp_worker.py   (started by llamacpp_peer.py)
"""

import json
import os
import sys
import time

import llama_cpp
import numpy as np

models: dict[str, llama_cpp.Llama] = {}


def threads(llm: llama_cpp.Llama, n: int) -> None:
    """n threads for both single-token decode and batch (prompt) evaluation."""
    llama_cpp.llama_set_n_threads(llm._ctx.ctx, n, n)


def handle(r: dict) -> dict:
    op = r["op"]
    if op == "info":
        return dict(version=llama_cpp.__version__, system_info=llama_cpp.llama_print_system_info().decode())
    if op == "open":
        t = time.perf_counter()
        models[r["name"]] = llama_cpp.Llama(
            r["path"], n_ctx=r["n_ctx"], n_batch=r["n_batch"], n_threads=1, logits_all=False,
            flash_attn=r["flash_attn"], verbose=False,
        )  # fmt: skip
        return dict(load_s=time.perf_counter() - t)
    if op == "prefill":
        llm = models[r["name"]]
        threads(llm, r["threads"])
        llm.reset()
        t = time.perf_counter()
        llm.eval(r["ids"])
        return dict(s=time.perf_counter() - t)
    if op == "decode":
        llm = models[r["name"]]
        threads(llm, r["threads"])
        llm.n_tokens = r["start"]  # eval() removes the cache entries from n_tokens on
        t = time.perf_counter()
        for tok in r["ids"]:
            llm.eval([tok])
        return dict(s=time.perf_counter() - t)
    if op == "close":
        models.pop(r["name"]).close()
        return {}
    if op == "check":
        kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if r["kv_f32"] else {}
        llm = llama_cpp.Llama(
            r["path"], n_ctx=r["n_ctx"], n_batch=r["n_ctx"], n_threads=r["threads"],
            n_threads_batch=r["threads"], logits_all=True, verbose=False, **kv,
        )  # fmt: skip
        llm.eval(r["ids"])
        np.save(r["out"], llm.scores[: len(r["ids"])].astype(np.float32))
        out = []
        for _ in range(r["greedy"]):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        del llm
        return dict(greedy=out)
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")  # the replies' own descriptor; anything the C code
    os.dup2(2, 1)  # prints to stdout goes to stderr instead of into the protocol
    for line in sys.stdin:
        r = json.loads(line)
        if r["op"] == "quit":
            break
        try:
            reply = handle(r)
        except Exception as e:  # the driver reports it and stops
            reply = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    main()
