"""Evaluation: batched scoring == naive, loss / bits per byte, the lm-eval adapter on a tiny local
task (offline), the task builders over what lm-eval bundles, and `subllm eval` end to end."""

import json
import math
import random

import pytest
import torch
from helpers import tiny_model

from subllm.cli import main
from subllm.evals.scoring import rolling_windows, score_tokens

lm_eval = pytest.importorskip("lm_eval")

WORDS = (
    "the a of and to in he she it was said king queen house river stone light dark came went saw gave "
    "took old young night morning garden letter father mother"
).split()


def _text(n_paras=40, seed=0) -> str:
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paras):
        sents = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))] + [rng.choice(WORDS[20:])]
            sents.append(" ".join(words).capitalize() + rng.choice(".!?"))
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from subllm.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("ck")
    text = _text()
    (d / "text.txt").write_text(text)
    train_tokenizer([text], vocab_size=300, out_dir=d / "model")
    tiny_model(vocab_size=300).save_pretrained(d / "model")
    return d


def _naive(model, toks, n):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([toks[:-1]])).logits[0].float(), -1)
    tgt = torch.tensor(toks[1:])
    lp = logp.gather(1, tgt[:, None])[:, 0][-n:]
    return float(lp.sum()), bool((logp.argmax(-1) == tgt)[-n:].all())


def test_score_tokens_matches_naive_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 97, (30,), generator=g).tolist()
    items = [(ctx + [5], 1), (ctx + [6], 1), (ctx + [7, 8], 2)]  # shared contexts run once
    items += [(torch.randint(3, 97, (L,), generator=g).tolist(), n) for L, n in ((12, 3), (40, 39), (2, 1))]
    scores = score_tokens(model, items, batch_size=4)
    for (toks, n), s in zip(items, scores):
        lp, greedy = _naive(model, toks, n)
        assert s.n == n and abs(s.logprob - lp) < 1e-4 and s.greedy == greedy


def test_rolling_windows_score_every_token_once():
    toks = list(range(10, 60))
    for window, stride in ((8, 8), (8, 3), (64, 32), (1, 1)):
        items = rolling_windows(toks, 1, window, stride)
        scored = [t for seq, n in items for t in seq[-n:]]
        assert scored == toks and all(len(seq) - 1 <= window for seq, _ in items)
        assert all(len(seq) - 1 == min(window, len(toks)) for seq, _ in items)  # full windows


def test_text_loss_and_bits_per_byte(ckpt):
    from subllm.data.tokenizer import load_tokenizer_for
    from subllm.evals.suite import text_loss
    from subllm.model.subllm import load_model

    model, tok = load_model(ckpt / "model"), load_tokenizer_for(ckpt / "model")
    text = _text(1, seed=5)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < model.config.max_seq_len
    r = text_loss(model, tok, [text])
    seq = torch.tensor([[model.config.eos_token_id, *ids]])
    with torch.no_grad():
        ref = model(seq, labels=seq).loss.item()
    assert abs(r["loss"] - ref) < 1e-4 and r["tokens"] == len(ids) and r["bytes"] == len(text.encode())
    assert abs(r["bpb"] - ref * len(ids) / math.log(2) / len(text.encode())) < 1e-4
    assert len(r["keep_fractions"]) == 2 and all(0 < f < 1 for f in r["keep_fractions"])
    from subllm.evals.suite import default_window

    assert default_window(ckpt / "model", model) == model.config.max_seq_len
    (ckpt / "model" / "train_config.json").write_text('{"seq_len": 64}')  # what `subllm train` writes
    assert default_window(ckpt / "model", model) == 64
    (ckpt / "model" / "train_config.json").unlink()
    long = text_loss(model, tok, [_text(8)], seq_len=64, stride=32, max_tokens=300)
    assert long["tokens"] == 300 and long["stride"] == 32 and long["bytes"] < len(_text(8).encode())


