"""FSDP for sparse fine-tuning: torch's FSDP2 (``fully_shard``, one unit per decoder block) and the few
conversions the sparsity strategies need between a sharded parameter and the whole tensor.

Under FSDP2 every parameter is a DTensor sharded along dim 0 (rows, or experts of a fused tensor), its
name unchanged. The strategies keep their masks, duals and dense copies as local shards, but a mask is
always chosen on the whole tensor (:func:`whole`), so an N:M group, an RxC tile or a per-matrix
threshold never depends on where a shard boundary falls, and N processes pick the masks one does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from ..models import find_blocks

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of ``t`` (``t`` itself when it is not sharded); in-place edits reach ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``piece`` is this process's shard, sharded as ``like`` (a collective)."""
    if not isinstance(like, DTensor):
        return piece
    return DTensor.from_local(piece, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def piece_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a whole tensor that every process holds, sharded as ``like`` (on its device)."""
    full = full.to(local(like).device)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def shard(model: nn.Module, device: torch.device, processes: int) -> nn.Module:
    """A copy of ``model`` sharded by FSDP2 over ``processes`` (one unit per decoder block, the rest in the
    root unit, so tied embeddings stay in one group). The caller's model stays whole: the weights are
    copied back by :func:`copy_back` at the end."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    student = copy.deepcopy(model)
    mesh = init_device_mesh(device.type, (processes,))
    for block in find_blocks(student)[1]:
        fully_shard(block, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student


def copy_back(student: nn.Module, model: nn.Module) -> None:
    """Write the sharded ``student``'s trained weights into the whole ``model`` (on every process)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in student.named_parameters():
            params[name].copy_(whole(local(p).detach(), p))


def training_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimiser state as whole tensors (on rank 0), sharded or not; every process must call it."""
    return {"model": get_model_state_dict(model, options=FULL),
            "opt": get_optimizer_state_dict(model, opt, options=FULL)}


def load_training_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`training_state`: every process loads the whole tensors, keeping its own shard."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, opt, state["opt"], options=options)


def summed(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (per-shard sums, on CPU) summed over the processes that shard ``like``."""
    if isinstance(like, DTensor):
        group = like.device_mesh.get_group()
        dev = local(like).device
        out = values.to(dev)
        torch.distributed.all_reduce(out, group=group)
        return out.cpu()
    return values
