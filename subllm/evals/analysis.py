"""`subllm analyze`: which tokens does each subsampling module keep, and why?

    subllm analyze --checkpoint runs/demo/subllm --text data/corpus/val/book.txt --out docs/analysis

Runs the eval-mode model (keep token iff score > theta, docs/method.md section 3) over consecutive
windows of a text and writes, into --out:
- tokens.html: the text with every token shaded by how many S kept it (hover: its scores);
- attention_vs_score.png: for each S, the attention each token RECEIVES in the layer just before
  that S (computed explicitly from the layer's q and k: softmax(q k^T / sqrt(d)), causal, averaged
  over heads, divided by the number of queries that can see the token) against its score, with
  Pearson / Spearman correlations and kept vs dropped - the slides' claim that "the attention
  pattern before subsampling resembles the distribution of kept indexes";
- keep_by_position.png: kept fraction and mean received attention along the window;
- keep_by_class.png: keep rates by token class (punctuation, stop words, word-initial pieces,
  word continuations, numbers, whitespace);
- analysis.json: every number above.
The first token of each window (an attention sink) is left out of the correlations.
"""

from __future__ import annotations

import html
import json
import math
import unicodedata
from pathlib import Path

import torch

from subllm.config import Sub
from subllm.errors import SubLLMError
from subllm.evals.tasks import STOP_WORDS

CLASSES = ("punctuation", "stop word", "word-initial", "word continuation", "number", "whitespace")


# ---- structure helpers ---------------------------------------------------------------------------
def sub_parents_and_layers(tree: tuple) -> tuple[dict[int, int | None], dict[int, int | None]]:
    """For every S: its enclosing S (None at top level) and the layer just before it at the same
    level (None when the S comes first in its bracket or follows another S directly)."""
    parent: dict[int, int | None] = {}
    before: dict[int, int | None] = {}

    def walk(nodes: tuple, enclosing: int | None) -> None:
        last = None
        for node in nodes:
            if isinstance(node, Sub):
                parent[node.index], before[node.index] = enclosing, last
                walk(node.children, node.index)
                last = None
            else:
                last = node

    walk(tree, None)
    return parent, before


