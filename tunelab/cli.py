"""The `tunelab` command: one sub-command per verb, each a thin wrapper over the Python API.

User mistakes (TunelabError) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from tunelab.errors import Interrupted, TunelabError
from tunelab.outputs import check_new_file, write_new
from tunelab.serve.limits import Limits
from tunelab.serve.limits import flag as limit_flag


def cmd_train(args: argparse.Namespace) -> int:
    if args.max_restarts is not None and args.max_restarts < 0:
        raise TunelabError(f"--max-restarts {args.max_restarts}: give 0 or more restarts")
    if (args.nproc and args.nproc > 1) or args.max_restarts:
        from tunelab.dist import launch

        argv = list(sys.argv[1:]) if args.argv is None else list(args.argv)
        rest, skip = [], False
        for arg in argv:  # drop `--nproc N`, `--max-restarts K` (or `=`); torchrun runs the rest
            if skip or arg.startswith(("--nproc=", "--max-restarts=")):
                skip = False
            elif arg in ("--nproc", "--max-restarts"):
                skip = True
            else:
                rest.append(arg)
        return launch(args.nproc or 1, rest, args.max_restarts or 0)
    from tunelab.run import train

    config, overrides = None, list(args.overrides)
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    if args.resume and (config or overrides):
        raise TunelabError("--resume RUN continues with the run's saved config; give no config or overrides")
    train(config, overrides=overrides, overwrite=args.overwrite, resume=args.resume)
    return 0


def format_metrics(metrics: dict[str, Any]) -> str:
    """A readable table: headline metrics, per-class scores, then the confusion matrix."""
    lines = [
        f"{k:<18}{v:.4f}" if isinstance(v, float) else f"{k:<18}{v}"
        for k, v in metrics.items()
        if isinstance(v, (int, float))
    ]
    per_class = metrics.get("per_class")
    if per_class:
        width = max(12, *(len(n) + 2 for n in per_class))
        lines += ["", f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
        for name, s in per_class.items():
            lines.append(
                f"{name:<{width}}{s['precision']:>10.4f}{s['recall']:>10.4f}"
                f"{s['f1']:>10.4f}{s['support']:>10}"
            )
    cm = metrics.get("confusion_matrix")
    if cm:
        width = max(8, *(len(n) + 2 for n in cm["labels"]))
        lines += [
            "",
            "confusion matrix (rows: true, columns: predicted)",
            " " * width + "".join(f"{n:>{width}}" for n in cm["labels"]),
        ]
        for name, row in zip(cm["labels"], cm["matrix"]):
            lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def format_versus(tuned: dict[str, Any], base: dict[str, Any]) -> str:
    """Tuned and un-tuned metrics side by side."""
    keys = [k for k, v in tuned.items() if isinstance(v, (int, float)) and k in base]
    lines = [f"{'':<14}{'tuned':>12}{'un-tuned':>12}"]
    for k in keys:
        a, b = tuned[k], base[k]
        lines.append(f"{k:<14}{a:>12.4f}{b:>12.4f}" if isinstance(a, float) else f"{k:<14}{a:>12}{b:>12}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.run import load

    if args.output:
        check_new_file(Path(args.output), "--output")  # before evaluating, not after
    run = load(args.run)
    column_flags(run, args)
    if args.samples is not None:
        from tunelab.config import validate

        run.config.generation.eval_samples = args.samples
        validate(run.config)
    if args.data:
        metrics = run.evaluate(args.data, baseline=False if args.no_baseline else None)
        out = Path(args.output) if args.output else run.path / f"eval-{Path(args.data).stem}.json"
        text = json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
        write_new(out, lambda tmp: tmp.write_text(text))
        base = metrics.get("baseline")
        print(format_versus(metrics, base) if base else format_metrics(metrics))
        print(f"\nwritten to {out}", file=sys.stderr)
        return 0
    report = json.loads((run.path / "eval.json").read_text())
    for split in ("validation", "test"):
        if split in report:
            base = report.get("baseline", {}).get(split)
            print(
                f"== {split}\n{format_versus(report[split], base) if base else format_metrics(report[split])}\n"
            )
    return 0


def format_prediction(result: dict[str, Any]) -> str:
    """One prediction as text: label (scores), labels (scores), a value, or entity lines."""
    if "generation" in result:
        return result["generation"]
    if "answer" in result:
        if result["answer"] is None:
            return f"(no answer)\t{result['score']:.4f}"
        return f"{result['answer']}\t{result['start']}-{result['end']}\t{result['score']:.4f}"
    if "masks" in result:
        return "\n".join([result["filled"]] + [", ".join(f"{c['token']} {c['score']:.4f}" for c in options)
                                               for options in result["masks"]])  # fmt: skip
    if "entities" in result:
        return "\n".join(f"{e['text']}\t{e['type']}\t{e['start']}-{e['end']}\t{e['score']:.4f}"
                         for e in result["entities"]) or "(no entities)"  # fmt: skip
    if "value" in result:
        return f"{result['value']:.6g}"
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["probabilities"].items())
    if "labels" in result:
        return f"{','.join(result['labels']) or '(none)'}\t({scores})"
    return f"{result['label']}\t({scores})"


def cmd_predict(args: argparse.Namespace) -> int:
    from tunelab.run import load

    question = args.question is not None or args.context is not None
    if (args.text is None) + (args.file is None) + (not question) != 2:
        raise TunelabError("give one of TEXT, --file FILE, or --question Q --context C to predict on")
    if question and (args.question is None or args.context is None):
        raise TunelabError("question answering needs both --question and --context")
    if args.output:
        check_new_file(Path(args.output), "--output")  # before predicting, not after
    run = load(args.run)
    column_flags(run, args)
    generation_options(run, args)
    if question:
        result = run.predict([args.question], [args.context])[0]
        print(json.dumps(result, ensure_ascii=False) if args.json else format_prediction(result))
        return 0
    if args.text is not None:
        for result in run.predict([args.text]):
            print(json.dumps(result, ensure_ascii=False) if args.json else format_prediction(result))
        return 0
    results = run.predict_file(args.file)
    skipped = [r["skipped"] for r in results if "skipped" in r]
    if skipped:  # blank rows keep their place in the output, so line N still answers row N
        print(f"tunelab: {len(skipped)} blank rows given no prediction ('skipped'): "
              f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)  # fmt: skip
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        write_new(Path(args.output), lambda tmp: tmp.write_text(lines))
        print(f"tunelab: {len(results)} predictions written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def column_flags(run: Any, args: argparse.Namespace) -> None:
    """--text-column / --text-pair-column / --label-column: the file's column names, for this
    command only (the run's saved config keeps its own)."""
    from tunelab.config import validate

    for name in ("text_column", "text_pair_column", "label_column"):
        if getattr(args, name, None) is not None:
            setattr(run.config.data, name, getattr(args, name))
    run.task.column_flags = True  # a missing column's message names these flags
    validate(run.config)


def add_column_flags(p: argparse.ArgumentParser, labels: bool) -> None:
    g = p.add_argument_group("columns (default: the names the run was trained with)")
    g.add_argument("--text-column", metavar="NAME", help="the column holding the input text")
    g.add_argument("--text-pair-column", metavar="NAME", help="the column holding the second text of a pair")
    if labels:
        g.add_argument("--label-column", metavar="NAME", help="the column holding the label")


def unknown_arguments(command: str, extra: list[str]) -> str:
    """The error for arguments no option takes: a --flag that names a config key (`--epochs=1`)
    is answered with the `key=value` to write instead (`train.epochs=1`)."""
    from tunelab.config import field_docs

    keys = [k for k, _, _ in field_docs()]
    for n, arg in enumerate(extra):
        if not arg.startswith("--") or command not in OVERRIDE_COMMANDS:
            continue
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not value and n + 1 < len(extra) and not extra[n + 1].startswith("-"):
            value = extra[n + 1]
        matches = [k for k in keys if k == name or k.endswith("." + name)]
        if not matches:
            near = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in keys], n=1)
            matches = [k for k in keys if near and k.endswith("." + near[0])]
        if matches:
            options = " or ".join(f"{k}={value or '...'}" for k in matches[:3])
            return (f"{arg} is not an option of tunelab {command}; config keys are set as key=value: "
                    f"write {options}")  # fmt: skip
    return f"unrecognized arguments: {' '.join(extra)} (see tunelab {command} --help)"


