"""`FastEncoder`: a BERT-family encoder that leaves padding out of its training steps (the
packed encoder) and, in sequence classifiers, computes the last layer only at the first
position (the first-token last layer). Both compute the model's own function: the same
logits and gradients, to float rounding.

- Packed encoder (CPU training only): the linear layers, layer norms, dropout and GELU run on
  the real tokens only, gathered into one [tokens, width] matrix; only the attention scores
  see the padded [batch, heads, length] layout (keys, queries and values are scattered into it
  with zeros at padding, the way the mask then ignores them). The packed row count is rounded
  up to a multiple of 64 with filler rows that nothing reads: with a new matrix shape every
  batch, the kernel library's per-shape memory raised peak RSS by ~400 MB and its set-up time
  ate the gain. Padding is 7-14% of the tokens of length-bucketed SST-2 batches; the
  in-process A/B here measured 5.6% (full) and 6.2% (LoRA) faster minilm-l6 steps with the
  rounding. Inside a packed layer each residual dropout is one `addcmul` (residual + x * mask
  * scale) instead of a dropout and a sum. One matrix product for the query, key and value
  projections (concatenated weights) was measured and not kept: about 2% faster steps, but
  ~110 MB more peak RSS on minilm-l6 full (its new matrix shapes, one per packed row count,
  each cost the kernel library memory).
- First-token last layer: sequence classifiers of the BERT family read only the first
  position of the last layer (the pooler / head take `[:, 0]`). The last layer then needs
  keys and values at every position but the query, attention output and feed-forward only at
  the first: about 1/7 of the model's matrix FLOPs saved, with identical logits.

Prefix tuning (a key/value cache), cross-attention, gradient checkpointing, hooks on the
layers' parts and left padding keep the padded layout (and, where the last layer itself
cannot be computed here, the model's own encoder); so does evaluation, apart from the
first-token last layer. The layers themselves are not swapped: the encoder runs them, so the
block stack keeps one layer class (`methods.common.block_stacks`, FSDP's wrapping).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch import nn

from tunelab.speed.attention import additive, cpu_attention
from tunelab.speed.cache import CachedBlock
from tunelab.speed.dropout import dropout_add
from tunelab.speed.report import FIRST_TOKEN, PACKED, SpeedReport
from tunelab.speed.swap import Wrapper, hooked, name_of, replace

PACK_ROWS = 64  # the packed encoder's row counts are multiples of this (fewer distinct shapes)
BERT_FAMILY = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}


def standard_layer(layer: Any) -> bool:
    """Whether `layer` has the BERT-family layout `packed_layer` computes: self-attention
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


def computed_parts_hooked(layer: Any) -> bool:
    """Hooks on the layer or the parts whose forward `packed_layer` computes itself."""
    attention = layer.attention
    return hooked(layer, attention, attention.self, attention.output, layer.intermediate, layer.output)


def kv_cache(kwargs: dict[str, Any]) -> Any:
    """The key/value cache an encoder was called with: `cache` since transformers 5.24,
    `past_key_values` before (both arrive as keywords and are passed on as such)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def model_attention(attention: Any) -> Any:
    """The attention function the model's own layer would call (its config's implementation)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    default = sys.modules[type(attention).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, default)


def packed_layer(layer: Any, x: torch.Tensor, index: torch.Tensor | None, firsts: torch.Tensor | None,
                 shape: tuple[int, int], mask: torch.Tensor | None, attend: Any) -> torch.Tensor:  # fmt: skip
    """One BERT-family layer on packed rows `x` ([real tokens, width]): only the attention
    scores (`attend`) see the padded [batch, heads, length, size] layout. With `index` None,
    `x` is that padded layout itself, flattened. With `firsts` (the rows of each row's first
    token in `x`) it returns only the first positions, [batch, width]."""
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
    out, _ = attend(attention, query, key, value, mask, dropout=attention.dropout.p if attention.training else 0.0,
                    scaling=attention.scaling)  # fmt: skip
    out = out.reshape(-1, heads * size)
    if firsts is None and index is not None:
        out = torch.cat([out, out.new_zeros(1, out.shape[-1])]).index_select(0, index)
    # the attention output and feed-forward blocks, each residual dropout fused with its sum
    self_out, intermediate, output = layer.attention.output, layer.intermediate, layer.output
    h = self_out.LayerNorm(dropout_add(self_out.dense(out), residual, self_out.dropout.p, self_out.training))
    inner = intermediate.intermediate_act_fn(intermediate.dense(h))
    return output.LayerNorm(dropout_add(output.dense(inner), h, output.dropout.p, output.training))


