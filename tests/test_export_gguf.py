"""`tunelab export --gguf`: a LoRA-tuned tiny Llama (byte-level BPE, ChatML template) written as GGUF
answers exactly as tunelab does in llama.cpp at f16 and nearly so at q8_0; the Modelfile's template
renders chats as the tokenizer's template does; bad requests leave nothing behind; `tunelab serve`
serves the file through llama-cpp-python with the run's answers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")  # the optional `gguf` extra: without it these tests skip

from tunelab import gguf_export
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.gguf_export.convert import architecture_of
from tunelab.gguf_export.modelfile import go_template, learn_template, modelfile, render_go

from .conftest import write_tiny_bert

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP,
    reason="needs llama-cpp-python (make install puts in the wheel from ../shared/wheels, "
    "or pip install llama-cpp-python)",
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        question = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5))
        answer = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(4)) + "."
        rows.append({"messages": [{"role": "user", "content": f"Say {question}?"},
                                  {"role": "assistant", "content": answer}]})  # fmt: skip
    return rows


def write_tiny_bpe_llama(folder: Path) -> Path:
    """A random Llama with a byte-level BPE tokenizer trained on the test words and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = [json.dumps(r) for r in chat_rows(60)] + ["You are a tiny model. Say ?"] * 3
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")  # fmt: skip
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer) + 7, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    model = write_tiny_bpe_llama(root / "tiny-llama")
    out = root / "run"
    code = main(["train", f"model={model}", "task=causal-lm", "method=lora",
                 f"data.train={write_jsonl(root / 'train.jsonl', chat_rows(40))}",
                 f"data.test={write_jsonl(root / 'test.jsonl', chat_rows(46)[40:])}",
                 "train.max_steps=4", "train.learning_rate=5e-2", "train.progress_bar=false",
                 "generation.max_new_tokens=12", f"output_dir={out}"])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def f16_export(chat_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "f16"
    assert main(["export", str(chat_run), "--gguf", "--quant", "f16", "--out", str(out)]) == 0
    return out


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_f16_file_holds_weights_tokenizer_template_and_stop_tokens(chat_run, f16_export):
    from transformers import AutoTokenizer

    report = json.loads((f16_export / "export.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(chat_run / "model")
    fields = metadata(f16_export / report["file"])
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # a plain byte-level BPE pre-tokenizer
    assert fields["tokenizer.chat_template"] == CHATML
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == end_of_turn == fields["tokenizer.ggml.eot_token_id"]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # tokenization adds none: neither may llama.cpp
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer) + 7  # padded to the embedding rows
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tokenizer) + 6}]"
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert sorted(p.name for p in f16_export.iterdir()) == sorted([report["file"], "Modelfile", "export.json",
                                                                    "README.md"])  # fmt: skip
    assert not list(f16_export.parent.glob(".*partial*"))


@needs_llama_cpp
def test_f16_greedy_answers_in_llama_cpp_equal_the_runs(chat_run, f16_export):
    from llama_cpp import Llama

    from tunelab.run import load

    report = json.loads((f16_export / "export.json").read_text())
    check = report["check"]
    assert check["engine"] == "llama.cpp" and check["passed"] and check["tokenizer_agrees"]
    assert check["greedy_agreement"] == 1.0 and check["identical_answers"] == check["prompts"] == 6
    assert check["max_logit_diff"] < 0.05
    # and independently of the export's own check: the run's (unmerged) model against llama.cpp
    run = load(chat_run)
    run.config.generation.do_sample = False
    llm = Llama(model_path=str(f16_export / report["file"]), n_ctx=256, verbose=False)
    for row in chat_rows(46)[40:43]:
        prompt = run.task.prompt_for(row["messages"][0]["content"], run.tokenizer)
        ids = run.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
            if token == report["eot_token_id"] or len(theirs) == 12:
                break
            theirs.append(token)
        assert run.tokenizer.decode(theirs, skip_special_tokens=True).strip() == run.generate([prompt])[0]
    llm.close()


