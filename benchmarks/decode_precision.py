"""Issue 22: our decode paths (quantized, compiled) against our fp32 full forward on the first 128
tokens of Persuasion - max |dlogit| and top-1 agreement of teacher-forced decoding - and, per decode
step, the aten ops the profiler records and the wall time (32 steps, one thread; not a benchmark of
record: llamacpp_peer.py interleaves). The last variant puts the LM head in int4 as well, to measure
why `--quantize int4` keeps it int8; the last four fix one kernel each instead of quantize_'s choice.
Usage: python benchmarks/decode_precision.py CHECKPOINT [VARIANT,VARIANT,...]"""

import copy
import json
import sys
import time

import torch
from torch.profiler import profile

from subllm.bench.infer import load_text_tokens
from subllm.inference.compiled_decode import compile_and_warm
from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.inference.quantize import apply_quantization, quantize_
from subllm.model.subllm import load_model


def main() -> None:
    torch.set_num_threads(1)
    path = sys.argv[1]
    base = load_model(path).eval()
    toks = torch.tensor(
        load_text_tokens("data/corpus/val/austen_persuasion.txt", path, base.config.vocab_size)[:128]
    )
    with torch.no_grad():
        ref = base(toks[None]).logits[0].float()
    out = {}
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    for name, q, comp, kernels in (
        ("fp32", "none", False, {}),
        ("int8", "int8", False, {}),
        ("int4", "int4", False, {}),
        ("fp32-c", "none", True, {}),
        ("int8-c", "int8", True, {}),
        ("int4-c", "int4", True, {}),
        ("int4-c-head4", "int4h", True, {}),
        # the kernels one by one (quantize_'s int8_kernel / int4_kernel instead of its choice)
        ("int8-c-dynamic", "int8", True, {"int8_kernel": "dynamic"}),
        ("int8-c-native", "int8", True, {"int8_kernel": "native"}),
        ("int4-c-torch", "int4", True, {"int4_kernel": "torch"}),
        ("int4-c-native", "int4", True, {"int4_kernel": "native"}),
    ):
        if only and name not in only:
            continue
        if q == "int4h":  # the LM head in int4 too (a variant measured here, not offered by --quantize)
            from subllm.inference.quantize import Int4Linear

            m = apply_quantization(copy.deepcopy(base), "int4")
            m.head = Int4Linear.from_linear(base.head)
        elif kernels:
            m = quantize_(copy.deepcopy(base), q, **kernels)
        else:
            m = apply_quantization(copy.deepcopy(base), q)
        if comp:
            compile_and_warm(m, "fp32", (1,))
        with torch.no_grad():
            c = new_cache(m, 1)
            lg = [prefill(m, toks[None, :1], None, c)]
            for t in toks[1:]:
                lg.append(decode_step(m, c, t[None]))
            lg = torch.cat(lg).float()
            d = dict(
                max_abs_dlogit=round(float((lg - ref).abs().max()), 4),
                top1_agree=round(float((lg.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                kernel=getattr(m, "int8_kernel", None),
                int4_kernel=getattr(m, "int4_kernel", None),
            )
            snap = c.snapshot()
            with profile() as p:
                for t in toks[:4]:
                    decode_step(m, c, t[None])
            d["aten_ops_per_token"] = sum(e.count for e in p.key_averages() if e.key.startswith("aten::")) / 4
            d["all_events_per_token"] = sum(e.count for e in p.key_averages()) / 4
            c.rewind(snap)
            t0 = time.perf_counter()
            for t in toks[:32]:
                decode_step(m, c, t[None])
            d["ms_per_token_32"] = round((time.perf_counter() - t0) / 32 * 1e3, 2)
        out[name] = d
        print(name, d, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
