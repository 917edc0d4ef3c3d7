"""Exact speed-ups for training on a CPU, applied to the model before training.

Each keeps the model's computation the same (same function, same gradients) and only makes
it cheaper; none changes the saved weights or config files.

- `FastDropout`: PyTorch's CPU dropout draws one Mersenne-Twister number per element
  (`bernoulli_`), about 1 ms for a 416 x 384 activation here, 12-15% of a MiniLM step. This
  one draws 63 random bits per four elements from the same seeded generator and keeps an
  element when its 15 bits clear the threshold: the drop rate is p rounded to 1/32768, and
  the kept values are scaled by the exact inverse keep rate, so expectations match. The
  mask is kept as int16 ones and zeros (a comparison written in place; a boolean mask costs
  a slower pass), and the backward pass is one product with it.
- `tunelab-cpu` attention: the eager softmax(QK^T)V path with `FastDropout` on the attention
  probabilities. On short rows it beats SDPA here, whose CPU backward in bf16 is slow and
  which falls back to a slower path with dropout.
- `first_token_last_layer`: sequence classifiers of the BERT family read only the first
  position of the last layer (the pooler / head take `[:, 0]`). The last layer then needs
  keys and values at every position but the query, attention output and feed-forward only
  at the first: about 1/7 of the model's matrix FLOPs saved, with identical logits.
- Packed encoder (`packed_encoder`): in training, a BERT-family encoder runs its linear
  layers, layer norms, dropout and GELU on the real tokens only, gathered into one
  [tokens, width] matrix; only the attention scores see the padded [batch, heads, length]
  layout (keys, queries and values are scattered into it with zeros at padding, the way the
  mask then ignores them). The packed row count is rounded up to a multiple of 64 with
  filler rows that nothing reads: with a new matrix shape every batch, the kernel library's
  per-shape memory raised peak RSS by ~400 MB and its set-up time ate the gain. Padding is
  7-14% of the tokens of length-bucketed SST-2 batches; the in-process A/B here measured
  5.6% (full) and 6.2% (LoRA) faster minilm-l6 steps with the rounding. Prefix
  tuning (a key/value cache), gradient checkpointing, hooks on the layers and left padding
  keep the model's own path, as does evaluation. Inside a packed layer each residual dropout
  is one `addcmul` (residual + x * mask * scale) instead of a dropout and a sum. One matrix
  product for the query, key and value projections (concatenated weights) was measured and
  not kept: about 2% faster steps, but ~110 MB more peak RSS on minilm-l6 full (its new
  matrix shapes, one per packed row count, each cost the kernel library memory).

- Frozen linear layers (every method but `full`) keep a bf16 copy of their weights instead
  of having autocast cast them on every call, and peft's LoRA linear layers run as one
  autograd function (base product plus the low-rank update, in the autocast dtype) instead
  of peft's chain of casts and small modules: the same products, fewer passes over memory.

No library offers these for Hugging Face models on CPU (kernel libraries target GPUs), so
they are written here, each with a test that compares against the unpatched model.
"""

from __future__ import annotations

import itertools
import sys
import types
from typing import Any

import torch
from torch import nn

ATTENTION = "tunelab-cpu"
PACK_ROWS = 64  # the packed encoder's row counts are multiples of this (fewer distinct shapes)
FIRST_TOKEN_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout mask for `x` (int16 ones and zeros, drop rate p rounded to 1/32768) and the
    inverse keep rate to scale the kept values by."""
    n = x.numel()
    # 63 random bits per four elements: each element tests 15 of them against the threshold
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    threshold = round(p * 32768)
    keep = bits.view(torch.int16)[:n].view(x.shape).bitwise_and(32767).ge_(threshold)
    return keep, 32768 / (32768 - threshold)


class _Masked(torch.autograd.Function):
    """x * keep * scale, plus `residual` when given (a dropout and the residual sum in one
    pass); keeps only the (int16) mask for the backward pass."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float, residual: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        if residual is None:
            return torch.mul(x, keep).mul_(scale)
        return torch.addcmul(residual, x, keep, value=scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None, grad if ctx.needs_input_grad[3] else None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with a cheap mask (see the module docstring); exact pass-through when
    not training or p is 0."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    keep, scale = keep_mask(x, p)
    return _Masked.apply(x, keep, scale, None)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x), the dropout as `fast_dropout`'s."""
    if not training or p <= 0.0:
        return x + residual
    if p >= 1.0:
        return residual + x * 0
    keep, scale = keep_mask(x, p)
    return _Masked.apply(x, keep, scale, residual)


