"""Memory a decode step streams, backed by transparent huge pages (2 MiB) where Linux offers them.

A decode step reads every weight it passes and the whole K/V cache once per token (bench/
roofline.py). With 4 KiB pages that is one TLB entry per 4 KiB: SmolLM2 at a 2k context touches
~35,000 pages per token, far more than the TLB holds, and in a virtual machine every miss walks two
page tables. Measured on this project's 2-vCPU AMD EPYC VM (one thread, 2026-12-05): a 256 MiB
`sum()` streams 19 GB/s from ordinary memory and 31 GB/s from huge pages; SmolLM2 int4 decode takes
12-16% less time per token with its weights and K/V on huge pages (docs/RESULTS.md, "Huge pages").

Linux gives huge pages to an anonymous private mapping advised MADV_HUGEPAGE when THP is
"always" or "madvise" (/sys/kernel/mm/transparent_hugepage/enabled); torch's allocator advises
only when THP_MEM_ALLOC_ENABLE=1 is set before its first allocation, so this module maps its own:
- `zeros(shape, dtype)`: a zero-filled CPU tensor in such a mapping (fresh anonymous pages are
  zeros), or torch.zeros where the mapping is not worth it (< 2 MiB) or not available (not Linux,
  SUBLLM_HUGEPAGES=0). KVCache keeps each level's K/V in one of these.
- `place(model)`: copy a model's parameters and buffers into one such mapping per dtype, each tensor
  a slice of it (64-byte aligned) - for inference: generate, serve and the benchmarks call it after
  quantization. Values, dtypes, shapes and ties are kept; the tensors now share a storage, so a
  placed model is for decoding, not for saving.
"""

from __future__ import annotations

import mmap
import os

import torch
from torch import Tensor, nn

MIN_BYTES = 2 << 20  # one huge page: smaller buffers gain nothing
ALIGN = 64  # bytes: each placed tensor starts on a cache line


def available() -> bool:
    """Whether `zeros` / `place` map huge-page-advised memory here (else they fall back)."""
    return (
        os.environ.get("SUBLLM_HUGEPAGES", "1") != "0"
        and hasattr(mmap, "MADV_HUGEPAGE")
        and hasattr(mmap, "MAP_PRIVATE")
        and hasattr(mmap, "MAP_ANONYMOUS")
    )


def _mapped(nbytes: int) -> Tensor:
    """(nbytes,) uint8 over a private anonymous mapping advised MADV_HUGEPAGE; the tensor keeps the
    mapping alive (torch.frombuffer holds a reference to it)."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP (EINVAL): ordinary pages, still zeroed memory
        pass
    return torch.frombuffer(mm, dtype=torch.uint8)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A contiguous CPU tensor of zeros, on huge pages when it is at least MIN_BYTES."""
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not available():
        return torch.zeros(shape, dtype=dtype)
    return _mapped(nbytes).view(dtype).view(shape).detach()


def place(model: nn.Module) -> nn.Module:
    """Move every CPU parameter and buffer of `model` onto huge pages (see the module docstring);
    -> the model. Parameters keep their identity (their .data is replaced), buffers are re-registered
    as slices of the mapping; a tensor reached twice (tied weights) is copied once. No-op where
    `available()` is false."""
    if not available():
        return model
    slots: list[tuple[dict, str, Tensor, bool]] = []  # (the dict holding it, name, tensor, is a parameter)
    for mod in model.modules():
        for d, is_param in ((mod._parameters, True), (mod._buffers, False)):
            slots += [(d, n, t, is_param) for n, t in d.items() if t is not None and t.device.type == "cpu"]
    by_dtype: dict[torch.dtype, dict[int, Tensor]] = {}  # each tensor once (tied weights)
    for _, _, t, _ in slots:
        by_dtype.setdefault(t.dtype, {})[id(t)] = t
    moved: dict[int, Tensor] = {}
    for dtype, ts in by_dtype.items():
        step = max(ALIGN // torch.empty((), dtype=dtype).element_size(), 1)
        sizes = [-(-t.numel() // step) * step for t in ts.values()]
        arena = zeros((max(sum(sizes), 1),), dtype)
        off = 0
        for (key, t), size in zip(ts.items(), sizes):
            moved[key] = arena[off : off + t.numel()].view(t.shape).detach()  # shares the mapping, not a view
            with torch.no_grad():
                moved[key].copy_(t)
            off += size
    for d, name, t, is_param in slots:
        if is_param:
            t.data = moved[id(t)]
        else:
            d[name] = moved[id(t)]
    return model
