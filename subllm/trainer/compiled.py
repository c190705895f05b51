"""torch.compile for training: one static-shape graph per model, compiled once.

A training forward of an unpadded batch has shapes fixed by (B, T) alone (every S keeps
K = ceil(r T) tokens per row), and everything that changes from step to step is a tensor: the step
itself (`SubLLM.step_tensor`), the Balancer and bypass schedules computed from it
(`ScheduledFloat.at`), the Balancer's and the flip's coins (drawn on the device). The Balancer's
gradient is written out (`scaling.limit_violation_grad`), so its backward traces too. Hence one
graph without breaks (`fullgraph=True`) and no recompilation from step to step - tests count both.

Not compiled: evaluation and generation (eval-mode selection keeps a data-dependent number of
tokens), padded batches (their ragged keep count needs one host sync per S), the Balancer's
"weight" gate (its push size travels through a Python object between two backward functions).
"""

from __future__ import annotations

import os
import shutil

import torch

from subllm.errors import SubLLMError

BACKEND = "inductor"  # what --compile uses (tests swap in "aot_eager": same graphs, no C++ build)


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_compilable(config, device: str | torch.device, backend: str = "inductor") -> None:
    """Raise a SubLLMError saying why `config` cannot be compiled for training on `device`."""
    if getattr(config, "n_subsamples", 0) and config.balancer_gate == "weight":
        raise SubLLMError(
            "--compile does not support balancer_gate='weight' (its push size passes between two "
            "backward functions through a Python object); use the default 'grad' gate or drop --compile"
        )
    if backend == "inductor" and torch.device(device).type == "cpu" and cpu_compiler() is None:
        raise SubLLMError(
            "--compile on the CPU needs a C++ compiler for inductor (g++, c++ or clang++ on PATH, or "
            "$CXX); install one (e.g. apt install g++) or drop --compile"
        )


def compile_for_training(module: torch.nn.Module, config, device, backend: str | None = None):
    """`module` (a SubLLM, or its DDP wrapper) compiled whole: fullgraph (a graph break is an error,
    not a silent slowdown), static shapes (the trainer's batches never change shape)."""
    backend = backend or BACKEND
    check_compilable(config, device, backend)
    return torch.compile(module, backend=backend, fullgraph=True, dynamic=False)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (compilations, recompilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
