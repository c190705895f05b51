import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `--dtype auto` follows the rule in tests (a measured choice would depend on the machine's load);
# tests/test_dtype_calibration.py turns the measurement on with a temporary cache file
os.environ["SUBLLM_DTYPE_CALIBRATION"] = "off"
# tiny models: one intra-op thread is faster, and immune to a busy second core
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one intra-op thread (a CLI call with --threads may have changed it)
    and leaves the count as it found it: tiny tensors only get barrier waits from more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