# ---- explicit attention ---------------------------------------------------------------------------
@torch.no_grad()
def attention_probs(block, x, cos, sin, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit (slow) attention of `block` for one sequence x (1, L, C):
    (softmax(q k^T / sqrt(d)) under the causal and validity mask (1, H, L, L) float32 with the
    GQA heads expanded, the (L, L) bool mask of allowed query -> key pairs)."""
    attn = block.attn
    q, k, _ = attn.qkv(block.attn_norm(x), cos, sin)  # (1, H, L, hd), (1, Hkv, L, hd)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    L = x.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    if mask is not None:
        allowed = allowed & mask[0, 0]
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1), allowed


def received_attention(probs: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each token receives, averaged over heads: (raw column sums, column sums / number
    of queries allowed to see the token), both (L,)."""
    raw = probs.mean(1)[0].sum(0)
    return raw, raw / allowed.sum(0).clamp(min=1)


@torch.no_grad()
def analyze_window(model, ids: torch.Tensor) -> list[dict]:
    """One window (1, L). Per S: positions (in the window) of the tokens it scored, their scores,
    kept flags and received attention in the layer before it (NaN when there is none)."""
    parent, before = sub_parents_and_layers(model.tree)
    captured: dict[int, tuple] = {}
    hooks = [
        model.layers[j].register_forward_pre_hook(lambda mod, args, j=j: captured.__setitem__(j, args))
        for j in {b for b in before.values() if b is not None}
    ]
    try:
        out = model(ids, return_selections=True)
    finally:
        for h in hooks:
            h.remove()
    sels = out.selections
    positions: dict[int, torch.Tensor] = {}  # S index -> window positions of the tokens it kept
    result = []
    for i in range(model.config.n_subsamples):  # structure order: parents come first
        p = parent[i]
        reach = (
            torch.arange(ids.shape[1]) if p is None else positions.get(p, torch.zeros(0, dtype=torch.long))
        )
        sel = sels[i]
        if sel is None:  # an enclosing S kept nothing
            positions[i] = torch.zeros(0, dtype=torch.long)
            result.append(
                {
                    "pos": reach[:0],
                    "score": torch.zeros(0),
                    "kept": torch.zeros(0, dtype=torch.bool),
                    "att_raw": torch.zeros(0),
                    "att": torch.zeros(0),
                }
            )
            continue
        scores = sel.scores[0].cpu()
        kept = model.subsamples[i].keep(scores)
        positions[i] = reach[sel.idx[0].cpu()] if sel.k else reach[:0]
        att_raw = att = torch.full_like(scores, float("nan"))
        if before[i] is not None and before[i] in captured:
            probs = attention_probs(model.layers[before[i]], *captured[before[i]])
            att_raw, att = (t.cpu() for t in received_attention(*probs))
        result.append({"pos": reach, "score": scores, "kept": kept, "att_raw": att_raw, "att": att})
    return result


# ---- token classes --------------------------------------------------------------------------------
def token_classes(text: str, spans: list[tuple[int, int]]) -> list[set[str]]:
    """Classes of each token, from its character span in `text` (classes may overlap)."""
    out = []
    for a, b in spans:
        s = text[a:b]
        core = s.strip()
        cls: set[str] = set()
        if not core:
            cls.add("whitespace")
        elif all(unicodedata.category(ch)[0] in "PS" for ch in core):
            cls.add("punctuation")
        elif any(ch.isdigit() for ch in core) and all(ch.isdigit() or ch in ",." for ch in core):
            cls.add("number")
        elif core[0].isalpha():
            starts = s[0].isspace() or a == 0 or not text[a - 1].isalnum()
            cls.add("word-initial" if starts else "word continuation")
            ends = b >= len(text) or not text[b].isalpha()
            if starts and ends and core.lower() in STOP_WORDS:
                cls.add("stop word")
        out.append(cls)
    return out


# ---- statistics -----------------------------------------------------------------------------------
def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double(), y.double()
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(((x - x.mean()) * (y - y.mean())).mean() / (x.std(unbiased=False) * y.std(unbiased=False)))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def summarize(per_s: list[dict], classes: list[set[str]]) -> list[dict]:
    """Per S: keep fraction, correlations of received attention with score and kept, class rates."""
    stats = []
    for i, r in enumerate(per_s):
        n = len(r["score"])
        kept = r["kept"]
        st = {
            "S": i,
            "tokens": n,
            "kept": int(kept.sum()),
            "keep_fraction": float(kept.float().mean()) if n else None,
        }
        ok = ~torch.isnan(r["att"]) & ~r["first"]
        if ok.sum() >= 3:
            att, sc, kp = r["att"][ok], r["score"][ok], kept[ok].double()
            st["pearson_attention_score"] = _pearson(att, sc)
            st["spearman_attention_score"] = _pearson(_ranks(att), _ranks(sc))
            st["pearson_attention_kept"] = _pearson(att, kp)
            st["pearson_raw_attention_score"] = _pearson(r["att_raw"][ok], sc)
            st["mean_attention_kept"] = float(att[kp.bool()].mean()) if kp.any() else None
            st["mean_attention_dropped"] = float(att[~kp.bool()].mean()) if (~kp.bool()).any() else None
        rates = {}
        for c in CLASSES:
            m = torch.tensor([c in classes[g] for g in r["gpos"].tolist()], dtype=torch.bool)
            if m.any():
                rates[c] = {"n": int(m.sum()), "keep_rate": float(kept[m].float().mean())}
        st["keep_by_class"] = rates
        stats.append(st)
    return stats


# ---- outputs --------------------------------------------------------------------------------------
_SHADES = ["#ffffff", "#fff3b0", "#ffd166", "#f4a261", "#e76f51", "#c0392b"]


def write_html(
    path: Path, text: str, spans, kept_by: list[list[tuple[int, float, bool]]], title: str, stats
) -> None:
    """Each token shaded by how many S kept it; the hover text lists each S's score."""
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:monospace;max-width:60em;margin:2em auto;line-height:1.6}"
        "span{white-space:pre-wrap}.k{font-size:90%}</style>",
        f"<h3>{html.escape(title)}</h3><p class='k'>shade = number of subsampling modules that kept the "
        "token: "
        + " ".join(f"<span style='background:{c}'>&nbsp;{d}&nbsp;</span>" for d, c in enumerate(_SHADES))
        + "</p><p class='k'>"
        + "; ".join(f"S{s['S']}: kept {s['kept']}/{s['tokens']}" for s in stats)
        + "</p><p>",
    ]
    for (a, b), ks in zip(spans, kept_by):
        depth = sum(k for _, _, k in ks)
        tip = "; ".join(f"S{s}: {sc:+.3f} {'kept' if k else 'dropped'}" for s, sc, k in ks) or "no S"
        tok = html.escape(text[a:b]).replace("\n", "<br>")
        parts.append(
            f"<span title='{html.escape(tip)}' style='background:{_SHADES[min(depth, 5)]}'>{tok}</span>"
        )
    parts.append("</p>")
    path.write_text("".join(parts), encoding="utf-8")


