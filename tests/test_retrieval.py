"""Long-range retrieval tasks (issue 11 item 4): examples are built as stated, teacher-forced
scoring equals greedy retrieval, and the needle-keep share equals a recount from the selections."""

import random
from types import SimpleNamespace

import pytest
import torch
from helpers import WORDS, checkpoint_with_tokenizer, tiny_preset_model

from subllm import SubLLMError
from subllm.evals.retrieval import Example, mqar, passkey, reached, run_retrieval, score


def byte_tok(text, add_special_tokens=False):
    return {"input_ids": list(text.encode("utf-8"))}


FILLER = ("the cat sat on the mat and the dog ran far away from the river bank " * 80).strip()


def test_passkey_examples():
    filler = byte_tok(FILLER)["input_ids"]
    spots = []
    for depth in (0.0, 0.5, 1.0):
        ex = passkey(byte_tok, filler, 400, depth, random.Random(1))
        assert len(ex.ids) == 400
        (s, n), needle = ex.answers[0], [ex.ids[i] for i in ex.needles]
        assert ex.ids[s : s + n] == needle and bytes(needle).decode().strip().isdigit() and s + n == 400
        spots.append(ex.needles[0])
    assert spots[0] < spots[1] < spots[2]  # the needle moves with the depth
    with pytest.raises(SubLLMError, match="too short"):
        passkey(byte_tok, filler, 50, 0.5, random.Random(1))


def test_mqar_examples():
    filler = byte_tok(FILLER)["input_ids"]
    ex = mqar(byte_tok, filler, 800, 4, random.Random(2), ["cat", "dog", "mat", "river", "bank"])
    assert len(ex.ids) == 800 and len(ex.answers) == 4
    text = bytes(ex.ids).decode()
    for s, n in ex.answers:  # every asked value was stated earlier, as a needle, for the same key
        value = bytes(ex.ids[s : s + n]).decode()
        key = bytes(ex.ids[:s]).decode().rsplit("The code of ", 1)[1].split(" is")[0]
        assert text.index(f"The code of {key} is{value}.") < s
    assert len(ex.needles) == sum(n for _, n in ex.answers)


class _Oracle(torch.nn.Module):
    """Predicts the true next token everywhere (or a wrong one): retrieval must read 1 (or 0)."""

    def __init__(self, ids, wrong=False):
        super().__init__()
        self.ids, self.wrong = ids, wrong
        self.config = SimpleNamespace(n_subsamples=0)

    def forward(self, x, return_selections=False):
        nxt = torch.cat([x[0, 1:], x[0, :1]]) + (1 if self.wrong else 0)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, 300).float()[None], selections=None)


def test_teacher_forced_scoring_equals_retrieval():
    ex = Example(ids=[5, 6, 7, 8, 9, 10], answers=[(3, 2), (5, 1)], needles=[1, 2])
    assert score(_Oracle(ex.ids), ex)[0] == [True, True]
    assert score(_Oracle(ex.ids), ex)[2] == [2, 1]  # answer tokens right
    assert score(_Oracle(ex.ids, wrong=True), ex)[0] == [False, False]
    assert score(_Oracle(ex.ids, wrong=True), ex)[2] == [0, 0]


def test_needle_keep_is_the_selection_recount():
    model = tiny_preset_model().eval()
    ids = torch.randint(3, 256, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, return_selections=True)
    r = reached(model, out.selections, 90)
    s0 = model.subsamples[0]
    assert torch.equal(r[0], s0.keep(out.selections[0].scores))  # S0: its own eval rule
    assert int(r[1].sum()) == int(out.selections[1].n_kept.sum()) and not (r[1] & ~r[0]).any()
    ex = Example(ids=ids[0].tolist(), answers=[(80, 2)], needles=list(range(40, 50)))
    _, keep, _ = score(model, ex)
    assert keep == [float(r[i][0, 40:50].float().mean()) for i in range(2)]


