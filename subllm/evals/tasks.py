"""Task builders: few-shot and held-out-text tasks as JSONL documents, built at run time from what
ships offline (docs/data.md); the lm-eval task YAML that reads them lives in subllm/tasks/.

- mmlu: the 4-choice questions (with gold answers) bundled inside lm-eval's
  `tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`, in the MMLU paper's prompt format
  (subject header, question, "A. ..".."D. ..", "Answer:"), 5-shot. The bundle holds about five
  questions per subject, so each question's shots are the other questions of its subject,
  topped up from other subjects (deterministically) when fewer than `shots` remain.
- bbh / bbh_mc: the 81 examples bundled in lm-eval's `tasks/bbh/cot_fewshot/*.yaml` (3 per task,
  27 tasks), answer-only ("direct") format: the final answer is taken from each chain of thought.
  Each example is a test item whose shots are the OTHER examples of its task, so at most 2-shot
  (3-shot would put the test item in its own prompt). `bbh` scores greedy generation by exact
  match (as lm-eval's bbh); `bbh_mc` scores the log-likelihood of each candidate answer for the
  tasks with a closed answer set (lettered options, True/False, Yes/No, valid/invalid).
- cloze: LAMBADA-style last-word prediction on passages of held-out text.
- next_sentence: pick the true next sentence of a held-out passage among 4 (3 distractors drawn
  from far away in the same text).
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

from subllm.errors import SubLLMError

LETTERS = "ABCD"
STOP_WORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below "
    "between both but by can could did do does doing down during each few for from further had has have "
    "having he her here hers herself him himself his how i if in into is it its itself just me more most "
    "my myself no nor not now of off on once only or other our ours ourselves out over own same shall she "
    "should so some such than that the their theirs them themselves then there these they this those "
    "through thou thee thy to too under until up upon very was we were what when where which while who "
    "whom why will with would ye yet you your yours yourself yourselves".split()
)


# ---- MMLU -----------------------------------------------------------------------------------------
def _lm_eval_file(rel: str):
    try:
        path = resources.files("lm_eval") / rel
    except ModuleNotFoundError:
        raise SubLLMError("the few-shot tasks need lm-eval (pip install lm-eval==0.4.13)") from None
    if not path.is_file() and not path.is_dir():
        raise SubLLMError(f"lm-eval does not ship {rel} (lm-eval 0.4.13 does)")
    return path


_MMLU_Q = re.compile(r"(.*?)\n\(A\) (.*?)\s\(B\) (.*?)\s\(C\) (.*?)\s\(D\) (.*?)\nA: (.*)$", re.S)
_MMLU_A = re.compile(r"answer is \(([A-D])\)")


def mmlu_questions() -> list[dict]:
    """[{subject, question, choices[4], answer (0-3)}] parsed from the bundled CoT prompts;
    questions with more than four options or without a gold answer are skipped."""
    data = json.loads(_lm_eval_file("tasks/mmlu/flan_cot_fewshot/_cot_prompts.json").read_text("utf-8"))
    out = []
    for subject, text in data.items():
        for block in re.split(r"(?:^|\n\n)Q: ", text)[1:]:
            m, a = _MMLU_Q.match(block), _MMLU_A.search(block)
            if not (m and a) or re.search(r"\s\([E-Z]\) ", m.group(5)):
                continue
            choices = [c.strip() for c in m.group(2, 3, 4, 5)]
            q = {"subject": subject, "question": m.group(1).strip(), "choices": choices}
            out.append({**q, "answer": LETTERS.index(a.group(1))})
    return out


def _mmlu_item(q: dict, answer: bool) -> str:
    lines = [q["question"], *(f"{L}. {c}" for L, c in zip(LETTERS, q["choices"]))]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[q['answer']]}\n\n" if answer else "")


def build_mmlu(shots: int = 5, seed: int = 1234) -> list[dict]:
    qs = mmlu_questions()
    rng = random.Random(seed)
    docs = []
    for i, q in enumerate(qs):
        same = [j for j, o in enumerate(qs) if o["subject"] == q["subject"] and j != i]
        other = [j for j, o in enumerate(qs) if o["subject"] != q["subject"]]
        picked = same[:shots] + rng.sample(other, max(0, shots - len(same)))
        subject = q["subject"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        prompt = header + "".join(_mmlu_item(qs[j], True) for j in picked) + _mmlu_item(q, False)
        docs.append({"prompt": prompt, "answer": q["answer"], "subject": q["subject"], "shots": len(picked)})
    return docs


# ---- BBH ------------------------------------------------------------------------------------------
_BBH_ANSWER = re.compile(r"[Ss]o the answer is (.*?)\.?\s*$", re.S)
_BINARY = [("True", "False"), ("Yes", "No"), ("yes", "no"), ("valid", "invalid")]


def bbh_examples() -> dict[str, dict]:
    """{task: {description, examples: [(input, answer)]}} from the bundled CoT few-shot YAML."""
    import yaml

    root = _lm_eval_file("tasks/bbh/cot_fewshot")
    out = {}
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yaml") or f.name.startswith("_"):
            continue
        y = yaml.safe_load(f.read_text("utf-8"))
        examples = []
        for s in y["fewshot_config"]["samples"]:
            m = _BBH_ANSWER.search(s["target"].strip())
            if m:
                examples.append((s["input"].strip(), m.group(1).strip()))
        out[y["dataset_name"]] = {"description": y.get("description", ""), "examples": examples}
    return out


def _bbh_choices(task_examples: list[tuple[str, str]], inp: str) -> list[str] | None:
    answers = {a for _, a in task_examples}
    if all(re.fullmatch(r"\([A-R]\)", a) for a in answers):
        letters = re.findall(r"^\(([A-R])\)", inp, re.M)
        return [f"({L})" for L in letters] or None
    for pair in _BINARY:
        if answers <= set(pair):
            return list(pair)
    return None  # free-form answers (numbers, word lists, brackets): generation only


def build_bbh(shots: int = 2) -> tuple[list[dict], list[dict]]:
    """(generation docs, multiple-choice docs); each example is tested with `shots` of the others."""
    gen, mc = [], []
    for task, t in bbh_examples().items():
        ex = t["examples"]
        for i, (inp, ans) in enumerate(ex):
            others = [e for j, e in enumerate(ex) if j != i][:shots]
            prompt = t["description"] + "".join(f"Q: {q}\nA: {a}\n\n" for q, a in others) + f"Q: {inp}\nA:"
            gen.append({"prompt": prompt, "target": ans, "task": task, "shots": len(others)})
            choices = _bbh_choices(ex, inp)
            if choices and ans in choices:
                mc.append({"prompt": prompt, "choices": choices, "answer": choices.index(ans), "task": task})
    return gen, mc


# ---- held-out text: cloze and next sentence --------------------------------------------------------
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]")


def text_files(path) -> list[Path]:
    """A .txt file, or every *.txt file of a folder (sorted)."""
    p = Path(path)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise SubLLMError(f"no text file at {p} (give a .txt file or a folder of them)")
    return files


def read_texts(path) -> list[str]:
    """The texts of `text_files(path)`, UTF-8, one per file."""
    return [f.read_text("utf-8", errors="replace") for f in text_files(path)]


def paragraphs_of_sentences(text: str, min_words: int = 4, max_words: int = 60) -> list[list[str]]:
    """Paragraphs (split at blank lines), each a list of whitespace-normalised sentences; a
    paragraph is cut where a sentence falls outside [min_words, max_words]."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        run: list[str] = []
        for s in _SENT_END.split(" ".join(para.split())):
            n = len(s.split())
            if min_words <= n <= max_words:
                run.append(s)
            else:
                if len(run) > 1:
                    out.append(run)
                run = []
        if len(run) > 1:
            out.append(run)
    return out


