"""Run the shipped tasks through lm-eval, offline: build the JSONL documents into a cache
directory, place the YAML of subllm/tasks/ beside them, and call `simple_evaluate` with a
`TaskManager(include_path=...)` that indexes only that directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from subllm.errors import SubLLMError
from subllm.evals import tasks as T

FEWSHOT_TASKS = ("mmlu", "bbh", "bbh_mc")
TEXT_TASKS = ("cloze", "next_sentence")
TASKS = FEWSHOT_TASKS + TEXT_TASKS
# the metrics shown per task, in order: (lm-eval metric key, label)
METRICS = {
    "mmlu": [("acc", "acc"), ("acc_norm", "acc_norm")],
    "bbh": [("exact_match", "exact_match")],
    "bbh_mc": [("acc", "acc")],
    "cloze": [("acc", "acc"), ("perplexity", "word ppl")],
    "next_sentence": [("acc", "acc"), ("acc_norm", "acc_norm")],
}


def default_cache_dir() -> Path:
    base = os.environ.get("SUBLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "subllm"
    )
    return Path(base) / "tasks"


def build_tasks(
    names: list[str],
    cache_dir,
    heldout: str | None = None,
    mmlu_shots: int = 5,
    bbh_shots: int = 2,
    n_text: int = 200,
    seed: int = 1234,
) -> dict[str, dict]:
    """Write <name>.jsonl and subllm_<name>.yaml into `cache_dir` for each task; returns
    {name: {"docs": count, "chance": float | None, "source": str}}."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise SubLLMError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[dict]] = {}
    source: dict[str, str] = {}
    if "mmlu" in names:
        docs["mmlu"] = T.build_mmlu(mmlu_shots, seed)
        source["mmlu"] = f"lm-eval mmlu/flan_cot_fewshot, {mmlu_shots}-shot"
    if "bbh" in names or "bbh_mc" in names:
        gen, mc = T.build_bbh(bbh_shots)
        docs.update({k: v for k, v in (("bbh", gen), ("bbh_mc", mc)) if k in names})
        source["bbh"] = source["bbh_mc"] = (
            f"lm-eval bbh/cot_fewshot, {min(bbh_shots, 2)}-shot (leave-one-out)"
        )
    text_names = [n for n in names if n in TEXT_TASKS]
    if text_names:
        if heldout is None:
            raise SubLLMError(
                f"{', '.join(text_names)} need held-out text: pass --heldout FILE_OR_DIR "
                "(default data/corpus/val when it exists)"
            )
        texts = T.read_texts(heldout)
        if "cloze" in names:
            docs["cloze"] = T.build_cloze(texts, n_text, seed)
        if "next_sentence" in names:
            docs["next_sentence"] = T.build_next_sentence(texts, n_text, seed)
        for n in text_names:
            source[n] = f"held-out text {heldout}"
    info = {}
    for name in names:
        if not docs[name]:
            raise SubLLMError(f"task {name}: no documents could be built (held-out text too short?)")
        T.write_jsonl(d / f"{name}.jsonl", docs[name])
        template = resources.files("subllm") / "tasks" / f"subllm_{name}.yaml"
        (d / f"subllm_{name}.yaml").write_text(
            template.read_text("utf-8").replace("@DATA@", str(d.resolve()))
        )
        info[name] = {"docs": len(docs[name]), "chance": T.chance(name, docs[name]), "source": source[name]}
    (d / "tasks.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool):
    """lm-eval logs every task at INFO, draws progress bars and bootstraps stderrs in a process
    pool: run the bootstrap in-process and, unless `verbose`, hold back its output (shown again
    if something fails)."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    buf = io.StringIO()
    try:
        if verbose:
            yield
            return
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
                yield
        except BaseException:
            sys.stderr.write(buf.getvalue())
            raise
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def run_tasks(
    lm,
    names: list[str],
    cache_dir,
    limit: int | None = None,
    bootstrap_iters: int = 200,
    verbose: bool = False,
    seed: int = 1234,
) -> dict[str, dict]:
    """Evaluate `lm` (an lm-eval LM) on tasks already built into `cache_dir`.
    Returns {name: {label: value, label + "_stderr": value, "n": docs evaluated}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval(verbose):
        tm = TaskManager(include_path=str(cache_dir), include_defaults=False)
        res = simple_evaluate(
            model=lm,
            tasks=[f"subllm_{n}" for n in names],
            task_manager=tm,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if res is None:
        raise SubLLMError("lm-eval returned no results")
    out = {}
    for name in names:
        r = res["results"][f"subllm_{name}"]
        row = {}
        for key, label in METRICS[name]:
            hit = next((k for k in r if k.split(",")[0] == key), None)
            if hit is not None:
                row[label] = r[hit]
                se = r.get(f"{key}_stderr,{hit.split(',', 1)[1]}") if "," in hit else None
                row[label + "_stderr"] = se if isinstance(se, int | float) else None
        row["n"] = res.get("n-samples", {}).get(f"subllm_{name}", {}).get("effective")
        out[name] = row
    return out
