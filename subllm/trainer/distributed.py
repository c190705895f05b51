"""Scale-out, applied from outside the model: process groups, DDP, FSDP2 and the few collectives
the trainer needs (docs/design.md: "the model knows nothing of parallelism", after torchtitan).

Launch with `torchrun --nproc_per_node N -m subllm train ...`: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; `init_distributed()` reads them. Without torchrun
everything here degrades to a single process and no collective is ever called.
Backend: nccl on CUDA, gloo on CPU (2 ranks x 1 thread is the sensible setting on 2 cores).

Every rank uses the SAME seed, so the model's random draws (Balancer probability, the flip of the
discarded block, the bypass limiter) are the same on every rank and as in one process running the
whole global batch; the data is split across ranks by the sampler (rank, world_size).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from subllm.errors import SubLLMError

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None = not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise SubLLMError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1), else run alone.

    `device`: "cpu", "cuda" or None (= cuda if available). Under torchrun each rank takes
    cuda:LOCAL_RANK. Idempotent: an existing process group is reused.
    """
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise SubLLMError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SubLLMError("device 'cuda' was requested but CUDA is not available")
    dev = f"cuda:{local}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
    if world <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev, backend=backend
    )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap_model(model: nn.Module, info: DistInfo, mode: str) -> nn.Module:
    """The module to call for training forwards: `model` itself, a DDP wrapper, or (FSDP2) `model`
    sharded in place (every transformer Block its own unit, the rest in the root unit).

    DDP runs without find_unused_parameters: SUBLLM's selection is data-dependent, but every
    parameter (score layers through the subtraction-trick weights, bypass scales) gets a gradient.
    """
    if mode not in PARALLEL_MODES:
        raise SubLLMError(f"unknown parallel mode {mode!r}; choose one of {', '.join(PARALLEL_MODES)}")
    if mode == "none" or not info.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if info.device.startswith("cuda") else None
        return DDP(model, device_ids=ids, find_unused_parameters=False)
    from torch.distributed.fsdp import fully_shard

    if getattr(model.config, "tie_embeddings", False):
        raise SubLLMError("--fsdp does not support tie_embeddings=True models (use DDP)")
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The SubLLM inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def no_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch of gradient accumulation: skip the gradient all-reduce unless
    `sync` (the last micro-batch). DDP: `no_sync()`; FSDP2: `set_requires_gradient_sync`."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a short list of floats over ranks (float64, one collective)."""
    if not info.distributed or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    return [v / info.world_size for v in all_reduce_sum(values, info)]


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list when not distributed)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def full_model_state(model: nn.Module, info: DistInfo, mode: str) -> dict | None:
    """The full (unsharded) model state dict on CPU, on rank 0 (None elsewhere under FSDP).
    A collective under FSDP: every rank must call it."""
    if mode == "fsdp" and info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=opts)
        return state if info.is_main else None
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer, info: DistInfo, mode: str) -> dict | None:
    """The optimizer state dict keyed by parameter name (the same layout whether the run was
    single-process, DDP or FSDP, so a checkpoint resumes under any of them), on rank 0.
    A collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=opts)
    return state if info.is_main else None


def load_optimizer_state(model: nn.Module, optimizer, state: dict, info: DistInfo, mode: str) -> None:
    """Load a state dict saved by `full_optimizer_state` on every rank (FSDP keeps its shard).
    The model weights are loaded into the unwrapped model before `wrap_model`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
