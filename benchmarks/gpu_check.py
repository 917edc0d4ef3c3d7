#!/usr/bin/env python
"""Does tunelab work on a GPU? A few training steps of everything, on CUDA (or, as CI's smoke
test, on the CPU), and one Markdown table of what passed.

    python benchmarks/gpu_check.py                         # CUDA, the built-in models where they fit
    python benchmarks/gpu_check.py --device cpu --quick    # CI's smoke test: tiny random models
    python benchmarks/gpu_check.py --steps 20 --out gpu-table.md

Checks, `--steps` optimizer steps each (default 5):

- every task x method (`tunelab.train` in this process): on CUDA the built-in minilm-l6
  (encoder tasks) and smollm2-135m (causal-lm, preference), with `--models tiny` or on the CPU
  tiny random models built from configs (tests/conftest.py); seq2seq always a tiny random T5;
- bf16 autocast (`train.precision=bf16`), and fp16 with its GradScaler (CUDA only);
- FSDP over the GPUs present (`tunelab train --nproc <GPU count>`, NCCL; on the CPU two
  processes over gloo; skipped on a single GPU: NCCL takes one process per GPU);
- QLoRA (`lora.quantize=4bit`; on the CPU the check is that the config refuses it, one line,
  before loading anything: it is reported as skipped, with that line);
- generation (the causal-lm LoRA run generating 16 tokens) and `tunelab serve` (a server
  process, one /v1/chat/completions request);
- the Hugging Face peer (`Trainer` + `peft` LoRA, the recipe of ../shared/bench/hf_cls.py and
  hf_clm.py, which pin `use_cpu=True`, so it is run here) on the same classification and SFT
  rows, model, batch, steps and adapter shape as tunelab's defaults (r 16, alpha 32, every
  linear layer).

Columns: tokens/s (real, non-padding tokens in training; new tokens for generation and serve),
peak memory (`torch.cuda.max_memory_allocated` on CUDA, reset before each check; the peak RSS on
the CPU, reset through /proc/self/clear_refs, so each check shows its own), and pass / fail /
skipped with the reason. Exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the offline settings; CUDA is first touched in main, after --device)

from tests.conftest import (  # noqa: E402  (the tiny random models of the test suite)
    FILLER,
    NEGATIVE,
    POSITIVE,
    sentiment_rows,
    write_csv,
    write_tiny_bert,
    write_tiny_llama,
    write_tiny_seq2seq,
)

ENCODER_TASKS = ["classification", "regression", "token-classification", "masked-lm", "question-answering"]
DECODER_TASKS = ["causal-lm", "preference"]
TASK_NAMES = [*ENCODER_TASKS, "causal-lm", "seq2seq", "preference"]
METHOD_NAMES = ["full", "freeze", "lora", "adapter", "prefix", "prompt", "ia3"]
QUICK_GRID = [("classification", "full"), ("classification", "lora"), ("causal-lm", "lora")]
BATCH = 8
# what the small files and tiny models need (the column name; blocks and windows within 32 tokens)
TASK_SETTINGS = {
    "regression": ["data.label_column=score"],
    "masked-lm": ["data.block_size=32"],
    "question-answering": ["data.doc_stride=8"],
}
GENERATED = 16  # new tokens in the generation and serve checks


@dataclass
class Row:
    check: str
    tokens_per_s: float | None = None
    peak_mb: float | None = None
    result: str = "pass"


# ----------------------------------------------------------------------------- memory


def reset_peak(cuda: bool) -> None:
    """Start a check's peak-memory window: CUDA's allocator counters, or the kernel's RSS
    high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM, Linux 4.0+)."""
    gc.collect()  # the previous check's models
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's since it started


def read_peak(cuda: bool, pid: int | str = "self") -> float | None:
    """Peak memory in MB: CUDA's max allocated (this process), or VmHWM of process `pid`."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def gpu_memory_of(pid: int) -> float | None:
    """Memory a process holds on the GPUs now, in MB, from nvidia-smi (None where unknown)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    used = [
        float(b) for a, b in (line.split(",") for line in out.splitlines() if "," in line) if int(a) == pid
    ]
    return sum(used) if used else None


# ----------------------------------------------------------------------------- data and models


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_files(task: str, folder: Path, n: int, seed: int) -> Path:
    """A small file of `task`'s layout whose words are all in the tiny models' vocabulary."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def words(k: int) -> list[str]:
        picked = rng.sample(FILLER, k - 1) + [rng.choice(POSITIVE + NEGATIVE)]
        rng.shuffle(picked)
        return picked

    if task == "classification":
        return write_csv(folder / f"{seed}.csv", sentiment_rows(n, seed))
    if task == "regression":
        rows = [
            {"text": " ".join(w := words(5)), "score": str(sum(x in POSITIVE for x in w))} for _ in range(n)
        ]
        return write_csv(folder / f"{seed}.csv", rows)
    if task == "token-classification":
        rows = []
        for _ in range(n):
            w = words(6)
            tags = ["B-POS" if x in POSITIVE else "B-NEG" if x in NEGATIVE else "O" for x in w]
            rows.append({"tokens": w, "tags": tags})
        return write_jsonl(folder / f"{seed}.jsonl", rows)
    if task == "masked-lm":
        path = folder / f"{seed}.txt"
        path.write_text("".join(" ".join(words(8)) + " .\n" for _ in range(n)))
        return path
    if task == "question-answering":
        rows = []
        for i in range(n):
            answer = rng.choice(POSITIVE)
            context = f"the movie was {answer} and the plot was {rng.choice(NEGATIVE)} ."
            rows.append({"id": f"q{seed}-{i}", "question": "the movie was ?", "context": context,
                         "answers": {"text": [answer], "answer_start": [context.index(answer)]}})  # fmt: skip
        return write_jsonl(folder / f"{seed}.jsonl", rows)
    if task == "causal-lm":
        rows = [
            {"instruction": " ".join(words(4)), "output": " ".join(rng.sample(POSITIVE, 3))} for _ in range(n)
        ]
        return write_jsonl(folder / f"{seed}.jsonl", rows)
    if task == "seq2seq":
        rows = []
        for _ in range(n):
            w = words(4)
            rows.append({"source": " ".join(w), "target": " ".join(reversed(w))})
        return write_csv(folder / f"{seed}.csv", rows)
    if task == "preference":
        rows = [{"prompt": " ".join(words(3)), "chosen": " ".join(rng.sample(POSITIVE, 2)) + " !",
                 "rejected": " ".join(rng.sample(NEGATIVE, 2))} for _ in range(n)]  # fmt: skip
        return write_jsonl(folder / f"{seed}.jsonl", rows)
    raise ValueError(task)


