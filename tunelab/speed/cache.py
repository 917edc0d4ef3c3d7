"""`FrozenCache`, for `freeze`: the frozen lower part of the model (the embeddings and the
frozen blocks) runs once over the training rows, in eval mode, and its output per row is
kept; training steps then start at the first trained block. No peer does this: each epoch
re-runs the frozen layers (forward only, with dropout) for every batch.

Not the same computation as the model's own: the frozen layers act as a fixed feature
extractor, without dropout (`train.cache_frozen_layers` turns it off). With dropout 0 in the
frozen layers it trains the same model.

While a batch uses the cache (`cache.batch(...)`), a `CachedEntry` standing in for the
embeddings returns the batch's cached rows and each `CachedBlock` standing in for a frozen
block passes its input through; `close` puts the originals back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tunelab.models import block_stacks
from tunelab.speed.report import SpeedReport, report_for
from tunelab.speed.swap import Wrapper, base_of, name_of, put_back, replace

CACHE_BUDGET_MB = 2048  # the most memory freeze's cache may take; above it, no cache


def cache_mb(tokens: int, width: int) -> float:
    """Memory of a cache of `tokens` rows of `width` float32 values."""
    return tokens * width * 4 / 2**20


def row_starts(lengths: list[int]) -> list[int]:
    """Where each row begins when rows of these lengths are stacked end to end."""
    return list(itertools.accumulate(lengths[:-1], initial=0))


def cache_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The batches of the cache's inference pass: rows sorted by length, `batch_size` at a time."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class CachedEntry(Wrapper):
    """Stands in for the embeddings: the current batch's cached rows, else the original."""

    def __init__(self, entry: nn.Module, cache: FrozenCache) -> None:
        super().__init__(entry)
        self.cache = cache

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        current = self.cache.current
        return self.original(*args, **kwargs) if current is None else current


class CachedBlock(Wrapper):
    """Stands in for a frozen block: passes its input through while a batch uses the cache."""

    def __init__(self, block: nn.Module, cache: FrozenCache) -> None:
        super().__init__(block)
        self.cache = cache

    @property
    def skipping(self) -> bool:
        return self.cache.current is not None

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if self.cache.current is None:
            return self.original(hidden_states, *args, **kwargs)
        return hidden_states


class _StopForward(Exception):
    pass


class FrozenCache:
    """The outputs of the frozen lower layers per training row (see the module docstring).
    Built with `FrozenCache.build`, which returns None where it does not apply."""

    def __init__(self, model: nn.Module, entry: str, frozen: list[str], table: torch.Tensor,
                 lengths: list[int]) -> None:  # fmt: skip
        # every row's outputs in one table (row i from starts[i]) with a zero row at the end
        # for padding, so that a batch is gathered with one index_select
        self.model, self.table, self.lengths = model, table, lengths
        self.starts = row_starts(lengths)
        self.current: torch.Tensor | None = None
        self.stand_ins: list[tuple[str, Wrapper]] = [(entry, CachedEntry(model.get_submodule(entry), self))]
        self.stand_ins += [(name, CachedBlock(model.get_submodule(name), self)) for name in frozen]
        for name, stand_in in self.stand_ins:
            replace(model, name, stand_in)

    def batch(self, indices: list[int], length: int) -> FrozenCache:
        """Use the cached rows `indices`, right-padded with zeros to `length`, for the next
        forward pass (a context manager)."""
        pad = self.table.shape[0] - 1
        positions = [
            p
            for i in indices
            for p in (
                *range(self.starts[i], self.starts[i] + self.lengths[i]),
                *[pad] * (length - self.lengths[i]),
            )
        ]
        index = torch.tensor(positions, device=self.table.device)
        self.current = self.table.index_select(0, index).view(len(indices), length, -1)
        return self

    def __enter__(self) -> FrozenCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current = None

    def close(self) -> None:
        """Put the embeddings and the frozen blocks back."""
        self.current = None
        for name, stand_in in self.stand_ins:
            put_back(self.model, name, stand_in)

    @classmethod
    def build(cls, model: nn.Module, examples: list[dict[str, Any]], collate: Callable[..., Any], pad_id: int,
              batch_size: int, device: torch.device, amp: Callable[[], Any], budget_mb: float | None = None,
              report: SpeedReport | None = None) -> FrozenCache | None:  # fmt: skip
        """The cache of `model`'s frozen lower layers over `examples`, or None where it does not
        apply (a trained embedding table or lower block, an entry module it cannot find, over
        `budget_mb`). The outcome goes to `report` (default: the model's, `report_for`)."""
        report = report if report is not None else report_for(model)
        budget = CACHE_BUDGET_MB if budget_mb is None else budget_mb
        with torch.inference_mode():
            built = _build(cls, model, examples, collate, pad_id, batch_size, device, amp, budget)
        if isinstance(built, str):
            report.note_cache(False, built)
            return None
        report.note_cache(True, f"{len(built.stand_ins) - 1} frozen blocks over {len(built.lengths)} rows, "
                                f"{cache_mb(*built.table.shape):.0f} MB")  # fmt: skip
        return built