def test_adapter_on_tiny_local_task(ckpt, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from subllm.data.tokenizer import load_tokenizer_for
    from subllm.evals.lm import SubLLMLM
    from subllm.model.subllm import load_model

    model, tok = load_model(ckpt / "model"), load_tokenizer_for(ckpt / "model")
    lm = SubLLMLM(model, tok, batch_size=3, max_gen_toks=8)
    # loglikelihood == the naive score of context + continuation tokens
    reqs = [
        Instance("loglikelihood", {}, ("The king said to the", " queen"), 0),
        Instance("loglikelihood", {}, ("", "river stone"), 1),
    ]
    (lp, _), (lp0, _) = lm.loglikelihood(reqs)
    ctx, whole = tok.encode("The king said to the"), tok.encode("The king said to the queen")
    assert abs(lp - _naive(model, whole, len(whole) - len(ctx))[0]) < 1e-4
    cont = tok.encode("river stone")
    assert abs(lp0 - _naive(model, [lm.prefix_token_id, *cont], len(cont))[0]) < 1e-4
    (roll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("old garden letter",), 0)])
    t = tok.encode("old garden letter")
    assert abs(roll - _naive(model, [lm.prefix_token_id, *t], len(t))[0]) < 1e-4
    # generate_until == greedy subllm.generate, cut at the stop string
    from subllm.inference.generation import generate

    (gen,) = lm.generate_until([Instance("generate_until", {}, ("The house", {"until": ["zzz"]}), 0)])
    ids = torch.tensor([tok.encode("The house")])
    ref = generate(model, ids, max_new_tokens=8, eos_token_id=lm.eot_token_id)[0, ids.shape[1] :].tolist()
    ref = ref[: ref.index(lm.eot_token_id)] if lm.eot_token_id in ref else ref
    assert gen == tok.decode(ref, skip_special_tokens=True)

    # a tiny local multiple-choice + generation task through simple_evaluate, offline
    docs = [
        {"q": f"The {w} was", "choices": [" old", " young"], "answer": i % 2} for i, w in enumerate(WORDS[:5])
    ]
    with open(tmp_path / "tiny.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    base = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/tiny.jsonl\n  cache_dir: {tmp_path}/hf\ntest_split: test\n"  # noqa: E501
    (tmp_path / "mc.yaml").write_text(
        "task: tiny_mc\n" + base + "output_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    (tmp_path / "gen.yaml").write_text(
        "task: tiny_gen\n" + base + "output_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: ' old'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    res = simple_evaluate(
        model=lm,
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    mc = res["results"]["tiny_mc"]["acc,none"]
    expect = []
    for d in docs:
        s = [lm.loglikelihood([Instance("loglikelihood", {}, (d["q"], c), 0)])[0][0] for c in d["choices"]]
        expect.append(float(s.index(max(s)) == d["answer"]))
    assert mc == pytest.approx(sum(expect) / len(expect))
    assert 0.0 <= res["results"]["tiny_gen"]["exact_match,none"] <= 1.0
    assert len(res["samples"]["tiny_gen"]) == len(docs)


def test_task_builders(ckpt):
    from subllm.evals import tasks as T

    qs = T.mmlu_questions()
    assert len(qs) >= 273 and len({q["subject"] for q in qs}) >= 56
    assert all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for q in qs)
    docs = T.build_mmlu(shots=5)
    d = docs[0]
    assert d["prompt"].startswith("The following are multiple choice questions (with answers) about ")
    assert d["prompt"].count("\nAnswer:") == 6 and d["prompt"].endswith(
        "\nD. " + qs[0]["choices"][3] + "\nAnswer:"
    )
    assert qs[0]["question"] not in d["prompt"].split("\n\n", 1)[1].rsplit("\n\n", 1)[0]  # not its own shot
    gen, mc = T.build_bbh(shots=2)
    assert len(gen) == 81 and len({g["task"] for g in gen}) == 27 and all(g["shots"] == 2 for g in gen)
    assert all(g["prompt"].endswith("\nA:") and g["prompt"].count("\nA: ") == 2 for g in gen)
    assert 40 < len(mc) < 81 and all(m["choices"][m["answer"]] for m in mc)
    text = (ckpt / "text.txt").read_text()
    cloze = T.build_cloze(text, n=20)
    assert cloze and all(c["target"].isalpha() and c["target"] in WORDS for c in cloze)
    assert all((c["context"] + " " + c["target"]) in " ".join(text.split()) for c in cloze)
    ns = T.build_next_sentence(text, n=20)
    assert ns and all(len(n["choices"]) == 4 and len(set(n["choices"])) == 4 for n in ns)
    flat = " ".join(text.split())
    assert all((n["context"] + " " + n["choices"][n["answer"]]) in flat for n in ns)


def test_cli_eval_end_to_end(ckpt, tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(ckpt / "model"),
            "--tasks",
            "loss,mmlu,bbh,cloze,next_sentence",
            "--text",
            str(ckpt / "text.txt"),
            "--limit",
            "3",
            "--n-text",
            "5",
            "--seq-len",
            "128",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "mmlu" in printed and "next_sentence" in printed
    res = json.loads(printed.strip().splitlines()[-1])  # the last line is the JSON of every number
    assert res == json.loads(out.read_text())
    assert (
        res["loss"]["bpb"] > 0 and res["tasks"]["mmlu"]["n"] == 3 and res["tasks"]["mmlu"]["chance"] == 0.25
    )
    assert 0 <= res["tasks"]["bbh"]["exact_match"] <= 1 and res["tasks"]["cloze"]["docs"] == 5
    assert main(["eval", "--checkpoint", str(tmp_path), "--tasks", "mmlu"]) == 2
    assert "not a subllm checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpt / "model"), "--tasks", "mmlu,hellaswag"]) == 2
    assert "unknown task" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a clear error, not a stack trace, on a machine without CUDA
        assert main(["eval", "--checkpoint", str(ckpt / "model"), "--tasks", "loss", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_eval_quantized_loss_is_close_and_recorded(ckpt, tmp_path, capsys):
    base = ["eval", "--checkpoint", str(ckpt / "model"), "--tasks", "loss", "--text", str(ckpt / "text.txt")]
    base += ["--seq-len", "64", "--max-tokens", "256", "--dtype", "fp32"]
    losses, params = {}, {}
    for q in ("none", "int8"):
        assert main([*base, "--quantize", q]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["quantize"] == q
        losses[q], params[q] = res["loss"]["loss"], res["model"]["params"]
    assert losses["int8"] != losses["none"] and abs(losses["int8"] - losses["none"]) < 0.01 * losses["none"]
    assert params["int8"] == params["none"]  # the model's size, not what is left as parameters