def plot_all(out: Path, per_s: list[dict], stats: list[dict], seq_len: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files = []
    n = len(per_s)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, r, st in zip(axes[0], per_s, stats):
        ok = ~torch.isnan(r["att"]) & ~r["first"]
        if ok.any():
            k = r["kept"][ok]
            ax.scatter(r["score"][ok][~k], r["att"][ok][~k], s=6, alpha=0.5, label="dropped", c="tab:blue")
            ax.scatter(r["score"][ok][k], r["att"][ok][k], s=6, alpha=0.5, label="kept", c="tab:red")
            ax.set_yscale("log")
            ax.legend(loc="best", fontsize=8)
        sp, pe = st.get("spearman_attention_score"), st.get("pearson_attention_score")
        ax.set_title(f"S{st['S']}: spearman {fmt_corr(sp)}, pearson {fmt_corr(pe)}", fontsize=9)
        ax.set_xlabel("score (kept iff > 0)")
        ax.set_ylabel("mean attention received (layer before S)")
    files.append(_save(fig, plt, out / "attention_vs_score.png"))

    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), squeeze=False)
    bins = min(32, seq_len)
    for ax, r, st in zip(axes[:, 0], per_s, stats):
        wpos = r["wpos"].double()
        b = (wpos * bins / seq_len).long().clamp(max=bins - 1)
        cnt = torch.bincount(b, minlength=bins).double().clamp(min=1)
        frac = torch.bincount(b, weights=r["kept"].double(), minlength=bins) / cnt
        x = (torch.arange(bins) + 0.5) * seq_len / bins
        ax.plot(x, frac, "o-", c="tab:red", label="kept fraction")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"S{st['S']} kept", color="tab:red")
        ok = ~torch.isnan(r["att"])
        if ok.any():
            att = torch.bincount(b[ok], weights=r["att"][ok].double(), minlength=bins)
            att = att / torch.bincount(b[ok], minlength=bins).double().clamp(min=1)
            ax2 = ax.twinx()
            ax2.plot(x, att, "s--", c="tab:blue", ms=3)
            ax2.set_yscale("log")
            ax2.set_ylabel("attention received", color="tab:blue")
    axes[-1, 0].set_xlabel("position in window")
    files.append(_save(fig, plt, out / "keep_by_position.png"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    w = 0.8 / max(n, 1)
    for j, st in enumerate(stats):
        rates = [st["keep_by_class"].get(c, {}).get("keep_rate", float("nan")) for c in CLASSES]
        ax.bar([i + j * w for i in range(len(CLASSES))], rates, w, label=f"S{st['S']}")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(CLASSES))], CLASSES, fontsize=8)
    ax.set_ylabel("keep rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    files.append(_save(fig, plt, out / "keep_by_class.png"))
    return files


def fmt_corr(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- driver ---------------------------------------------------------------------------------------
def analyze(
    checkpoint, text_path, out, tokenizer=None, seq_len: int | None = None, max_tokens: int = 2048
) -> dict:
    from subllm.data.tokenizer import load_tokenizer_for
    from subllm.evals.suite import default_window
    from subllm.model.subllm import load_model

    model = load_model(checkpoint)
    if not model.config.n_subsamples:
        raise SubLLMError(
            f"structure {model.config.structure!r} has no subsampling module: nothing to analyse"
        )
    tok = load_tokenizer_for(checkpoint, tokenizer)
    p = Path(text_path)
    if not p.is_file():
        raise SubLLMError(f"no text file {p}")
    text = p.read_text("utf-8", errors="replace")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = enc["input_ids"][:max_tokens], [tuple(s) for s in enc["offset_mapping"][:max_tokens]]
    if len(ids) < 2:
        raise SubLLMError(f"{p} is too short to analyse")
    if max(ids) >= model.config.vocab_size:
        raise SubLLMError("the tokenizer produces ids beyond the model's vocabulary (wrong --tokenizer?)")
    L = min(seq_len or default_window(checkpoint, model), model.config.max_seq_len)
    n_s = model.config.n_subsamples
    acc: list[dict[str, list]] = [
        {k: [] for k in ("gpos", "wpos", "score", "kept", "att", "att_raw", "first")} for _ in range(n_s)
    ]
    for start in range(0, len(ids), L):
        window = torch.tensor(ids[start : start + L])[None]
        for i, r in enumerate(analyze_window(model, window)):
            a = acc[i]
            a["gpos"].append(r["pos"] + start)
            a["wpos"].append(r["pos"])
            a["first"].append(r["pos"] == 0)
            for k in ("score", "kept", "att", "att_raw"):
                a[k].append(r[k])
    per_s = [{k: torch.cat(v) for k, v in a.items()} for a in acc]
    classes = token_classes(text, spans)
    stats = summarize(per_s, classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept_by: list[list[tuple[int, float, bool]]] = [[] for _ in ids]
    for i, r in enumerate(per_s):
        for g, sc, k in zip(r["gpos"].tolist(), r["score"].tolist(), r["kept"].tolist()):
            kept_by[g].append((i, sc, k))
    title = f"{Path(checkpoint).name}: {model.config.structure} on {p.name} ({len(ids)} tokens)"
    write_html(out / "tokens.html", text, spans, kept_by, title, stats)
    figures = plot_all(out, per_s, stats, L)
    from subllm.evals.selection import measure_selection, token_windows

    windows = token_windows(ids, L, 8) or [torch.tensor(ids)[None]]  # a text shorter than L: one window
    res = {
        "checkpoint": str(checkpoint),
        "text": str(p),
        "structure": model.config.structure,
        "keep_ratios": model.config.keep_ratios,
        "tokens": len(ids),
        "seq_len": L,
        "per_S": stats,
        "selection": measure_selection(model, windows),  # keep and agreement with training top-k
        "files": [str(out / "tokens.html"), *map(str, figures), str(out / "analysis.json")],
    }
    (out / "analysis.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


__all__ = [
    "analyze",
    "analyze_window",
    "received_attention",
    "attention_probs",
    "token_classes",
    "summarize",
    "sub_parents_and_layers",
]
