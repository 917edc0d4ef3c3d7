"""Resumable training state: trainable weights, optimizer, schedule, RNG streams and the exact
position in the data, written atomically so that a crash at any moment leaves the previous
checkpoint whole.

```
<run>/checkpoints/step-000120/
  trainable.safetensors   the parameters that train (all of them for full fine-tuning)
  best.safetensors        the best weights so far (when an evaluation has picked one)
  optimizer.pt            optimizer, schedule and loss-scaler state
  rng.pt                  torch, numpy and Python RNG states, and the data-order RNG
  state.json              step, epoch, position inside the epoch, best score, counters
```

Under FSDP (`train.distributed=fsdp`) the weights, optimizer state and best weights are
written instead by torch.distributed.checkpoint, each process its own shards
(`__<rank>_0.distcp`, mapped by `.metadata`; `optimizer.pt` then holds only the schedule and
scaler), and read back by any number of processes, or by one plain process.

A checkpoint is written to a temporary sibling folder (`.tmp-step-...`) and renamed into place;
only then are older ones beyond `train.keep_checkpoints` renamed aside (`.old-step-...`) and
removed, so no folder named `step-*` is ever half written or half deleted. `discard` removes a
folder the same way. `crash_point` is a test hook (tests/test_crash.py) that kills the process
at a named point, to prove that a SIGKILL anywhere leaves a run resumable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.dist import Dist, barrier, load_sharded, load_shards, save_shards

PREFIX = "step-"
CRASH_AT = "TUNELAB_TEST_CRASH_AT"  # test hook: `<point>[:<n>][@<rank>]`, see crash_point
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook, off unless the environment variable TUNELAB_TEST_CRASH_AT names this point:
    then the process kills itself with SIGKILL (no handler, no cleanup: a crash) the n-th time
    it gets here. tests/test_crash.py uses it to hit the moments between two writes exactly.

    `<point>:<n>@<rank>` fires only in the torchrun process of that RANK, and under torchrun only
    before any restart (TORCHELASTIC_RESTART_COUNT 0): tests/test_multinode.py kills one worker
    mid-training ("train-step", after each optimizer step) and lets the restarted group finish."""
    wanted = os.environ.get(CRASH_AT)
    if not wanted or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    wanted, _, rank = wanted.partition("@")
    if rank and os.environ.get("RANK", "0") != rank:
        return
    point, _, nth = wanted.partition(":")
    if point == name:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def discard(path: Path) -> None:
    """Remove a folder so that a crash midway never leaves it half deleted under its own name:
    renamed aside to a hidden sibling first (one atomic step), then deleted."""
    aside = path.parent / f".old-{path.name}"
    shutil.rmtree(aside, ignore_errors=True)  # left by an earlier crash
    if path.exists():
        path.rename(aside)
        crash_point("discard")
        shutil.rmtree(aside, ignore_errors=True)


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoint_dirs(folder)
    return found[-1] if found else None


def save_checkpoint(
    folder: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    schedule: Any,
    scaler: Any,
    state: dict[str, Any],
    data_rng: random.Random,
    best_state: dict[str, torch.Tensor] | None,
    keep: int,
) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its folder. `trainable` and
    `optimizer_state` are whole (one process, or DDP's replica on rank 0)."""
    from safetensors.torch import save_file

    final, tmp = _begin(folder, state)
    save_file(
        {n: t.detach().contiguous().cpu() for n, t in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    crash_point("checkpoint-write")  # half the files written
    if best_state is not None:
        save_file({n: t.contiguous().cpu() for n, t in best_state.items()}, str(tmp / "best.safetensors"))
    _finish(folder, final, tmp, optimizer_state, schedule, scaler, state, data_rng, keep)
    return final


def save_sharded_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any,
    state: dict[str, Any],
    data_rng: random.Random,
    best_state: dict[str, torch.Tensor] | None,
    keep: int,
    dist: Dist,
) -> Path | None:
    """The checkpoint of an FSDP run (`train.distributed=fsdp`, any number of processes):
    weights, optimizer state and best weights written by torch.distributed.checkpoint, each
    process its own shards, into the same temporary folder; once every process is done, rank 0
    adds the small files (schedule, RNG, state.json) and renames it, as `save_checkpoint` does.
    Call on every process; returns the folder on rank 0."""
    final, tmp = _begin(folder, state) if dist.is_main else (None, folder / f".tmp-{_name(state)}")
    barrier(dist)  # the folder exists, and no leftover is being removed under anyone's writes
    save_shards(tmp, model, optimizer, best_state)
    crash_point("checkpoint-write")  # shards written, small files not
    barrier(dist)  # every process's shards are on disk
    if final is None:
        return None
    _finish(folder, final, tmp, None, schedule, scaler, state, data_rng, keep)
    return final


def _name(state: dict[str, Any]) -> str:
    return f"{PREFIX}{state['result']['steps']:06d}"


def _begin(folder: Path, state: dict[str, Any]) -> tuple[Path, Path]:
    """The checkpoint's final folder and a fresh temporary one to write into."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / _name(state)
    tmp = folder / f".tmp-{final.name}"
    for leftover in folder.glob(".tmp-*"):  # a write cut short by a crash
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    return final, tmp


def _finish(folder: Path, final: Path, tmp: Path, optimizer_state: dict[str, Any] | None, schedule: Any,
            scaler: Any, state: dict[str, Any], data_rng: random.Random, keep: int) -> None:  # fmt: skip
    """The small files, state.json last (it marks the folder complete), then the rename and the
    pruning of old checkpoints."""
    torch.save({"optimizer": optimizer_state, "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict()}, tmp / "optimizer.pt")  # fmt: skip
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "data": data_rng.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")  # fmt: skip
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")  # last: it marks the folder complete
    crash_point("checkpoint-rename")
    discard(final)  # the same step saved again (a stop signal right after a periodic save)
    tmp.rename(final)
    crash_point("checkpoint-prune")
    for old in checkpoint_dirs(folder)[:-keep] if keep > 0 else []:
        discard(old)


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint was written by torch.distributed.checkpoint (an FSDP run)."""
    return (path / ".metadata").is_file()


def sharded_best(path: Path) -> bool:
    """Whether a sharded checkpoint holds best weights (its metadata names them)."""
    from torch.distributed.checkpoint import FileSystemReader

    return any(key.startswith("best.") for key in FileSystemReader(path).read_metadata().state_dict_metadata)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any,
    data_rng: random.Random,
    sharded: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore everything `save_checkpoint` or `save_sharded_checkpoint` wrote; returns (state,
    best weights or None). A sharded checkpoint is read into this process's shards whatever
    number of processes wrote it (collective); with `sharded` (FSDP), whole tensors from a
    checkpoint written before FSDP checkpoints were sharded are split back into the shards."""
    from safetensors.torch import load_file

    saved = torch.load(path / "optimizer.pt", weights_only=False)
    if is_sharded(path):
        best = load_shards(path, model, optimizer, best=sharded_best(path))
    else:
        trainable = load_file(str(path / "trainable.safetensors"))
        best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
        if sharded:
            best = load_sharded(model, optimizer, trainable, saved["optimizer"], best)
        else:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in trainable.items():
                    params[name].copy_(value)
            optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    scaler.load_state_dict(saved["scaler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    data_rng.setstate(rng["data"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text()), best