def _build(cls: type[FrozenCache], model: nn.Module, examples: list[dict[str, Any]], collate: Callable[..., Any],
           pad_id: int, batch_size: int, device: torch.device, amp: Callable[[], Any],
           budget_mb: float) -> FrozenCache | str:  # fmt: skip
    """`FrozenCache.build`'s work: the cache, or why there is none."""
    base = base_of(model)
    stacks = block_stacks(base)
    if len(stacks) != 1:
        return f"{len(stacks)} block stacks (encoder-decoder): the cache covers one"
    _, blocks = stacks[0]
    trained = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    k = trained.index(True) if True in trained else len(blocks)
    if k == 0:
        return "the first block trains: no frozen lower block"
    if k == len(blocks):
        return "no block trains (head only)"
    if any(not t for t in trained[k:]):
        return "a frozen block above a trained one"
    entry = getattr(getattr(base, "base_model", base), "embeddings", None)
    if entry is None:
        return "no embeddings module to start from"
    if any(p.requires_grad for p in entry.parameters()):
        return "the embeddings train"
    found = [name_of(model, m) for m in (entry, *blocks[:k])]
    names = [n for n in found if n is not None]
    if len(names) < len(found):
        return "the embeddings or blocks are not submodules of the model"
    # the entry module's output must be exactly what the first block receives
    probe = collate(examples[:2], pad_id)
    probe.pop("labels", None)
    seen: dict[str, Any] = {}
    hooks = [entry.register_forward_hook(lambda m, a, out: seen.__setitem__("entry", out)),
             blocks[0].register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("block", a[0] if a else kw.get("hidden_states")),
                 with_kwargs=True)]  # fmt: skip
    tokens = sum(len(e["input_ids"]) for e in examples)
    was_training = model.training
    try:
        model.eval()
        model(**{key: v.to(device) for key, v in probe.items()})
        if seen.get("entry") is not seen.get("block") or not torch.is_tensor(seen.get("block")):
            return "the embeddings' output is not what the first block receives"
        width = seen["block"].shape[-1]
        if cache_mb(tokens, width) > budget_mb:
            return (
                f"{cache_mb(tokens, width):.0f} MB for {tokens:,} tokens, over the {budget_mb:.0f} MB budget"
            )
        for h in hooks:
            h.remove()
        lengths = [len(e["input_ids"]) for e in examples]
        starts = row_starts(lengths)
        table = torch.zeros((tokens + 1, width), device=device)
        captured: list[torch.Tensor] = []

        def stop(module: nn.Module, args: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _StopForward

        hooks = [blocks[k - 1].register_forward_hook(stop)]
        for chunk in cache_batches(lengths, batch_size):
            batch = collate([examples[i] for i in chunk], pad_id)
            batch.pop("labels", None)
            captured.clear()
            try:
                with amp():
                    model(**{key: v.to(device) for key, v in batch.items()})
            except _StopForward:
                pass
            out = captured[0].float()
            for row, i in enumerate(chunk):
                table[starts[i] : starts[i] + lengths[i]] = out[row, : lengths[i]]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return cls(model, names[0], names[1:], table, lengths)
