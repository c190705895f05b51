"""Sequence parallelism for training (issue 23): each row split into N contiguous shards over N
ranks, Ulysses all-to-all or ring attention, SUBLLM's selection global and identical to one
process's. comm.py: the group and collectives; layout.py: which rank holds which token at each
level; ring.py: ring attention; forward.py: the sharded training forward."""

from subllm.seqpar.comm import SeqGroup, sequence_groups, sync_grads
from subllm.seqpar.forward import check_supported, sp_forward

__all__ = ["SeqGroup", "check_supported", "sequence_groups", "sp_forward", "sync_grads"]
