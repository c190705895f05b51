"""The Hugging Face wing: transformers integration and the formats going in and out.

    auto.py          SubLLMConfig / SubLLMForCausalLM and their AutoConfig / AutoModel registration
    step_counter.py  the optimizer-step count that feeds the schedules under transformers.Trainer
    llama.py         HF Llama <-> SubLLM conversion
    gguf.py          GGUF in: a llama GGUF (llama.cpp) -> SubLLM checkpoint or HF Llama folder
    official.py      the authors' released checkpoint format (docs/method.md section 11)

`import subllm.hf` registers model_type "subllm" (saved modeling_subllm.py files import from here).
"""

from subllm.hf.auto import MODEL_TYPE, SubLLMCache, SubLLMConfig, SubLLMForCausalLM, register

__all__ = ["SubLLMConfig", "SubLLMForCausalLM", "SubLLMCache", "register", "MODEL_TYPE"]