@needs_llama_cpp
def test_q8_0_agrees_on_at_least_95_percent_and_is_smaller(chat_run, f16_export, tmp_path):
    out = tmp_path / "q8"
    assert main(["export", str(chat_run), "--gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["check"]["greedy_agreement"] >= 0.95 and report["check"]["required_agreement"] == 0.95
    f16 = json.loads((f16_export / "export.json").read_text())
    assert report["bytes"] < f16["bytes"]
    assert metadata(out / report["file"])["general.file_type"] == 7  # MOSTLY_Q8_0


@needs_llama_cpp
def test_bf16_is_written_and_checked(chat_run, tmp_path):
    report = gguf_export.export_gguf(chat_run, tmp_path / "bf16", "bf16", say=lambda m: None)
    assert metadata(tmp_path / "bf16" / report["file"])["general.file_type"] == 32  # MOSTLY_BF16
    assert report["check"]["required_agreement"] == 0.95 and report["check"]["greedy_agreement"] >= 0.95


@needs_llama_cpp
def test_q4_k_m_is_quantized_by_llama_cpp(chat_run, tmp_path):
    out = tmp_path / "q4"
    assert main(["export", str(chat_run), "--gguf", "--quant", "q4_k_m", "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert metadata(out / report["file"])["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert report["check"]["required_agreement"] is None and 0 <= report["check"]["greedy_agreement"] <= 1
    assert not list(out.glob(".*f16.gguf"))  # the intermediate f16 file is gone


def test_without_llama_cpp_transformers_checks_the_file(chat_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export.check, "has_llama_cpp", lambda: False)
    out = tmp_path / "plain"
    report = gguf_export.export_gguf(chat_run, out, "f16", say=lambda m: None)
    assert report["check"]["engine"] == "transformers (GGUF loader)"
    assert report["check"]["greedy_agreement"] == 1.0 and report["check"]["max_logit_diff"] < 0.05
    assert "tokenizer_agrees" not in report["check"]


def test_modelfile_renders_a_two_turn_chat_as_the_chat_template(chat_run, f16_export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_run / "model")
    text = (f16_export / "Modelfile").read_text()
    report = json.loads((f16_export / "export.json").read_text())
    assert text.startswith(f"FROM ./{report['file']}\n") and 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a park."}]  # fmt: skip
    expected = ("<|im_start|>system\nYou are a tiny model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a park.<|im_end|>\n"
                "<|im_start|>assistant\n")  # fmt: skip
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    assert render_go(template, chat) == expected
    with_system = [{"role": "system", "content": "Be brief."}, *chat]
    assert render_go(template, with_system) == expected.replace("You are a tiny model.", "Be brief.")


def test_a_template_that_is_not_prefix_and_suffix_gets_no_ollama_template():
    class Odd:  # numbers its turns: no fixed prefix per role
        chat_template = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
        bos_token = None

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"{i + 1}:{m['content']}\n" for i, m in enumerate(messages))

        def convert_ids_to_tokens(self, i):
            return "</s>"

    text, report = modelfile("m.gguf", Odd(), [2])
    assert "TEMPLATE" not in text.replace("# TEMPLATE", "") and report["template"].startswith("not written")
    assert 'PARAMETER stop "</s>"' in text


def test_learned_pieces_round_trip_through_the_go_renderer():
    def llama3(messages, add_generation_prompt):
        text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                       for m in messages)  # fmt: skip
        return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")

    template = go_template(learn_template(llama3))
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "a {{b}}"},
            {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]  # fmt: skip
    assert render_go(template, chat) == llama3(chat, True)
    assert render_go(template, chat[1:2]) == llama3(chat[1:2], True)


@needs_llama_cpp
@pytest.mark.parametrize("family", ["MistralConfig", "Qwen2Config", "Qwen3Config", "Llama 3.1 RoPE"])
def test_other_llama_family_decoders_answer_alike_in_llama_cpp(family, chat_run, tmp_path):
    """Mistral (Llama's graph), Qwen2 (q/k/v biases, no permutation), Qwen3 (q/k norms), Llama with
    Llama 3.1's RoPE scaling (here from 16 positions on, well within the prompts), random weights."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.gguf_export.check import check_gguf
    from tunelab.gguf_export.convert import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(chat_run / "model")
    llama3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}  # fmt: skip
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                 initializer_range=0.2, tie_word_embeddings=False)  # fmt: skip
    if family.endswith("Config"):
        config = getattr(transformers, family)(**shape)
    else:
        config = transformers.LlamaConfig(**shape, **llama3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "Qwen2Config":  # random biases, so that a misplaced one shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    written = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", family, 2)
    # 3 + 9 per layer; Qwen2 adds 3 biases per layer, Qwen3 2 norms, Llama 3.1 the rope factors
    expected = {"MistralConfig": ("llama", 21), "Qwen2Config": ("qwen2", 27), "Qwen3Config": ("qwen3", 25),
                "Llama 3.1 RoPE": ("llama", 22)}[family]  # fmt: skip
    assert (written.architecture, written.tensors) == expected
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["messages"][0]["content"]}],
                                             tokenize=False, add_generation_prompt=True) for r in chat_rows(3)]  # fmt: skip
    check = check_gguf(tmp_path / "m.gguf", model, tokenizer, prompts, "f16")
    # the logits match to f16 precision; a random model's near-ties may still flip a rare greedy token
    assert check["max_logit_diff"] < 0.05 and check["greedy_agreement"] >= 0.95 and check["tokenizer_agrees"]


@needs_llama_cpp
def test_a_sentencepiece_style_vocabulary_tokenizes_alike_in_llama_cpp(tmp_path):
    """Llama 2 / Mistral tokenizers: BPE with byte fallback on '▁'-joined words (tokenizer model `llama`)."""
    import torch
    from llama_cpp import Llama
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tunelab.gguf_export.convert import write_gguf

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator([json.dumps(r) for r in chat_rows(60)],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_]))  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    written = write_gguf(LlamaForCausalLM(config), tokenizer, tmp_path / "spm.gguf", "f16", "spm", 2)
    assert (written.tokenizer_model, written.pre_tokenizer) == ("llama", "default")
    llm = Llama(model_path=str(tmp_path / "spm.gguf"), n_ctx=64, verbose=False)
    for text in [
        "Say the cat sat on a mat.",
        "the dog ran to the park",
        "zebra quirky 123 ü",
    ]:  # unseen bytes too
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
    llm.close()


# ----------------------------------------------------------------- bad requests


def test_an_encoder_run_is_refused_before_anything_is_written(tmp_path, sentiment_files, capsys):
    run = tmp_path / "cls"
    assert main(["train", f"model={write_tiny_bert(tmp_path / 'bert')}", "method=lora",
                 f"data.train={sentiment_files['train']}", "train.max_steps=2", "train.progress_bar=false",
                 f"output_dir={run}"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["export", str(run), "--gguf", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: GGUF export is for causal-lm decoders") and "\n" not in error
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_unsupported_architecture_names_the_covered_ones():
    from transformers import GPT2Config

    with pytest.raises(TunelabError, match="GGUF export covers LlamaForCausalLM, MistralForCausalLM"):
        architecture_of(GPT2Config(architectures=["GPT2LMHeadModel"]), "runs/gpt2")


def test_existing_folder_and_unknown_quant_are_refused(chat_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert main(["export", str(chat_run), "--gguf", "--out", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err and [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert main(["export", str(chat_run), "--gguf", "--quant", "q3_k", "--out", str(tmp_path / "q3")]) == 2
    assert "--quant q3_k: choose one of f16, bf16, q8_0, q4_0, q4_k_m" in capsys.readouterr().err
    assert not (tmp_path / "q3").exists()


def test_a_k_quant_without_llama_cpp_says_what_to_install(chat_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gguf_export, "has_llama_cpp", lambda: False)
    assert main(["export", str(chat_run), "--gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "q4")]) == 2
    assert "pip install llama-cpp-python" in capsys.readouterr().err and not (tmp_path / "q4").exists()


def test_a_failed_check_leaves_nothing_written(chat_run, tmp_path, monkeypatch, capsys):
    def failing(*args, **kwargs):
        return {"engine": "llama.cpp", "greedy_agreement": 0.5, "required_agreement": 1.0,
                "max_logit_diff": 3.0, "passed": False}  # fmt: skip

    monkeypatch.setattr(gguf_export, "check_gguf", failing)
    out = tmp_path / "bad"
    assert main(["export", str(chat_run), "--gguf", "--out", str(out)]) == 2
    assert "GGUF check failed in llama.cpp: greedy tokens agree on 50.0%" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


# ----------------------------------------------------------------- serving


@needs_llama_cpp
def test_serve_answers_from_the_gguf_file_as_the_run_does(chat_run, f16_export):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tunelab.run import load
    from tunelab.serve import create_app, load_served

    served = load_served(f16_export)
    report = json.loads((f16_export / "export.json").read_text())
    assert load_served(f16_export / report["file"]).file == served.file  # the file itself serves too
    run = load(chat_run)
    question = chat_rows(46)[41]["messages"][0]["content"]
    expected = run.generate([run.task.prompt_for(question, run.tokenizer)], max_new_tokens=10)[0]
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 10}
    with TestClient(create_app(served)) as client:
        reply = client.post("/v1/chat/completions", json=body).json()
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert reply["choices"][0]["message"]["content"] == expected
    chunks = [json.loads(line.removeprefix("data: ")) for line in streamed.text.split("\n\n")
              if line.startswith("data: {")]  # fmt: skip
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
