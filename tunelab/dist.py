"""Distributed training through PyTorch's own engine: `torchrun` starts the processes, this
module joins them (gloo on CPU, NCCL on GPU) and offers the few collectives the loop needs.

Nothing here manages processes: `tunelab train --nproc N` only re-executes the same command
under `torchrun --standalone --nproc_per_node N`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import cast, overload

import torch
import torch.distributed as torch_dist

from tunelab.models import block_stacks


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group("nccl" if cuda else "gloo")
        if not cuda and "OMP_NUM_THREADS" not in os.environ:
            # processes on one CPU share its cores
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank, world, local_rank)


def device_for(dist: Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    if not dist.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool, dist: Dist) -> bool:
    """Rank 0's decision, on every rank."""
    if not dist.active:
        return flag
    tensor = torch.tensor([int(flag)])
    torch_dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(dist: Dist) -> None:
    if dist.active:
        torch_dist.barrier()


def shutdown(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------- FSDP


def shard_model(model: torch.nn.Module) -> None:
    """FSDP (FSDP2 `fully_shard`): every transformer block, then the rest, sharded over the
    processes; parameters become DTensors holding this process's shard."""
    from torch.distributed.fsdp import fully_shard

    for _, blocks in block_stacks(model):
        for block in blocks:
            fully_shard(block)
    fully_shard(model)


@overload
def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]: ...
@overload
def full_state(model: torch.nn.Module, optimizer: None = None) -> tuple[dict, None]: ...
def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict, dict | None]:
    """Whole model (and optimizer) state gathered from the shards; call on every process."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = (
        get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    )
    return model_state, optim_state


def gather_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DTensor shards -> whole tensors (collective: every process calls it, same order)."""
    return {
        n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu() for n, t in tensors.items()
    }


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: dict, optim_state: dict,
                 best: dict | None) -> dict | None:  # fmt: skip
    """Put whole checkpoint tensors back into the shards; returns the best weights as shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor, distribute_tensor

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, trainable, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    if best is None:
        return None
    params = {n: cast(DTensor, p) for n, p in model.named_parameters()}  # FSDP holds them as DTensors
    return {n: distribute_tensor(t, params[n].device_mesh, params[n].placements) for n, t in best.items()}


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run `tunelab <argv>` under torchrun with `nproc` processes on this machine."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tunelab", *argv]  # fmt: skip
    return subprocess.call(command)