class FastEncoder(Wrapper):
    """Stands in for a BERT-family encoder (see the module docstring): `pack` leaves padding
    out of training forwards on a CPU, `first_token` computes the last layer at position 0
    only. Its `layer` list is the original's own; `paths` counts its forwards by path."""

    layer: nn.ModuleList

    def __init__(self, encoder: nn.Module, pack: bool, first_token: bool, paths: Counter[str]) -> None:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        super().__init__(encoder)
        self.pack, self.first_token, self.paths = pack, first_token, paths
        self.output_type = BaseModelOutputWithPastAndCrossAttentions

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        cached = kv_cache(kwargs)
        if (
            self.pack
            and attention_mask is not None
            and self._packable(hidden_states, attention_mask, encoder_hidden_states, cached, kwargs)
        ):
            out = self._packed(hidden_states, attention_mask)
            if out is not None:
                self.paths["packed"] += 1
                return self.output_type(last_hidden_state=out)
        last = self.layer[-1]
        if (
            self.first_token
            and cached is None
            and encoder_hidden_states is None
            and not computed_parts_hooked(last)
        ):
            self.paths["padded, first-token last layer"] += 1
            return self._padded_first_token(hidden_states, attention_mask, encoder_attention_mask, kwargs)
        self.paths["model's own"] += 1
        return self.original(
            hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, **kwargs
        )

    def _packable(
        self, hidden_states: torch.Tensor, mask: Any, cross: Any, cached: Any, kwargs: dict[str, Any]
    ) -> bool:
        cpu_padding_mask = hidden_states.device.type == "cpu" and torch.is_tensor(mask) and mask.dim() == 4
        # cross-attention, or a key/value cache (prefix tuning), keeps the padded layout
        self_attention_only = cross is None and cached is None and not kwargs.get("use_cache")
        if not (self.training and cpu_padding_mask and self_attention_only):
            return False
        return not any(getattr(layer, "gradient_checkpointing", False) or computed_parts_hooked(layer)
                       for layer in self.layer)  # fmt: skip

    def _packed(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The encoder's output for a packed training forward; None for left padding."""
        batch, length, width = hidden_states.shape
        row = attention_mask[:, 0, 0, :]
        valid = row if row.dtype == torch.bool else row == 0
        if not bool(valid[:, 0].all()):  # left padding: the first position is not a real token
            return None
        mask = additive(attention_mask)
        index = valid.reshape(-1).nonzero().squeeze(1)
        # round the packed row count up to a multiple of PACK_ROWS with filler rows (pointing at a
        # spare row past the end): every distinct matrix shape costs the kernel library memory
        filler = -index.numel() % PACK_ROWS
        index = torch.cat([index, index.new_full((filler,), batch * length)])
        x = torch.cat([hidden_states.reshape(-1, width), hidden_states.new_zeros(1, width)]).index_select(
            0, index
        )
        layers = [layer for layer in self.layer if not (isinstance(layer, CachedBlock) and layer.skipping)]
        firsts = None
        for i, layer in enumerate(layers):
            if self.first_token and i == len(layers) - 1:
                lengths = valid.sum(1)
                firsts = lengths.cumsum(0) - lengths
            x = packed_layer(layer, x, index, firsts, (batch, length), mask, cpu_attention)
        if firsts is not None:
            return x.view(batch, 1, -1)
        return (
            x.new_zeros(batch * length + 1, x.shape[-1]).index_copy(0, index, x)[:-1].view(batch, length, -1)
        )

    def _padded_first_token(self, hidden_states: torch.Tensor, attention_mask: Any, encoder_attention_mask: Any,
                            kwargs: dict[str, Any]) -> Any:  # fmt: skip
        """The model's own layers on the padded layout (as its encoder calls them), then the
        last layer at the first position only."""
        passed = {k: v for k, v in kwargs.items() if k != "use_cache"}  # (the encoder's own, not its layers')
        layers: list[Any] = list(self.layer)
        *lower, last = layers
        for layer in lower:
            hidden_states = layer(hidden_states, attention_mask, None, encoder_attention_mask=encoder_attention_mask,
                                  **passed)  # fmt: skip
        batch, length, width = hidden_states.shape
        firsts = torch.arange(batch, device=hidden_states.device) * length  # each row's position 0
        attend = model_attention(last.attention.self)
        out = packed_layer(
            last, hidden_states.reshape(-1, width), None, firsts, (batch, length), attention_mask, attend
        )
        return self.output_type(last_hidden_state=out.view(batch, 1, -1))


def family_misfit(base: Any) -> str | None:
    config = base.config
    if config.model_type not in BERT_FAMILY:
        return f"model type {config.model_type} is not BERT-family ({', '.join(sorted(BERT_FAMILY))})"
    if getattr(config, "is_decoder", False):
        return "the model is configured as a decoder"
    return None


def use_fast_encoder(base: Any, task: Any, pack_misfit: str | None, report: SpeedReport) -> None:
    """Put a FastEncoder in place of a BERT-family model's encoder, packing unless
    `pack_misfit` says why not, with the first-token last layer in sequence classifiers."""
    misfit = family_misfit(base)
    encoder = getattr(getattr(base, "base_model", base), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if misfit is None and (not isinstance(layers, nn.ModuleList) or not len(layers)):
        misfit = "no encoder.layer stack"
    if misfit is not None:
        report.skip(PACKED, pack_misfit or misfit)
        report.skip(FIRST_TOKEN, misfit)
        return
    assert encoder is not None and isinstance(layers, nn.ModuleList)
    odd = [i for i, layer in enumerate(layers) if not standard_layer(layer)]
    layout = f"layer {odd[0]} is not the standard BERT layout" if odd else None
    pack_misfit = pack_misfit or layout
    if getattr(task, "name", "") not in ("classification", "regression"):
        first_misfit: str | None = f"the {getattr(task, 'name', '?')} task reads every position"
    elif not type(base).__name__.endswith("ForSequenceClassification"):
        first_misfit = f"{type(base).__name__} is not a sequence classifier"
    else:
        first_misfit = layout if odd and odd[-1] == len(layers) - 1 else None
    name = name_of(base, encoder)
    if name is None or (pack_misfit and first_misfit):
        report.skip(PACKED, pack_misfit or "the encoder is not a submodule")
        report.skip(FIRST_TOKEN, first_misfit or "the encoder is not a submodule")
        return
    replace(base, name, FastEncoder(encoder, pack_misfit is None, first_misfit is None, report.paths))
    report.add(PACKED, [name] if pack_misfit is None else [], pack_misfit or "")
    report.add(
        FIRST_TOKEN, [f"{name}.layer.{len(layers) - 1}"] if first_misfit is None else [], first_misfit or ""
    )
