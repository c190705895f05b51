"""Long-range retrieval, generated here (no downloads): passkey and multi-query associative recall.

- passkey: a five-digit number stated once at a chosen depth of filler prose, asked for at the
  end ("... What is the pass key? The pass key is" -> " 48213").
- mqar: `pairs` key-value facts ("The code of <word> is <number>.") spread through filler prose,
  then every key asked for in shuffled order at the end, each question followed by its answer.

Scoring is teacher-forced: one eval-mode forward over the whole example; an answer counts as
retrieved when the model's argmax equals every answer token given the true prefix - the same
outcome as greedy decoding of the answer, without a decode loop. Examples are built from token
ids piece by piece (prefix, filler, needle, question, answer each tokenized on its own), so the
answer tokens are exactly those scored, whatever the tokenizer does at piece boundaries.

For a SUBLLM the result also says, per S, the share of needle tokens (the passkey's digits, the
facts' numbers) that reached the layers inside S - did subsampling keep the needle?
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from subllm.config import Sub
from subllm.errors import SubLLMError

TASKS = ("passkey", "mqar")
INTRO = "There is a pass key hidden in this text. Find it and remember it."


@dataclass
class Example:
    ids: list[int]
    answers: list[tuple[int, int]] = field(default_factory=list)  # (start, length) of each answer
    needles: list[int] = field(default_factory=list)  # positions of the needle tokens
    depth: float = 0.0


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _filler(filler: list[int], n: int, rng: random.Random) -> list[int]:
    if n <= 0:
        return []
    if len(filler) < n:
        raise SubLLMError(f"the filler text has {len(filler)} tokens; an example needs {n}")
    s = rng.randrange(len(filler) - n + 1)
    return filler[s : s + n]


def passkey(tok, filler: list[int], length: int, depth: float, rng: random.Random) -> Example:
    """One passkey example of `length` tokens with the needle at `depth` (0 = start, 1 = end)."""
    key = str(rng.randrange(10000, 100000))
    intro, question = _enc(tok, INTRO + " "), _enc(tok, " What is the pass key? The pass key is")
    needle_pre, digits = _enc(tok, " The pass key is"), _enc(tok, " " + key)
    needle_post = _enc(tok, ". Remember it. ")
    fixed = len(intro) + len(needle_pre) + len(digits) + len(needle_post) + len(question) + len(digits)
    room = length - fixed
    if room < 0:
        raise SubLLMError(f"length {length} is too short for a passkey example ({fixed} tokens of text)")
    before = int(round(room * depth))
    ids = intro + _filler(filler, before, rng) + needle_pre
    needles = list(range(len(ids), len(ids) + len(digits)))
    ids += digits + needle_post + _filler(filler, room - before, rng) + question
    answers = [(len(ids), len(digits))]
    return Example(ids + digits, answers, needles, depth)


def mqar(tok, filler: list[int], length: int, pairs: int, rng: random.Random, words: list[str]) -> Example:
    """`pairs` facts spread evenly through filler, then every key asked for (shuffled)."""
    keys = rng.sample(words, pairs)
    values = {k: str(rng.randrange(1000, 10000)) for k in keys}
    facts = [(_enc(tok, f" The code of {k} is"), _enc(tok, " " + values[k]), _enc(tok, ".")) for k in keys]
    order = rng.sample(keys, pairs)
    asks = [(_enc(tok, f" The code of {k} is"), _enc(tok, " " + values[k]), _enc(tok, ".")) for k in order]
    fixed = sum(len(a) + len(b) + len(c) for a, b, c in facts + asks)
    room = length - fixed
    if room < pairs:
        raise SubLLMError(f"length {length} is too short for {pairs} mqar pairs ({fixed} tokens of text)")
    ids: list[int] = []
    needles: list[int] = []
    gap = room // pairs
    for pre, val, post in facts:
        ids += _filler(filler, gap, rng) + pre
        needles += range(len(ids), len(ids) + len(val))
        ids += val + post
    ids += _filler(filler, room - gap * pairs, rng)
    answers = []
    for pre, val, post in asks:
        ids += pre
        answers.append((len(ids), len(val)))
        ids += val + post
    return Example(ids, answers, needles)


def reached(model, selections, T: int) -> list[torch.Tensor | None]:
    """Per S (structure order): (B, T) bool, which level-0 positions reached the layers inside it
    (kept by it and by every enclosing S) in an eval forward of unpadded rows of length T."""
    out: list[torch.Tensor | None] = [None] * model.config.n_subsamples
    if not selections:
        return out

    def walk(nodes, pos):  # pos (B, L): level-0 positions of this level's slots (-1 = invalid)
        for node in nodes:
            if not isinstance(node, Sub):
                continue
            sel = selections[node.index]
            inner = pos.gather(1, sel.idx)
            if sel.valid is not None:
                inner = inner.masked_fill(~sel.valid, -1)
            mask = torch.zeros(pos.shape[0], T + 1, dtype=torch.bool)
            mask.scatter_(1, inner.clamp(min=-1) % (T + 1), True)  # -1 lands in the spare column T
            out[node.index] = mask[:, :T]
            walk(node.children, inner)

    B = selections[0].idx.shape[0]
    walk(model.config.tree, torch.arange(T).expand(B, T))
    return out


@torch.no_grad()
def score(model, ex: Example, autocast=None) -> tuple[list[bool], list[float], list[int]]:
    """-> (retrieved per answer, share of needle tokens that reached the inside of each S, answer
    tokens predicted right per answer - a softer measure than exact match: chance is ~1/10 a digit)."""
    import contextlib

    ids = torch.tensor([ex.ids])
    with autocast() if autocast else contextlib.nullcontext():
        out = model(ids, return_selections=model.config.n_subsamples > 0)
    pred = out.logits[0].float().argmax(-1)  # pred[t] predicts ids[t + 1]
    right = [int((pred[s - 1 : s - 1 + n] == ids[0, s : s + n]).sum()) for s, n in ex.answers]
    hits = [r == n for r, (_, n) in zip(right, ex.answers)]
    keep = []
    for m in reached(model, out.selections, ids.shape[1]):
        keep.append(float(m[0, ex.needles].float().mean()) if m is not None and ex.needles else float("nan"))
    return hits, keep, right


def run_retrieval(
    model,
    tok,
    filler_text: str,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    examples: int = 5,
    pairs: int = 8,
    seed: int = 1234,
    autocast=None,
    log=print,
) -> dict:
    """Accuracy by task, length (and depth for passkey), with the needle-keep share per S."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SubLLMError(f"unknown retrieval task(s) {bad}; choose from {', '.join(TASKS)}")
    too_long = [n for n in lengths if n > model.config.max_seq_len]
    if too_long:
        raise SubLLMError(f"lengths {too_long} exceed the model's max_seq_len {model.config.max_seq_len}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise SubLLMError(f"depths must lie in [0, 1], got {depths}")
    filler = _enc(tok, filler_text)
    words = sorted({w for w in filler_text.lower().split() if w.isalpha() and 3 <= len(w) <= 9})
    if len(words) < pairs:
        raise SubLLMError(f"the filler text has {len(words)} distinct words; mqar needs {pairs} keys")
    model.eval()
    rows = []
    for task in tasks:
        for n in lengths:
            for d in depths if task == "passkey" else [None]:
                rng = random.Random(f"{seed}-{task}-{n}-{d}")
                hits, keeps, per_example, right, total = [], [], [], 0, 0
                for _ in range(examples):
                    if task == "passkey":
                        ex = passkey(tok, filler, n, d, rng)
                    else:
                        ex = mqar(tok, filler, n, pairs, rng, words)
                    h, k, r = score(model, ex, autocast)
                    hits += h
                    right, total = right + sum(r), total + sum(n for _, n in ex.answers)
                    keeps.append(k)
                    per_example.append(
                        {"retrieved": sum(h), "of": len(h), "needle_keep": [round(x, 4) for x in k]}
                    )
                needle = [sum(k[i] for k in keeps) / len(keeps) for i in range(len(keeps[0]))]
                row = dict(task=task, length=n, depth=d, answers=len(hits), accuracy=sum(hits) / len(hits),
                           token_accuracy=round(right / total, 4))  # fmt: skip
                rows.append({**row, "needle_keep": [round(x, 4) for x in needle], "examples": per_example})
                where = f" depth {d:.2f}" if d is not None else ""
                kept = f", needle kept per S {'/'.join(f'{x:.2f}' for x in needle)}" if needle else ""
                tokens = f" ({right}/{total} answer tokens right)"
                log(f"{task} length {n}{where}: {sum(hits)}/{len(hits)} retrieved{tokens}{kept}")
    return {"examples": examples, "pairs": pairs, "seed": seed, "results": rows}