class FastDropout(nn.Dropout):
    """nn.Dropout with the cheap CPU mask; on other devices it is plain nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout with p > 0 for FastDropout (same p); returns how many."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, FastDropout(child.p))
                swapped += 1
    return swapped


def cpu_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling + mask) V, with FastDropout on the probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the key/value heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = fast_dropout(probs, dropout, module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, cpu_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch the model (and its sub-configs) to `tunelab-cpu` attention, when it uses the
    shared attention interface; returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    register_attention()
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) in ("sdpa", "eager"):
            sub._attn_implementation = ATTENTION
    return True


def restore_attention(model: nn.Module, implementation: str) -> None:
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == ATTENTION:
            sub._attn_implementation = implementation


def _standard_layer(layer: nn.Module) -> bool:
    """Whether `layer` has the BERT-family layout `_packed_layer` computes: self-attention
    projections, then dense -> dropout -> LayerNorm(+ residual), dense -> activation, and
    dense -> dropout -> LayerNorm(+ residual), with no feed-forward chunking or cross-attention."""
    attention = getattr(getattr(layer, "attention", None), "self", None)
    parts = [getattr(getattr(layer, "attention", None), "output", None), getattr(layer, "output", None)]
    return (
        attention is not None
        and all(
            hasattr(attention, k)
            for k in ("query", "key", "value", "scaling", "num_attention_heads", "dropout")
        )
        and all(
            isinstance(getattr(part, "dropout", None), nn.Dropout)
            and hasattr(part, "dense")
            and hasattr(part, "LayerNorm")
            for part in parts
        )
        and all(hasattr(getattr(layer, "intermediate", None), k) for k in ("dense", "intermediate_act_fn"))
        and not getattr(layer, "chunk_size_feed_forward", 0)
        and not getattr(layer, "add_cross_attention", False)
    )


def _bypassed_hooks(layer: nn.Module) -> bool:
    """Hooks on the modules whose forward `_packed_layer` computes itself (it would skip them)."""
    return any(m._forward_hooks or m._forward_pre_hooks
               for m in (layer.attention, layer.attention.self, layer.attention.output, layer.intermediate,
                         layer.output))  # fmt: skip


def _kv_cache(kwargs: dict[str, Any]) -> Any:
    """The key/value cache a layer or encoder was called with: `cache` since transformers
    5.24, `past_key_values` before (both arrive as keywords and are passed on as such)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _first_token_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """A BERT-family layer's forward computing only the first position's output."""
    if _kv_cache(kwargs) is not None or encoder_hidden_states is not None or _bypassed_hooks(self):
        # prefix tuning, cross-attention or hooks: the model's own code (the rest by keyword)
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, **kwargs)  # fmt: skip
    batch, length, width = hidden_states.shape
    firsts = torch.arange(batch, device=hidden_states.device) * length  # each row's position 0
    out = _packed_layer(self, hidden_states.reshape(-1, width), None, firsts, (batch, length), attention_mask)
    return out.view(batch, 1, -1)


def first_token_last_layer(model: nn.Module, task: Any) -> nn.Module | None:
    """Make the last encoder layer of a BERT-family sequence classifier compute only the
    first position (all its readers use); returns the patched layer, or None if not applicable."""
    from tunelab.methods.common import block_stacks

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if (
        getattr(task, "name", "") not in ("classification", "regression")
        or not type(base).__name__.endswith("ForSequenceClassification")
        or config.model_type not in FIRST_TOKEN_TYPES
        or getattr(config, "is_decoder", False)
    ):
        return None
    _, blocks = block_stacks(base)[-1]
    layer = blocks[-1]
    if not _standard_layer(layer):
        return None
    layer.forward = types.MethodType(_first_token_forward, layer)
    return layer