def _passages(paras, min_words: int, max_words: int, with_next: bool):
    """Non-overlapping runs of consecutive sentences of [min_words, max_words] words (plus the
    following sentence when `with_next`): yields (sentences, next sentence or None, sentence id)."""
    sid = 0
    for para in paras:
        i = 0
        while i < len(para):
            words, j = 0, i
            while j < len(para) and words < min_words:
                words += len(para[j].split())
                j += 1
            if min_words <= words <= max_words and (not with_next or j < len(para)):
                yield para[i:j], (para[j] if with_next else None), sid + i
                i = j + (1 if with_next else 0)
            else:
                i += 1
        sid += len(para)


def build_cloze(texts, n: int = 200, seed: int = 1234, min_words: int = 40, max_words: int = 120):
    """LAMBADA-style docs {context, target}: a passage up to its last word, and that word (a
    content word: 3+ letters, not a stop word)."""
    cands = []
    for text in [texts] if isinstance(texts, str) else texts:
        for sents, _, _ in _passages(paragraphs_of_sentences(text), min_words, max_words, False):
            passage = " ".join(sents)
            m = list(_WORD.finditer(passage))
            if not m or passage[m[-1].end() :].strip(" .!?\"')]") != "":
                continue
            last = m[-1]
            if len(last.group()) < 3 or last.group().lower() in STOP_WORDS:
                continue
            cands.append({"context": passage[: last.start()].rstrip(), "target": last.group()})
    return _sample(cands, n, seed)


def build_next_sentence(
    texts, n: int = 200, seed: int = 1234, n_choices: int = 4, min_words: int = 30, max_words: int = 100
):
    """Docs {context, choices, answer}: the true next sentence among `n_choices`. Distractors come
    from the same text (file), at least 50 sentences away, of similar length (0.5x-2x words)."""
    flats, cands = [], []
    for t, text in enumerate([texts] if isinstance(texts, str) else texts):
        paras = paragraphs_of_sentences(text)
        flats.append([s for p in paras for s in p])
        cands += [(t, *c) for c in _passages(paras, min_words, max_words, True)]
    rng = random.Random(seed)
    docs = []
    for t, sents, nxt, sid in _sample(cands, n, seed):
        flat, k = flats[t], len(nxt.split())
        far: list[str] = []
        for _ in range(200 * n_choices):  # rejection sampling: cheap on long texts
            i = rng.randrange(len(flat))
            s = flat[i]
            if abs(i - sid) > 50 and 0.5 * k <= len(s.split()) <= 2 * k and s != nxt and s not in far:
                far.append(s)
                if len(far) == n_choices - 1:
                    break
        if len(far) < n_choices - 1:
            continue
        choices = [nxt, *far]
        rng.shuffle(choices)
        docs.append({"context": " ".join(sents), "choices": choices, "answer": choices.index(nxt)})
    return docs


def _sample(cands: list, n: int, seed: int) -> list:
    if len(cands) <= n:
        return cands
    keep = sorted(random.Random(seed).sample(range(len(cands)), n))
    return [cands[i] for i in keep]


def write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def chance(name: str, docs: list[dict]) -> float | None:
    """Expected accuracy of uniform guessing (None where undefined, e.g. generation)."""
    if name in ("mmlu", "next_sentence", "bbh_mc") and docs:
        if name == "mmlu":
            return 0.25
        return sum(1.0 / len(d["choices"]) for d in docs) / len(docs)
    return None
