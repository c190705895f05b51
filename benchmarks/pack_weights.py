"""Pack a checkpoint's weights small and losslessly, to carry them where only a few tens of MB travel
(a GPU lease takes 64 MiB per call), and unpack them there bit for bit.

A model converted from a quantized GGUF holds float32 weights that lie exactly on their GGUF grid:
Q4_1 (per 32 consecutive inputs of a row: x = d * q + m, q in 0..15, d and m float16) or Q8_0
(x = d * q, q int8). `pack` recovers (q, d, m) for each 2-D tensor, keeps the encoding only if it
reproduces every float32 bit (the same float32 arithmetic as gguf's dequantization: d * q, then
+ m), and stores any other tensor as it is; tensors go into PARTS safetensors files of about equal
size, with the float32 SHA-256 of every tensor. `unpack` rebuilds model.safetensors and checks each
hash. SmolLM2-135M (538 MB of float32): about 96 MB.

    python benchmarks/pack_weights.py pack runs/smol_llama .devpack --parts 2
    python benchmarks/pack_weights.py unpack .devpack/part0 .devpack/part1 --out runs/smol_llama
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

GROUP = 32


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _q4_1(x: torch.Tensor):
    g = x.reshape(-1, GROUP)
    m = g.min(1).values.half()
    span = g.max(1).values - m.float()
    for d in (span / 15).half(), (span / 15).half().float().nextafter(torch.tensor(0.0)).half():
        q = ((g - m.float()[:, None]) / d.float().clamp_min(1e-30)[:, None]).round().clamp(0, 15)
        if torch.equal(d.float()[:, None] * q + m.float()[:, None], g):
            q = q.to(torch.uint8)
            return {"q": q[:, 0::2] | (q[:, 1::2] << 4), "d": d, "m": m}
    return None


def _q8_0(x: torch.Tensor):
    g = x.reshape(-1, GROUP)
    d = (g.abs().max(1).values / 127).half()
    q = (g / d.float().clamp_min(1e-30)[:, None]).round().clamp(-128, 127)
    if torch.equal(d.float()[:, None] * q, g):
        return {"q": q.to(torch.int8), "d": d}
    return None


def _encode(x: torch.Tensor) -> tuple[str, dict]:
    if x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] % GROUP == 0:
        for kind, fn in (("q4_1", _q4_1), ("q8_0", _q8_0)):
            if (enc := fn(x)) is not None:
                return kind, enc
    return "raw", {"x": x}


def decode(kind: str, parts: dict, shape) -> torch.Tensor:
    if kind == "raw":
        return parts["x"]
    d = parts["d"].float()[:, None]
    if kind == "q8_0":
        return (d * parts["q"].float()).reshape(shape)
    lo, hi = parts["q"] & 15, parts["q"] >> 4
    q = torch.stack((lo, hi), dim=2).reshape(lo.shape[0], GROUP).float()
    return (d * q + parts["m"].float()[:, None]).reshape(shape)


def pack(src: Path, out: Path, n_parts: int) -> None:
    tensors = {}
    with safe_open(src / "model.safetensors", "pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    entries = []
    for name, x in tensors.items():
        kind, enc = _encode(x)
        size = sum(t.numel() * t.element_size() for t in enc.values())
        entries.append((size, name, kind, enc, list(x.shape), _sha(x)))
    entries.sort(key=lambda e: -e[0])
    parts: list[dict] = [{} for _ in range(n_parts)]
    sizes = [0] * n_parts
    index = {}
    for size, name, kind, enc, shape, sha in entries:  # largest first onto the lightest part
        p = sizes.index(min(sizes))
        sizes[p] += size
        for field, t in enc.items():
            parts[p][f"{name}::{field}"] = t.contiguous()
        index[name] = {"part": p, "kind": kind, "shape": shape, "sha256": sha}
    for p, tensors_p in enumerate(parts):
        d = out / f"part{p}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors_p, str(d / "weights.safetensors"))
        (d / "index.json").write_text(json.dumps(index, indent=1))
    small = [f for f in src.iterdir() if f.is_file() and not f.name.startswith("model.safetensors")]
    for f in small:  # config, tokenizer, template: beside the last part
        (out / f"part{n_parts - 1}" / f.name).write_bytes(f.read_bytes())
    kinds = {k: sum(1 for v in index.values() if v["kind"] == k) for k in ("q4_1", "q8_0", "raw")}
    mib = [round(s / 2**20, 1) for s in sizes]
    print(f"packed {len(index)} tensors {kinds} into {n_parts} parts of {mib} MiB")


def unpack(part_dirs: list[Path], out: Path) -> None:
    found = [d / "index.json" for d in part_dirs if (d / "index.json").is_file()]  # every part has one
    if not found:
        raise SystemExit(f"unpack: no index.json in {[str(d) for d in part_dirs]}")
    index = json.loads(found[0].read_text())
    fields: dict[str, dict] = {}
    for d in part_dirs:
        with safe_open(d / "weights.safetensors", "pt") as f:
            for k in f.keys():
                name, field = k.split("::")
                fields.setdefault(name, {})[field] = f.get_tensor(k)
        for extra in d.iterdir():
            if extra.is_file() and extra.name not in ("weights.safetensors", "index.json"):
                out.mkdir(parents=True, exist_ok=True)
                (out / extra.name).write_bytes(extra.read_bytes())
    if missing := sorted(set(index) - set(fields)):
        raise SystemExit(f"unpack: {len(missing)} tensors missing (a part not given?): {missing[:3]}")
    state = {}
    for name, meta in index.items():
        x = decode(meta["kind"], fields[name], meta["shape"])
        if _sha(x) != meta["sha256"]:
            raise SystemExit(f"unpack: {name} does not reproduce its float32 bytes")
        state[name] = x
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(f"unpacked {len(state)} tensors into {out}/model.safetensors, every one bit-exact")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--parts", type=int, default=2)
    u = sub.add_parser("unpack")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.src, a.out, a.parts)
    else:
        unpack(a.parts, a.out)


if __name__ == "__main__":
    main()
