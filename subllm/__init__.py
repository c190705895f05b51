"""subllm: SUBLLM (Subsampling-Upsampling-Bypass LLM, arXiv 2406.06571) on PyTorch.

Public names are imported lazily, so `import subllm` (and `subllm --help`) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "subllm.config",
    "PRESETS": "subllm.config",
    "parse_structure": "subllm.config",
    "SubLLM": "subllm.model.subllm",
    "SubLLMOutput": "subllm.model.subllm",
    "SubLLMError": "subllm.errors",
    "generate": "subllm.inference.generation",
    "stream_generate": "subllm.inference.generation",
    "SubLLMForCausalLM": "subllm.hf",  # importing subllm.hf registers the Auto classes
    "SubLLMConfig": "subllm.hf",
    "KVCache": "subllm.inference.cache",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'subllm' has no attribute {name!r}")