def generation_options(run: Any, args: argparse.Namespace) -> None:
    """Apply --max-new-tokens / --temperature / --top-p / --top-k / --repetition-penalty / --system."""
    from tunelab.config import validate

    options = run.config.generation
    if args.max_new_tokens is not None:
        options.max_new_tokens = args.max_new_tokens
    if args.temperature is not None:  # a temperature means sampling; 0 means greedy
        options.do_sample = args.temperature > 0
        options.temperature = args.temperature or options.temperature
    for name in ("top_p", "top_k", "system", "repetition_penalty"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    validate(run.config)  # names the bad option: generation.top_p ...


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.generation import text_streamer
    from tunelab.run import load

    run = load(args.run)
    if not run.task.generative:
        raise TunelabError(f"{args.run} is a {run.config.task} run; chat needs a causal-lm run")
    generation_options(run, args)
    interactive = sys.stdin.isatty()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    streamer = text_streamer(run.tokenizer, write)
    history: list[dict[str, str]] = []
    print(f"tunelab chat with {args.run}: /reset clears the conversation, /exit leaves", file=sys.stderr)
    while True:
        try:
            message = input("you> " if interactive else "")
        except EOFError:
            break
        message = message.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        write("assistant> ")
        answer = run.chat(history, message, streamer)
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export import export

    if args.onnx:  # encoders as ONNX Runtime graphs: tunelab/onnx_export.py
        from tunelab.onnx_export import export_onnx

        if args.merge or args.adapter_only:
            raise TunelabError("choose one: --merge, --adapter-only or --onnx")
        export_onnx(args.run, args.out, int8=args.int8, say=lambda m: print(m, file=sys.stderr))
        return 0
    if args.int8:
        raise TunelabError("--int8 quantizes an ONNX export: use it with --onnx")
    if args.gguf:  # decoders for llama.cpp / Ollama: tunelab/gguf_export/
        from tunelab.gguf_export import export_gguf

        if args.merge or args.adapter_only:
            raise TunelabError("choose one: --merge, --adapter-only, --onnx or --gguf")
        export_gguf(args.run, args.out, quant=args.quant or "f16", say=lambda m: print(m, file=sys.stderr))
        return 0
    if args.quant:
        raise TunelabError("--quant picks the GGUF weight type: use it with --gguf")
    if args.merge == args.adapter_only:
        raise TunelabError(
            "choose one: --merge (a plain Hugging Face model), --adapter-only (a PEFT adapter), "
            "--onnx (ONNX Runtime, encoders) or --gguf (llama.cpp / Ollama, decoders)"
        )
    export(args.run, args.out, merge=args.merge, say=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    limits = Limits(**{limit.name: getattr(args, limit.name) for limit in dataclasses.fields(Limits)})
    from tunelab.serve import serve  # FastAPI and uvicorn are optional: a one-line hint when missing

    serve(args.run, host=args.host, port=args.port, api_key=args.api_key, limits=limits, log=args.log)
    return 0


def cmd_studio(args: argparse.Namespace) -> int:
    from tunelab.studio import studio  # FastAPI and uvicorn are optional: a one-line hint when missing

    studio(runs=args.runs, data=args.data, host=args.host, port=args.port, reviews=args.reviews)
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    # the review package loads models (torch) and serves a page (FastAPI): imported when used
    if args.report or args.export:
        from tunelab.review.report import export_pairs, format_report, save_report

        if args.report:
            report, path = save_report(args.report)
            print(format_report(report))
            print(f"report written to {path}", file=sys.stderr)
        if args.export:
            if not args.output:
                raise TunelabError("--export DIR: give --output FILE for the pairs")
            n = export_pairs(args.export, args.format, args.output)
            print(f"wrote {n} {args.format} pairs to {args.output}", file=sys.stderr)
        return 0
    if not args.models or len(args.models) > 2 or (len(args.models) == 2) == args.baseline:
        raise TunelabError("review: give two models (tunelab review A B --prompts FILE), or one with --baseline "
                          "(tunelab review A --baseline --prompts FILE)")  # fmt: skip
    from tunelab.review.app import run_review_app
    from tunelab.review.command import start_review

    b = None if args.baseline else args.models[1]
    folder = start_review(args.models[0], b, args.prompts, args.dir)
    if not args.no_page:
        run_review_app(folder, args.host, args.port, args.reviewer)
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from tunelab.serve.feedback import export_feedback  # the serve layer; no torch needed

    n = export_feedback(args.log_dir, args.format, args.output, with_approved=args.approved)
    print(f"wrote {n} {args.format} rows to {args.output}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.compare import compare

    config, overrides = None, list(args.overrides)
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    losses = [loss.strip() for loss in (args.losses or "").split(",") if loss.strip()] or None
    compare(config, overrides, methods, seeds=args.seeds, epochs=args.epochs, budget=args.budget,
            lr_sweep=args.lr_sweep, max_memory=args.max_memory, max_time=args.max_time, out=args.out, losses=losses,
            say=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from tunelab.estimator import estimate

    config, overrides = None, list(args.overrides)
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    result = estimate(config, overrides=overrides, methods=args.methods, steps=args.steps)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    import dataclasses

    from tunelab.augment import augment_table
    from tunelab.config import load_config
    from tunelab.data import detect_format, write_rows
    from tunelab.tasks import TASKS

    output = Path(args.output)
    fmt = detect_format(output)
    if fmt not in ("csv", "tsv", "json", "jsonl"):
        raise TunelabError(f"--output {output}: write augmented data as .csv, .tsv, .json or .jsonl")
    check_new_file(output, "--output")  # before any work
    config_path, overrides = None, list(args.overrides)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    config = load_config(config_path, overrides)
    if config.data.augment.method == "none":
        config.data.augment = dataclasses.replace(config.data.augment, method="eda")
    if not config.data.train:
        raise TunelabError("set data.train=<file>: the training file to augment")
    table = TASKS[config.task](config).read(config.data.train)
    augmented = augment_table(table, config)
    write_new(output, lambda tmp: write_rows(tmp, augmented.rows, augmented.columns, fmt))
    print(f"tunelab: {len(table)} rows + {len(augmented) - len(table)} augmented written to {args.output}",
          file=sys.stderr)  # fmt: skip
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.datacheck import main as data_check

    config_path, overrides = None, list(args.overrides)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    return data_check(load_config(config_path, overrides), as_json=args.json, strict=args.strict)


def config_help() -> str:
    from tunelab.config import field_docs

    rows = field_docs()
    width = max(len(k) for k, _, _ in rows) + 2
    return "config keys (key=value):\n" + "\n".join(f"  {k:<{width}}{d} [default: {v}]" for k, d, v in rows)


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (causal-lm and seq2seq runs)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="longest answer, in tokens")
    g.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (0: greedy)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold")
    g.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    g.add_argument(
        "--repetition-penalty", type=float, metavar="R", help="penalise repeated tokens (1.0: none)"
    )
    g.add_argument("--system", metavar="TEXT", help="system prompt")


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as tunelab's one line (`error: tunelab serve: argument --port: ...`
    and where to look) instead of the usage text; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from tunelab import __version__

    parser = Parser(
        prog="tunelab",
        description="Fine-tune pretrained language models on your own data, then evaluate and use them.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="fine-tune a model",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="tunelab train [CONFIG.yaml] [key=value ...]",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="CONFIG|key=value",
        help="a YAML config file (optional, first), then overrides like train.epochs=1",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the tunelab run at output_dir when done")
    p.add_argument("--resume", metavar="RUN", help="continue an unfinished run from its latest checkpoint")
    p.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (torchrun)")
    p.add_argument("--max-restarts", type=int, metavar="K",
                   help="torchrun restarts the processes up to K times when one dies; they resume from the "
                   "latest checkpoint")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run (its saved report, or on a labelled file)")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="labelled file with the training columns")
    p.add_argument("--output", help="where to write the metrics JSON (default RUN/eval-<file>.json)")
    p.add_argument(
        "--no-baseline", action="store_true", help="generative runs: skip scoring the un-tuned model"
    )
    p.add_argument("--samples", type=int, metavar="N",
                   help="generative runs: rows to generate for BLEU/ROUGE (default: the run's generation.eval_samples)")  # fmt: skip
    add_column_flags(p, labels=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict labels (or generate answers) for a text or a file")
    p.add_argument("run", help="run directory")
    p.add_argument("text", nargs="?", help="one input text")
    p.add_argument(
        "--file",
        help="CSV/TSV/JSON/JSONL/Parquet file with the training text column "
        "(question answering: question and context columns, or SQuAD JSON)",
    )
    p.add_argument("--question", help="question answering: the question (with --context)")
    p.add_argument("--context", help="question answering: the passage that holds the answer")
    p.add_argument("--json", action="store_true", help="print the prediction as one JSON object")
    p.add_argument("--output", help="write JSON lines here instead of standard output")
    add_column_flags(p, labels=False)
    add_generation_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("chat", help="talk with a causal-lm run in the terminal (streams the answers)")
    p.add_argument("run", help="run directory")
    add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="write a checked Hugging Face model or PEFT adapter folder")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument(
        "--merge", action="store_true", help="merge into plain weights: AutoModelFor...from_pretrained(OUT)"
    )
    p.add_argument(
        "--adapter-only", action="store_true", help="the PEFT adapter (+ head): PeftModel.from_pretrained"
    )
    p.add_argument("--onnx", action="store_true", help="encoders: an ONNX graph for ONNX Runtime, checked")
    p.add_argument("--int8", action="store_true", help="with --onnx: also a dynamically quantized int8 graph")
    p.add_argument("--gguf", action="store_true",
                   help="causal-lm decoders: one GGUF file for llama.cpp / Ollama (+ Modelfile), checked")  # fmt: skip
    p.add_argument("--quant", metavar="TYPE", help="with --gguf: f16 (default), bf16, q8_0, q4_0 or q4_k_m")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="train every method on the same data and budget; report and recommend",
                       description="tunelab compare [CONFIG.yaml] [key=value ...] --methods none,full,lora,...")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="CONFIG|key=value", help="as for train")
    p.add_argument("--methods", default="none,full,freeze,lora,adapter,prefix,prompt,ia3",
                   help="comma-separated: none (no training) and any of the methods (default: all)")  # fmt: skip
    p.add_argument("--losses", help="task=preference: comma-separated losses (dpo, ipo, orpo, simpo, kto); a "
                   "row for every method with every loss")  # fmt: skip
    p.add_argument("--epochs", type=float, help="epochs for every method (default: the config's)")
    p.add_argument("--budget", help="time limit per run, e.g. 10m, 90s, 1h (training stops there, best kept)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method (mean ± std in the report)")
    p.add_argument("--lr-sweep", action="store_true", help="try each method's default LR x 1/3, 1, 3")
    p.add_argument(
        "--max-memory", type=float, metavar="MB", help="recommend the best method within this peak memory"
    )
    p.add_argument(
        "--max-time", type=float, metavar="MIN", help="recommend the best method within this training time"
    )
    p.add_argument("--out", help="folder for the runs and report (default compare-<name> beside output_dir)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("estimate", help="predict peak memory and time per epoch of each method, before training",
                       description="tunelab estimate [CONFIG.yaml] [key=value ...] [--methods lora,full] [--steps N]")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="CONFIG|key=value", help="as for train")
    p.add_argument(
        "--methods", help="comma-separated methods to estimate besides the config's own (default: all)"
    )
    p.add_argument("--steps", type=int, default=6, metavar="N",
                   help="how many of the epoch's steps each method runs, twice each (default 6)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("serve", help="serve a run or exported model over HTTP (OpenAI-style API + a page)")
    p.add_argument(
        "run", help="run directory, a folder from tunelab export (--merge, --onnx, --gguf), or a .gguf file"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set TUNELAB_API_KEY)")
    p.add_argument("--log", metavar="DIR", help="store every request and answer, with an id, and take "
                   "POST /v1/feedback, in DIR/feedback.sqlite (off by default)")  # fmt: skip
    for limit in dataclasses.fields(Limits):  # defaults and help are written once, in Limits
        p.add_argument(limit_flag(limit.name), type=type(limit.default), default=limit.default,
                       help=f"{limit.metadata['help']} (default %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("augment", help="write the augmented training data to a file for inspection",
                       description="tunelab augment [CONFIG.yaml] [key=value ...] --output FILE")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="CONFIG|key=value", help="as for train (data.augment.*)")
    p.add_argument("--output", required=True, help="where to write: .csv, .tsv, .json or .jsonl")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("review", help="blind side-by-side human review of two models' answers",
                       description="tunelab review A B --prompts FILE | A --baseline --prompts FILE | "
                       "--report DIR | --export DIR --format preference --output FILE")  # fmt: skip
    p.add_argument("models", nargs="*", metavar="A [B]", help="run directories or exported folders")
    p.add_argument("--prompts", help="the prompts: a .txt file (one a line), or CSV/JSON/JSONL with 'prompt'")
    p.add_argument("--baseline", action="store_true", help="B is the model A started from")
    p.add_argument("--dir", help="the review folder (default reviews/A-vs-B); an existing one resumes")
    p.add_argument("--reviewer", help="your name, filled in on the page")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--no-page", action="store_true", help="make the review folder and stop")
    p.add_argument("--report", metavar="DIR", help="print the review's report and write DIR/report.json")
    p.add_argument("--export", metavar="DIR", help="write the decided pairs as training data (with --output)")
    p.add_argument("--format", default="preference", choices=["preference"], help="export format")
    p.add_argument("--output", help="the JSON-lines file --export writes (must not exist)")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("feedback", help="turn the feedback a served model collected into training data")
    p = p.add_subparsers(dest="feedback_command", required=True, metavar="export").add_parser(
        "export", help="write training rows from a serve --log folder",
        description="tunelab feedback export DIR --format sft|preference|classification --output FILE")  # fmt: skip
    p.add_argument("log_dir", metavar="DIR", help="the folder given to tunelab serve --log")
    p.add_argument("--format", required=True, choices=["sft", "preference", "classification"],
                   help="sft: corrected answers; preference: {prompt, chosen, rejected} pairs from corrected "
                   "answers; classification: corrected labels")  # fmt: skip
    p.add_argument("--output", required=True, help="the JSON-lines file to write (must not exist)")
    p.add_argument("--approved", action="store_true", help="also take up-rated answers as they were (sft, "
                   "classification)")  # fmt: skip
    p.set_defaults(func=cmd_feedback_export)

    p = sub.add_parser("data", help="check the data before training (tunelab data check CONFIG)")
    p = p.add_subparsers(dest="data_command", required=True, metavar="check").add_parser(
        "check", help="what training makes of the data: counts, lengths, cuts, leakage, chat targets",
        description="tunelab data check [CONFIG.yaml] [key=value ...] [--json] [--strict]")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="CONFIG|key=value", help="as for train")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too (errors exit 2)")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("studio", help="a local web app: runs, live curves, new runs, compare, playground")
    p.add_argument("--runs", default="runs", help="the runs folder (default ./runs)")
    p.add_argument("--data", default=".", help="the folder new runs pick data files from (default .)")
    p.add_argument("--reviews", default="reviews",
                   help="the folder of tunelab review folders (default ./reviews)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs the token printed at start)")  # fmt: skip
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_studio)
    return parser


OVERRIDE_COMMANDS = ("train", "augment", "compare", "estimate", "data")  # take CONFIG key=value ...


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` overrides may come before or after flags: `train a=1 --overwrite b=2`.
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if args.command in OVERRIDE_COMMANDS and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        print(f"error: {unknown_arguments(args.command, extra)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"tunelab: {e}", file=sys.stderr)
        return 130
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