def test_eval_cli_passkey_mqar(tmp_path, capsys):
    from subllm.cli import main

    ck = tmp_path / "ck"
    checkpoint_with_tokenizer(ck)
    text = tmp_path / "filler.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    base = ["eval", "--checkpoint", str(ck), "--heldout", str(text), "--examples", "2", "--dtype", "fp32"]
    assert (
        main([*base, "--tasks", "passkey,mqar", "--lengths", "64,128", "--depths", "0,1", "--pairs", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert "acc 128 @1.00" in out and "needle kept S1" in out
    assert main([*base, "--tasks", "passkey", "--lengths", "100000"]) == 2
    assert "exceed the model's max_seq_len" in capsys.readouterr().err
    assert main([*base, "--tasks", "passkey", "--lengths", "64", "--depths", "1.5"]) == 2


def test_run_retrieval_rejects_unknown_tasks():
    with pytest.raises(SubLLMError, match="unknown retrieval task"):
        run_retrieval(tiny_preset_model(), byte_tok, FILLER, ["needle"], [64], [0.5])


def test_parse_rope_override():
    from subllm.model.rope import parse_rope_override

    assert parse_rope_override("yarn:4", 256) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256
    }  # fmt: skip
    assert parse_rope_override("linear:2", 256) == {"rope_type": "linear", "factor": 2.0}
    assert parse_rope_override("llama3:8", 64)["high_freq_factor"] == 4.0
    assert parse_rope_override("default", 256) == {"rope_type": "default"}
    j = parse_rope_override('{"type": "dynamic", "factor": 2, "original_max_position_embeddings": 99}', 256)
    assert j == {"rope_type": "dynamic", "factor": 2, "original_max_position_embeddings": 99}
    for bad, msg in (("yarn", "TYPE:FACTOR"), ("ntk:2", "TYPE:FACTOR"), ("yarn:x", "must be a number"),
                     ("{oops", "must be a JSON object"), ("default:2", "TYPE:FACTOR")):  # fmt: skip
        with pytest.raises(SubLLMError, match=msg):
            parse_rope_override(bad, 256)


def test_eval_rope_override_equals_a_checkpoint_saved_with_it(tmp_path, capsys):
    """`subllm eval --rope-scaling yarn:2` on a plain-RoPE checkpoint gives exactly what the same
    weights saved with that rope_scaling give (the obviously-correct path); the original length is
    the training window of train_config.json."""
    import json

    from subllm.cli import main
    from subllm.model.subllm import SubLLM

    ck = tmp_path / "ck"
    checkpoint_with_tokenizer(ck)
    (ck / "train_config.json").write_text(json.dumps({"seq_len": 32}))
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    saved = tmp_path / "saved"
    model = SubLLM.from_pretrained(ck)
    model.config = model.config.replace(rope_scaling=yarn)
    model.save_pretrained(saved)
    for f in ck.glob("tokenizer*"):
        (saved / f.name).write_bytes(f.read_bytes())
    text = tmp_path / "filler.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    common = ["eval", "--heldout", str(text), "--examples", "2", "--dtype", "fp32", "--tasks", "passkey,mqar",
              "--lengths", "64,128", "--pairs", "3"]  # fmt: skip
    results = []
    for args in (["--checkpoint", str(ck), "--rope-scaling", "yarn:2"], ["--checkpoint", str(saved)],
                 ["--checkpoint", str(ck)]):  # fmt: skip
        assert main([*common, *args, "--out", str(tmp_path / "r.json")]) == 0
        capsys.readouterr()
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert (
        results[0]["rope_scaling"] == yarn == results[1]["rope_scaling"]
        and results[2]["rope_scaling"] is None
    )
    assert results[0]["retrieval"]["results"] == results[1]["retrieval"]["results"]
    with torch.no_grad():  # and the logits themselves move (the override is not a no-op)
        ids = torch.randint(3, 14, (1, 100), generator=torch.Generator().manual_seed(1))
        a, b = SubLLM.from_pretrained(ck).eval(), SubLLM.from_pretrained(saved).eval()
        assert not torch.equal(a(ids).logits, b(ids).logits)
    assert main([*common, "--checkpoint", str(ck), "--rope-scaling", "ntk:2"]) == 2
    assert "TYPE:FACTOR" in capsys.readouterr().err
