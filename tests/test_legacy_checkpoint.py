"""Checkpoint folders written by main at 1dacc49 (before the package was regrouped by wing, issue 19)
load and give the logits they gave then: one with every config field of that day (an `M` layer
included) and one whose config.json predates the selection, MoD and bypass fields. Both folders
carry that day's modeling_subllm.py, which AutoModelForCausalLM(trust_remote_code=True) imports."""

from pathlib import Path

import pytest
import torch

from subllm import SubLLM

LEGACY = Path(__file__).parent / "fixtures" / "legacy_1dacc49"


@pytest.mark.parametrize("folder", ["current", "before_fields"])
def test_legacy_folders_give_the_same_logits(folder):
    saved = torch.load(LEGACY / "logits.pt")
    model = SubLLM.from_pretrained(LEGACY / folder).eval()
    with torch.no_grad():
        assert torch.equal(model(saved["ids"]).logits, saved[folder])


def test_legacy_folder_through_automodel_remote_code():
    from transformers import AutoModelForCausalLM

    saved = torch.load(LEGACY / "logits.pt")
    model = AutoModelForCausalLM.from_pretrained(LEGACY / "current", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=saved["ids"]).logits, saved["current"])