class Models:
    """The model each task trains: built-in ones (`builtin`) or tiny random ones, made once."""

    def __init__(self, work: Path, builtin: bool):
        self.work, self.builtin = work, builtin
        self.made: dict[str, str] = {}

    def for_task(self, task: str) -> str:
        if self.builtin and task != "seq2seq":
            return "smollm2-135m" if task in DECODER_TASKS else "minilm-l6"
        kind = "llama" if task in DECODER_TASKS else "t5" if task == "seq2seq" else "bert"
        if kind not in self.made:
            folder = self.work / f"tiny-{kind}"
            if kind == "bert":
                write_tiny_bert(folder)
            elif kind == "llama":
                write_tiny_llama(folder)
            else:
                write_tiny_seq2seq(folder, "t5")
            self.made[kind] = str(folder)
        return self.made[kind]

    def path_of(self, task: str) -> str:
        """A folder `from_pretrained` reads (the built-in names resolved)."""
        from tunelab.models import resolve_model

        return resolve_model(self.for_task(task))


# ----------------------------------------------------------------------------- checks


class Checker:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.cuda = args.device == "cuda"
        self.models = Models(work, builtin=self.cuda and args.models == "builtin")
        self.rows: list[Row] = []
        self.runs: dict[str, Path] = {}  # check name -> its run folder
        self.data: dict[str, tuple[Path, Path]] = {}

    def files(self, task: str) -> tuple[Path, Path]:
        if task not in self.data:
            self.data[task] = (task_files(task, self.work / "data" / task, 64, 1),
                               task_files(task, self.work / "data" / task, 8, 2))  # fmt: skip
        return self.data[task]

    def overrides(self, task: str, method: str, out: Path, *extra: str) -> list[str]:
        train, validation = self.files(task)
        length = 32 if not self.models.builtin else 128
        return [f"model={self.models.for_task(task)}", f"task={task}", f"method={method}", f"data.train={train}",
                f"data.validation={validation}", f"output_dir={out}", f"train.max_steps={self.args.steps}",
                f"train.batch_size={BATCH}", f"data.max_length={length}", "train.progress_bar=false",
                "train.eval_each_epoch=false", f"generation.eval_samples={0 if self.args.quick else 2}",
                "generation.eval_max_new_tokens=4",
                "generation.compare_base=false", *TASK_SETTINGS.get(task, []), *extra]  # fmt: skip

    def record(self, name: str, body: Callable[[], tuple[float | None, float | None]]) -> Row:
        """Run one check; a ConfigError (tunelab refusing the combination, with its reason) is
        a skip, any other exception a failure."""
        from tunelab.errors import ConfigError

        began = time.perf_counter()
        reset_peak(self.cuda)
        try:
            tokens_per_s, peak = body()
            row = Row(name, tokens_per_s, peak if peak is not None else read_peak(self.cuda))
        except Skip as e:
            row = Row(name, result=f"skipped: {e}")
        except ConfigError as e:
            row = Row(name, result=f"skipped: {str(e).splitlines()[0]}")
        except Exception as e:  # noqa: BLE001 - every failure becomes a row of the table
            traceback.print_exc()
            row = Row(
                name, result=f"fail: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            )
        self.rows.append(row)
        print(f"[{time.perf_counter() - began:6.1f}s] {name}: {row.result}", file=sys.stderr, flush=True)
        return row

    def train(self, name: str, task: str, method: str, *extra: str) -> None:
        from tunelab.run import train

        out = self.work / "runs" / name.replace(" ", "_").replace("/", "-")

        def body() -> tuple[float | None, float | None]:
            train(overrides=self.overrides(task, method, out, *extra), overwrite=True)
            self.runs[name] = out
            report = json.loads((out / "eval.json").read_text())
            return report["train"]["tokens_per_s"], None

        self.record(name, body)

    def precision(self, name: str) -> None:
        """bf16 or fp16 autocast, and that the run says it computed in it."""
        from tunelab.device import pick_device
        from tunelab.run import train

        out = self.work / "runs" / name

        def body() -> tuple[float | None, float | None]:
            if name == "fp16" and pick_device().type != "cuda":
                raise Skip("fp16 autocast and its GradScaler need a CUDA GPU")
            train(
                overrides=self.overrides("classification", "lora", out, f"train.precision={name}"),
                overwrite=True,
            )
            used = json.loads((out / "env.json").read_text())["precision"]["used"]
            if used != name:
                raise AssertionError(f"train.precision={name} computed in {used}")
            return json.loads((out / "eval.json").read_text())["train"]["tokens_per_s"], None

        self.record(f"{name} autocast (classification lora)", body)

    def qlora(self) -> None:
        from tunelab.config import QUANTIZE_NEEDS, load_config
        from tunelab.errors import ConfigError
        from tunelab.run import train

        out = self.work / "runs" / "qlora"

        def body() -> tuple[float | None, float | None]:
            if not self.cuda:
                try:
                    load_config(overrides=self.overrides("causal-lm", "lora", out, "lora.quantize=4bit"))
                except ConfigError as e:
                    if str(e) != QUANTIZE_NEEDS:
                        raise AssertionError(f"refused with another message: {e}") from None
                    raise Skip(str(e)) from None
                raise AssertionError("lora.quantize=4bit was not refused on the CPU")
            train(overrides=self.overrides("causal-lm", "lora", out, "lora.quantize=4bit"), overwrite=True)
            return json.loads((out / "eval.json").read_text())["train"]["tokens_per_s"], None

        self.record("QLoRA 4-bit (causal-lm lora)", body)

    def fsdp(self) -> None:
        out = self.work / "runs" / "fsdp"

        def body() -> tuple[float | None, float | None]:
            gpus = torch.cuda.device_count() if self.cuda else 0
            if self.cuda and gpus < 2:
                raise Skip(f"{gpus} GPU: FSDP needs 2 or more (NCCL takes one process per GPU)")
            nproc = gpus if self.cuda else 2
            command = [sys.executable, "-m", "tunelab", "train", "--nproc", str(nproc),
                       *self.overrides("causal-lm", "full", out, "train.distributed=fsdp")]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(
                    f"torchrun exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
                )
            t = json.loads((out / "eval.json").read_text())["train"]
            peak = t.get("peak_gpu_mb") if self.cuda else t["peak_rss_mb"]
            return t["tokens_per_s"], peak

        self.record(f"FSDP causal-lm full ({'NCCL' if self.cuda else 'gloo, 2 processes'})", body)

    def generation(self, source: str) -> None:
        from tunelab.run import load

        def body() -> tuple[float | None, float | None]:
            if source not in self.runs:
                raise Skip(f"needs the '{source}' run, which did not pass")
            run = load(self.runs[source])
            prompt = run.task.prompt_for("the movie was", run.tokenizer, [])
            run.generate([prompt], max_new_tokens=GENERATED)  # warm-up
            began = time.perf_counter()
            (text,) = run.generate([prompt], max_new_tokens=GENERATED)
            seconds = time.perf_counter() - began
            return len(run.tokenizer(text, add_special_tokens=False)["input_ids"]) / seconds, None

        self.record("generation (causal-lm lora run)", body)

    def serve(self, source: str) -> None:
        def body() -> tuple[float | None, float | None]:
            if source not in self.runs:
                raise Skip(f"needs the '{source}' run, which did not pass")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(self.runs[source]), "--port",
                                       str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            try:
                deadline = time.monotonic() + 180
                while True:
                    if server.poll() is not None:
                        raise RuntimeError(f"the server exited {server.returncode}: "
                                           f"{(server.stderr.read() if server.stderr else b'').decode()[-300:]}")  # fmt: skip
                    try:
                        with urllib.request.urlopen(url + "/health", timeout=2) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise TimeoutError("the server did not answer /health within 180 s") from None
                        time.sleep(0.5)
                payload = json.dumps({"messages": [{"role": "user", "content": "the movie was"}],
                                      "max_tokens": GENERATED}).encode()  # fmt: skip
                request = urllib.request.Request(url + "/v1/chat/completions", data=payload,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                began = time.perf_counter()
                with urllib.request.urlopen(request, timeout=300) as r:
                    answer = json.loads(r.read())
                seconds = time.perf_counter() - began
                if answer["choices"][0]["message"]["role"] != "assistant":
                    raise AssertionError(f"unexpected answer: {answer}")
                peak = gpu_memory_of(server.pid) if self.cuda else read_peak(False, server.pid)
                return answer["usage"]["completion_tokens"] / seconds, peak
            finally:
                server.terminate()
                server.wait(timeout=30)

        self.record("serve: one /v1/chat/completions request", body)

    def peer(self, task: str) -> None:
        """The Hugging Face peer (Trainer + peft LoRA) on the same rows, model, batch and steps."""

        def body() -> tuple[float | None, float | None]:
            from peft import LoraConfig, TaskType, get_peft_model
            from transformers import (
                AutoModelForCausalLM,
                AutoModelForSequenceClassification,
                AutoTokenizer,
                Trainer,
                TrainingArguments,
            )

            from tunelab.device import resolve_precision
            from tunelab.models import quiet_transformers

            path, (train_file, _) = self.models.path_of(task), self.files(task)
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if task == "classification":
                with open(train_file, newline="") as f:
                    rows = list(csv.DictReader(f))
                labels = sorted({r["label"] for r in rows})
                texts = [r["text"] for r in rows]
                with quiet_transformers():
                    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
                kind, targets = TaskType.SEQ_CLS, [labels.index(r["label"]) for r in rows]
            else:
                pairs = [json.loads(line) for line in train_file.read_text().splitlines()]
                eos = tokenizer.eos_token or ""
                texts = [
                    f"### Instruction:\n{p['instruction']}\n\n### Response:\n{p['output']}{eos}"
                    for p in pairs
                ]
                with quiet_transformers():
                    model = AutoModelForCausalLM.from_pretrained(path)
                kind, targets = TaskType.CAUSAL_LM, []
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            model = get_peft_model(model, LoraConfig(task_type=kind, r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules="all-linear"))  # fmt: skip
            length = 32 if not self.models.builtin else 128
            encoded = tokenizer(texts, truncation=True, max_length=length)
            examples = [{"input_ids": ids, "attention_mask": mask} for ids, mask in
                        zip(encoded["input_ids"], encoded["attention_mask"])]  # fmt: skip
            for n, e in enumerate(examples):
                e["labels"] = targets[n] if targets else list(e["input_ids"])
            counted = [0]

            def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
                longest = max(len(e["input_ids"]) for e in batch)
                counted[0] += sum(len(e["input_ids"]) for e in batch)
                pad = tokenizer.pad_token_id

                def padded(key: str, value: int) -> torch.Tensor:
                    return torch.tensor([e[key] + [value] * (longest - len(e[key])) for e in batch])

                out = {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0)}
                out["labels"] = (
                    padded("labels", -100) if not targets else torch.tensor([e["labels"] for e in batch])
                )
                return out

            bf16 = resolve_precision("auto", torch.device(self.args.device)) == torch.bfloat16
            arguments = TrainingArguments(
                output_dir=str(self.work / f"peer-{task}"), per_device_train_batch_size=BATCH,
                max_steps=self.args.steps, learning_rate=1e-3, bf16=bf16, use_cpu=not self.cuda, report_to="none",
                save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, remove_unused_columns=False,
            )  # fmt: skip
            trainer = Trainer(model=model, args=arguments, train_dataset=examples, data_collator=collate)
            began = time.perf_counter()
            trainer.train()
            if self.cuda:
                torch.cuda.synchronize()
            return counted[0] / (time.perf_counter() - began), None

        self.record(f"HF peer: {task} lora (Trainer + peft)", body)


class Skip(Exception):
    """A check that does not apply here; its message says why."""


# ----------------------------------------------------------------------------- table


def table(rows: list[Row], header: str) -> str:
    def number(value: float | None) -> str:
        return "" if value is None else f"{value:,.{0 if value >= 100 else 1}f}"

    memory = "peak GPU MB" if "cuda" in header else "peak RSS MB"
    lines = [header, "", f"| check | tokens/s | {memory} | result |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        lines.append(
            f"| {r.check} | {number(r.tokens_per_s)} | {number(r.peak_mb)} | {r.result.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda where there is one"
    )
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per training check")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--quick", action="store_true",
                        help="CI's reduced set: classification full and lora, causal-lm lora, bf16, fp16, QLoRA, "
                             "generation and the classification peer (no serve, SFT peer or FSDP)")  # fmt: skip
    parser.add_argument("--models", choices=["builtin", "tiny"], default="builtin",
                        help="on CUDA: the built-in models (default) or tiny random ones; the CPU always uses tiny ones")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # before CUDA is first touched; the child processes inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run with --device cpu",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda":
        import transformers

        name = torch.cuda.get_device_name(0)
        header = (f"gpu_check on cuda: {torch.cuda.device_count()} x {name}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, {args.steps} steps per check")  # fmt: skip
    else:
        header = f"gpu_check on cpu ({os.cpu_count()} cores), torch {torch.__version__}, {args.steps} steps per check"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        checker = Checker(args, work)
        grid = QUICK_GRID if args.quick else [(t, m) for t in TASK_NAMES for m in METHOD_NAMES]
        for task, method in grid:
            checker.train(f"{task} {method}", task, method)
        checker.precision("bf16")
        checker.precision("fp16")
        checker.qlora()
        checker.generation("causal-lm lora")
        checker.peer("classification")
        if not args.quick:  # the slow ones: 8-25 s each on a busy 2-core CPU (serve and FSDP start processes)
            checker.serve("causal-lm lora")
            checker.peer("causal-lm")
            checker.fsdp()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(checker.rows, header)
    print(text)
    if args.out:
        tmp = Path(args.out).with_name(f".{Path(args.out).name}.partial")
        tmp.write_text(text)
        tmp.replace(args.out)
    return 1 if any(r.result.startswith("fail") for r in checker.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
