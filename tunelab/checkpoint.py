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

from tunelab.dist import load_sharded

PREFIX = "step-"
CRASH_AT = "TUNELAB_TEST_CRASH_AT"  # test hook: `<point>` or `<point>:<n>` (the n-th time it is reached)
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook, off unless the environment variable TUNELAB_TEST_CRASH_AT names this point:
    then the process kills itself with SIGKILL (no handler, no cleanup: a crash) the n-th time
    it gets here. tests/test_crash.py uses it to hit the moments between two writes exactly."""
    wanted = os.environ.get(CRASH_AT)
    if not wanted:
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
    `optimizer_state` are whole (gathered from all processes under FSDP)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{state['result']['steps']:06d}"
    tmp = folder / f".tmp-{final.name}"
    for leftover in folder.glob(".tmp-*"):  # a write cut short by a crash
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {n: t.detach().contiguous().cpu() for n, t in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    crash_point("checkpoint-write")  # half the files written
    if best_state is not None:
        save_file({n: t.contiguous().cpu() for n, t in best_state.items()}, str(tmp / "best.safetensors"))
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
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any,
    data_rng: random.Random,
    sharded: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore everything `save_checkpoint` wrote; returns (state, best weights or None).
    With `sharded` (FSDP), whole tensors are split back into this process's shards."""
    from safetensors.torch import load_file

    trainable = load_file(str(path / "trainable.safetensors"))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    saved = torch.load(path / "optimizer.pt", weights_only=False)
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
