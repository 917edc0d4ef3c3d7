"""Distributed training through PyTorch's own engine: `torchrun` starts the processes, this
module joins them (gloo on CPU, NCCL on GPU) and offers the few collectives the loop needs.

Nothing here manages processes: `tunelab train --nproc N` only re-executes the same command
under `torchrun --standalone --nproc_per_node N` (and `--max-restarts K` is torchrun's own
elastic restart of the group).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast, overload

import torch
import torch.distributed as torch_dist

from tunelab.models import block_stacks

T = TypeVar("T")


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
        # on GPUs: NCCL for CUDA tensors, gloo for the CPU tensors of the loop's small collectives
        torch_dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
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


def broadcast_object(value: T, dist: Dist) -> T:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not dist.active:
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


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


def reshard(model: torch.nn.Module) -> None:
    """Back to shards after evaluation: FSDP2 leaves the root module's parameters whole after a
    forward pass, expecting a backward pass to follow. No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


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


def _shard_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, best: bool) -> dict:
    """What a sharded checkpoint holds, as this process sees it: the trainable weights and the
    optimizer state (DTensor shards under FSDP, whole tensors in a plain process, keyed by
    parameter name either way), and, with `best`, tensors shaped like the trainable weights."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict = {"model": {n: model_state[n] for n in names}, "optimizer": optim_state}
    if best:
        params = dict(model.named_parameters())
        state["best"] = {n: params[n].detach().clone() for n in names}
    return state


def save_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                best: dict[str, torch.Tensor] | None) -> None:  # fmt: skip
    """Write the trainable weights, optimizer state and best weights with
    torch.distributed.checkpoint: under a process group every process writes only its own
    shards (`__<rank>_0.distcp`; nothing is gathered) and rank 0 the `.metadata` that maps
    them; one plain process writes whole tensors in the same format. Collective."""
    import torch.distributed.checkpoint as dcp

    state = _shard_state(model, optimizer, best=False)
    if best is not None:
        state["best"] = best
    dcp.save(state, checkpoint_id=path, no_dist=not torch_dist.is_initialized())


def load_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                best: bool) -> dict[str, torch.Tensor] | None:  # fmt: skip
    """Read what `save_shards` wrote, whatever number of processes wrote it: each process reads
    the parts of the saved tensors that fall in its own shards (resharding). Returns the best
    weights (shards under FSDP), when `best`. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _shard_state(model, optimizer, best)
    dcp.load(state, checkpoint_id=path, no_dist=not torch_dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # fmt: skip
    return state.get("best")


def launch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Re-run `tunelab <argv>` under torchrun with `nproc` processes on this machine; with
    `max_restarts`, torchrun restarts the whole group up to that many times when a process dies
    (the restarted processes resume from the latest checkpoint by themselves)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "-m", "tunelab", *argv]  # fmt: skip
    return subprocess.call(command, env={**os.environ, **RESTARTABLE} if max_restarts else None)


# torchrun's agent keeps one store for all the rounds of a job, and the processes of a restarted
# group then read the dead processes' addresses from it (gloo: "connectFullMesh failed ...
# Connection refused"); with sharing off, each round's rank 0 hosts a store of its own
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def restart_caveat() -> str | None:
    """What to set when torchrun may restart this job's processes with a store that makes the
    restarted group fail to connect (see RESTARTABLE); None when all is well."""
    if (
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        return (
            "torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node, "
            "or a restarted group may fail to connect (it reads the dead processes' addresses)"
        )
    return None


def torchrun_job() -> str | None:
    """The id of the torchrun job this process belongs to (its rendezvous id, TORCHELASTIC_RUN_ID:
    a fresh one per `--standalone` launch, `--rdzv-id` otherwise); None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restart_count() -> int:
    """How many times torchrun has restarted this job's processes after one died (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
