"""The demo's pieces that run after training (the full demo fetches data and trains for minutes:
it is run by hand, `make demo`): the selection check on texts and the table."""

import pytest
from helpers import WORDS, checkpoint_with_tokenizer

from subllm.cli import demo


@pytest.fixture
def run_dir(tmp_path):
    checkpoint_with_tokenizer(tmp_path / "subllm")
    text = tmp_path / "val.txt"
    text.write_text(" ".join(WORDS * 40))
    return tmp_path


def test_selection_check_and_table(run_dir):
    check = demo._selection_check(run_dir / "subllm", {"val text": [run_dir / "val.txt"], "none": []}, 16)
    assert list(check) == ["val text"]  # a set without files is skipped
    res = check["val text"]
    assert res["files"] == ["val.txt"] and len(res["keep_eval"]) == 2 and len(res["agreement"]) == 2
    stats = {
        "params": 1e6, "tokens": 100, "tok_per_s": 2.0, "step_s": 1.0, "peak_rss_mb": 10.0,
        "final": {"val_loss": 5.0, "val_bpb": 2.0, "val_loss_train_mode": 4.9,
                  "keep_fractions_eval": [0.6, 0.7], "agreement": [0.97, 0.98]},
    }  # fmt: skip
    llama = {**stats, "tok_per_s": 1.0, "final": {"val_loss": 5.1, "val_bpb": 2.1}}
    table = demo._table(stats, llama, 1.3, [0.64, 0.64], 1, check, "aligned")
    assert "| selection rule" in table and "aligned" in table
    assert "agreement, val text" in table and "keep, eval rule, val text" in table
    assert "2.000x" in table  # tokens/s ratio