def _attention_interface(attention: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    default = sys.modules[type(attention).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, default)


def _packed_layer(layer: nn.Module, x: torch.Tensor, index: torch.Tensor | None, firsts: torch.Tensor | None,
                  shape: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One BERT-family layer on packed rows `x` ([real tokens, width]): only the attention
    scores see the padded [batch, heads, length, size] layout. With `index` None, `x` is that
    padded layout itself, flattened. With `firsts` (the rows of each row's first token in `x`)
    it returns only the first positions, [batch, width]."""
    attention = layer.attention.self
    batch, length = shape
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def spread(t: torch.Tensor) -> torch.Tensor:  # packed -> [batch, heads, length, size], zeros at padding
        if index is None:
            return t.view(batch, length, heads, size).transpose(1, 2)
        # (the filler rows that round the packed count up all land in one spare row at the end)
        full = t.new_zeros(batch * length + 1, t.shape[-1]).index_copy(0, index, t)
        return full[:-1].view(batch, length, heads, size).transpose(1, 2)

    residual = x if firsts is None else x.index_select(0, firsts)
    query = attention.query(residual)
    if firsts is None:
        query = spread(query)
    else:
        query = query.view(batch, 1, heads, size).transpose(1, 2)
        mask = mask[:, :, :1] if mask is not None and mask.dim() == 4 else mask
    key, value = spread(attention.key(x)), spread(attention.value(x))
    out, _ = _attention_interface(attention)(attention, query, key, value, mask,
                                             dropout=attention.dropout.p if attention.training else 0.0,
                                             scaling=attention.scaling)  # fmt: skip
    out = out.reshape(-1, heads * size)
    if firsts is None and index is not None:
        out = torch.cat([out, out.new_zeros(1, out.shape[-1])]).index_select(0, index)
    # the attention output and feed-forward blocks, each residual dropout fused with its sum
    self_out, intermediate, output = layer.attention.output, layer.intermediate, layer.output
    h = self_out.LayerNorm(dropout_add(self_out.dense(out), residual, self_out.dropout.p, self_out.training))
    inner = intermediate.intermediate_act_fn(intermediate.dense(h))
    return output.LayerNorm(dropout_add(output.dense(inner), h, output.dropout.p, output.training))


def _packable(encoder: nn.Module, hidden_states: torch.Tensor, mask: Any, others: list[Any]) -> bool:
    if (
        not encoder.training
        or hidden_states.device.type != "cpu"
        or not torch.is_tensor(mask)
        or mask.dim() != 4
    ):
        return False
    if any(o is not None and o is not False for o in others):  # cross-attention, a KV cache (prefix tuning)
        return False
    return not any(
        getattr(layer, "gradient_checkpointing", False)
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or _bypassed_hooks(layer)
        for layer in encoder.layer
    )


def _packed_encoder_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """A BERT-family encoder's forward with padding left out of every per-token operation."""
    args = (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask)
    others = [encoder_hidden_states, _kv_cache(kwargs), kwargs.get("use_cache")]
    if not _packable(self, hidden_states, attention_mask, others):
        return type(self).forward(self, *args, **kwargs)
    batch, length, width = hidden_states.shape
    row = attention_mask[:, 0, 0, :]
    valid = row if row.dtype == torch.bool else row == 0
    if not bool(valid[:, 0].all()):  # left padding: the first position is not a real token
        return type(self).forward(self, *args, **kwargs)
    index = valid.reshape(-1).nonzero().squeeze(1)
    # round the packed row count up to a multiple of PACK_ROWS with filler rows (pointing at a
    # spare row past the end): every distinct matrix shape costs the kernel library memory
    filler = -index.numel() % PACK_ROWS
    index = torch.cat([index, index.new_full((filler,), batch * length)])
    x = torch.cat([hidden_states.reshape(-1, width), hidden_states.new_zeros(1, width)]).index_select(
        0, index
    )
    layers = [layer for layer in self.layer if not FrozenCache.skips(layer)]
    firsts = None
    for i, layer in enumerate(layers):
        if (
            i == len(layers) - 1
            and getattr(vars(layer).get("forward"), "__func__", None) is _first_token_forward
        ):
            lengths = valid.sum(1)
            firsts = lengths.cumsum(0) - lengths
        x = _packed_layer(layer, x, index, firsts, (batch, length), attention_mask)
    if firsts is not None:
        out = x.view(batch, 1, -1)
    else:
        out = (
            x.new_zeros(batch * length + 1, x.shape[-1]).index_copy(0, index, x)[:-1].view(batch, length, -1)
        )
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def packed_encoder(model: nn.Module) -> nn.Module | None:
    """Make a BERT-family encoder leave padding out of its training forward (see the module
    docstring); returns the patched encoder, or None if not applicable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in FIRST_TOKEN_TYPES or getattr(config, "is_decoder", False):
        return None
    encoder = getattr(getattr(base, "base_model", base), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    if not all(_standard_layer(layer) for layer in layers):
        return None
    encoder.forward = types.MethodType(_packed_encoder_forward, encoder)
    return encoder


def packs(model: nn.Module) -> bool:
    """Whether `packed_encoder` has patched this model's encoder."""
    return any(
        getattr(vars(m).get("forward"), "__func__", None) is _packed_encoder_forward for m in model.modules()
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _low_precision_copy(module: nn.Module, name: str, tensor: torch.Tensor | None, dtype: torch.dtype) -> Any:
    """`tensor` in `dtype`, cast once and kept on the module until the tensor changes."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    key = (tensor.data_ptr(), tensor._version, dtype)
    cached = module.__dict__.get("_tunelab_" + name)
    if cached is None or cached[0] != key:
        cached = (key, tensor.detach().to(dtype))
        module.__dict__["_tunelab_" + name] = cached
    return cached[1]


def _frozen_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
        return nn.Linear.forward(self, x)
    dtype = _compute_dtype(x)
    weight = _low_precision_copy(self, "weight", self.weight, dtype)
    return nn.functional.linear(x.to(dtype), weight, _low_precision_copy(self, "bias", self.bias, dtype))


class _LoraProduct(torch.autograd.Function):
    """x W^T + b + s (drop(x) A^T) B^T with W, b frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
        dtype = weight.dtype
        a16, b16 = a.to(dtype), b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        flat_dropped = flat if dropped is None else dropped.reshape(-1, x.shape[-1])
        xa = flat_dropped @ a16.t()
        out = nn.functional.linear(flat, weight, bias)
        out.addmm_(xa, b16.t(), alpha=scaling)
        ctx.save_for_backward(flat_dropped, xa, weight, a16, b16)
        ctx.scaling, ctx.shapes = scaling, (x.shape, a.dtype, b.dtype)
        ctx.dropout_mask = dropped is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        flat_dropped, xa, weight, a16, b16 = ctx.saved_tensors
        shape, a_dtype, b_dtype = ctx.shapes
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        gb = g @ b16  # [tokens, rank]
        grad_x = grad_dropped = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if not ctx.dropout_mask:
                grad_x.addmm_(gb, a16, alpha=ctx.scaling)
            grad_x = grad_x.view(shape)
        if ctx.dropout_mask and ctx.needs_input_grad[1]:
            grad_dropped = (ctx.scaling * (gb @ a16)).view(shape)
        grad_a = (ctx.scaling * (gb.t() @ flat_dropped)).to(a_dtype)
        grad_b = (ctx.scaling * (g.t() @ xa)).to(b_dtype)
        return grad_x, grad_dropped, None, None, grad_a, grad_b, None


def _lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if (
        args or kwargs or self.disable_adapters or self.merged or len(active) != 1
        or active[0] in self.lora_variant or active[0] not in self.lora_A
        or type(self.base_layer) is not nn.Linear or getattr(self, "fan_in_fan_out", False)
        or self.base_layer.weight.requires_grad
    ):  # fmt: skip
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    base, dropout = self.base_layer, self.lora_dropout[name]
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    dropped = fast_dropout(x, p, self.training) if p > 0 and self.training else None
    weight = _low_precision_copy(base, "weight", base.weight, dtype)
    bias = _low_precision_copy(base, "bias", base.bias, dtype)
    return _LoraProduct.apply(x, dropped, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                              float(self.scaling[name]))  # fmt: skip


def use_fast_linears(model: nn.Module) -> int:
    """Give peft LoRA linears the fused product and frozen nn.Linear layers the bf16 weight
    copy; returns how many modules were patched."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLinear = ()  # noqa: N806
    patched = 0
    inside_lora = set()
    for module in model.modules():
        if LoraLinear and isinstance(module, LoraLinear):
            module.forward = types.MethodType(_lora_forward, module)
            inside_lora.add(id(module.base_layer))
            patched += 1
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in inside_lora and not module.weight.requires_grad:
            module.forward = types.MethodType(_frozen_linear_forward, module)
            patched += 1
    return patched


PATCHED = {"_first_token_forward", "_lora_forward", "_frozen_linear_forward", "_packed_encoder_forward"}


def apply(model: nn.Module, task: Any, cpu: bool) -> None:
    """All the speed-ups that apply to this model and task (`cpu`: training on a CPU)."""
    use_fast_dropout(model)
    use_fast_linears(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base.config, "_attn_implementation", None)
    if cpu and not getattr(task, "generative", False) and use_cpu_attention(model):
        base.config.tunelab_attention = original
    first_token_last_layer(model, task)
    if cpu and not getattr(task, "generative", False):
        packed_encoder(model)


def undo(model: nn.Module) -> None:
    """Back to the model's own attention and layer code (dropout modules stay: same function)."""
    for module in model.modules():
        if getattr(getattr(vars(module).get("forward"), "__func__", None), "__name__", "") in PATCHED:
            del module.forward
        for key in ("_tunelab_weight", "_tunelab_bias"):
            module.__dict__.pop(key, None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base.config, "tunelab_attention", None)
    if original is not None:
        restore_attention(model, original)
        del base.config.tunelab_attention


class _StopForward(Exception):
    pass


def row_starts(lengths: list[int]) -> list[int]:
    """Where each row begins when rows of these lengths are stacked end to end."""
    return list(itertools.accumulate(lengths[:-1], initial=0))


CACHE_BUDGET_MB = 2048  # the most memory freeze's cache may take; above it, no cache


def cache_mb(tokens: int, width: int) -> float:
    """Memory of a cache of `tokens` rows of `width` float32 values."""
    return tokens * width * 4 / 2**20


def cache_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The batches of the cache's inference pass: rows sorted by length, `batch_size` at a time."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class FrozenCache:
    """For `freeze`: the frozen lower part of the model (embeddings and the frozen blocks) is
    run once over the training rows, in eval mode, and its output per row is kept; training
    steps then start at the first trained block. No peer does this: each epoch re-runs the
    frozen layers (forward only, with dropout) for every batch.

    The one change in what is computed: the frozen layers act as a fixed feature extractor,
    without dropout. Built with `FrozenCache.build`, which returns None where it does not
    apply (a trained embedding table or lower block, or an entry module it cannot find).
    """

    def __init__(
        self, entry: nn.Module, frozen: list[nn.Module], table: torch.Tensor, lengths: list[int]
    ) -> None:
        # every row's outputs in one table (row i from starts[i]) with a zero row at the end
        # for padding, so that a batch is gathered with one index_select
        self.entry, self.frozen, self.table, self.lengths = entry, frozen, table, lengths
        self.starts = row_starts(lengths)
        self.current: torch.Tensor | None = None
        entry.forward = types.MethodType(self._entry_forward, entry)
        for block in frozen:
            block.forward = types.MethodType(self._block_forward, block)
            block.__dict__["_tunelab_cache"] = self

    @staticmethod
    def skips(block: nn.Module) -> bool:
        """Whether `block` is a frozen block whose output the current batch takes from the cache."""
        cache = vars(block).get("_tunelab_cache")
        return cache is not None and cache.current is not None

    def _entry_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.current is None:
            return type(module).forward(module, *args, **kwargs)
        return self.current

    def _block_forward(self, module: nn.Module, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if self.current is None:
            return type(module).forward(module, hidden_states, *args, **kwargs)
        return hidden_states

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
        for module in (self.entry, *self.frozen):
            vars(module).pop("forward", None)
            vars(module).pop("_tunelab_cache", None)

    @classmethod
    @torch.inference_mode()
    def build(cls, model: nn.Module, examples: list[dict[str, Any]], collate: Any, pad_id: int,
              batch_size: int, device: torch.device, amp: Any, budget_mb: float = CACHE_BUDGET_MB) -> FrozenCache | None:  # fmt: skip
        from tunelab.methods.common import block_stacks

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        stacks = block_stacks(base)
        if len(stacks) != 1:
            return None
        _, blocks = stacks[0]
        trained = [any(p.requires_grad for p in b.parameters()) for b in blocks]
        k = trained.index(True) if True in trained else len(blocks)
        if k == 0 or k == len(blocks) or any(not t for t in trained[k:]):  # (no trained block: head only)
            return None
        entry = getattr(base, "base_model", base)
        entry = getattr(entry, "embeddings", None)
        if entry is None or any(p.requires_grad for p in entry.parameters()):
            return None
        # the entry module's output must be exactly what the first block receives
        probe = collate(examples[:2], pad_id)
        probe.pop("labels", None)
        seen: dict[str, Any] = {}
        hooks = [entry.register_forward_hook(lambda m, a, out: seen.__setitem__("entry", out)),
                 blocks[0].register_forward_pre_hook(
                     lambda m, a, kw: seen.__setitem__("block", a[0] if a else kw.get("hidden_states")),
                     with_kwargs=True)]  # fmt: skip
        tokens = sum(len(e["input_ids"]) for e in examples)
        try:
            was_training = model.training
            model.eval()
            model(**{k2: v.to(device) for k2, v in probe.items()})
            if seen.get("entry") is not seen.get("block") or not torch.is_tensor(seen.get("block")):
                return None
            if cache_mb(tokens, seen["block"].shape[-1]) > budget_mb:
                return None
            for h in hooks:
                h.remove()
            lengths = [len(e["input_ids"]) for e in examples]
            starts = row_starts(lengths)
            table = torch.zeros((tokens + 1, seen["block"].shape[-1]), device=device)
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
                        model(**{k2: v.to(device) for k2, v in batch.items()})
                except _StopForward:
                    pass
                out = captured[0].float()
                for row, i in enumerate(chunk):
                    table[starts[i] : starts[i] + lengths[i]] = out[row, : lengths[i]]
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        return cls(entry, list(blocks[:k]), table, lengths)
