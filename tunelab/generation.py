"""Text generation for causal-LM and seq2seq runs: batched for evaluation, streamed for chat.

Decoding is transformers' `generate` (greedy, or sampling with temperature / top-p / top-k,
repetition penalty); this module decides the stop tokens, pads prompts on the side the model
needs, and returns only the new text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch

from tunelab.device import autocast

# end-of-turn markers of common chat templates; each stops generation when the template uses it
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class Generates(Protocol):
    """A model with transformers' `generate` (a transformers model, or a peft model around one)."""

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """Token ids of prompt + continuation (encoder-decoder: of the continuation), one row per input."""
        ...


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The eos token, plus every end-of-turn marker that the tokenizer's chat template emits."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN:
        if marker in template and marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids


def generation_kwargs(options: Any, tokenizer: Any, max_new_tokens: int | None = None) -> dict[str, Any]:
    """`generate` keyword arguments from the run's `generation` section."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens or options.max_new_tokens,
        "do_sample": options.do_sample,
        "repetition_penalty": options.repetition_penalty,
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    else:  # greedy: no sampling knobs, or transformers warns that they are unused
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int = 16,
    encoder_decoder: bool = False,
    add_special_tokens: bool = False,
    streamer: Any = None,
    progress: Callable[[int], None] | None = None,
    stop: tuple[str, ...] = (),
) -> list[str]:
    """The new text generated for each prompt (rendered prompt strings), in their order.

    Prompts are batched by length; decoder-only models get left padding so that every row's
    answer starts right after its own prompt. A row stops early once its text contains one of
    the `stop` strings (which stay in the text; callers cut them off).
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    positions = getattr(model.config, "max_position_embeddings", None)
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens or encoder_decoder)  # fmt: skip
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            # never run past the model's position table
            room = positions - (0 if encoder_decoder else enc["input_ids"].shape[1]) if positions else None
            step = (
                {**kwargs, "max_new_tokens": max(1, min(kwargs["max_new_tokens"], room))} if room else kwargs
            )
            if stop:
                start = 0 if encoder_decoder else enc["input_ids"].shape[1]
                step = {**step, "stopping_criteria": stop_at_text(tokenizer, stop, start)}
            with autocast(device, dtype):
                generated = cast(Generates, model).generate(**enc, **step, streamer=streamer)
            new = generated if encoder_decoder else generated[:, enc["input_ids"].shape[1] :]
            for row, i in enumerate(chunk):
                out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def stop_at_text(tokenizer: Any, stop: tuple[str, ...], start: int) -> Any:
    """A stopping criterion that ends each row once its new text contains a stop string.

    Written here because transformers' own `stop_strings` needs a BPE/SentencePiece vocabulary
    (it fails on WordPiece); decoding the new tokens works with every tokenizer."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtText(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopAtText()])


def text_streamer(tokenizer: Any, write: Callable[[str], None]) -> Any:
    """A streamer for `generate` that hands each new piece of text to `write` as it is decoded."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text + ("\n" if stream_end else ""))

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
