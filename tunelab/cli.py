"""The `tunelab` command: one sub-command per verb, each a thin wrapper over the Python API.

User mistakes (TunelabError) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import Interrupted, TunelabError


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1:
        from tunelab.dist import launch

        argv = list(sys.argv[1:]) if args.argv is None else list(args.argv)
        rest, skip = [], False
        for arg in argv:  # drop `--nproc N` or `--nproc=N`; torchrun runs the rest
            if skip or arg.startswith("--nproc="):
                skip = False
            elif arg == "--nproc":
                skip = True
            else:
                rest.append(arg)
        return launch(args.nproc, rest)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.run import load

    run = load(args.run)
    if args.data:
        metrics = run.evaluate(args.data)
        out = Path(args.output) if args.output else run.path / f"eval-{Path(args.data).stem}.json"
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(format_metrics(metrics))
        print(f"\nwritten to {out}", file=sys.stderr)
        return 0
    report = json.loads((run.path / "eval.json").read_text())
    for split in ("validation", "test"):
        if split in report:
            print(f"== {split}\n{format_metrics(report[split])}\n")
    return 0


def format_prediction(result: dict[str, Any]) -> str:
    """One prediction as text: label (scores), labels (scores), a value, or entity lines."""
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

    if (args.text is None) == (args.file is None):
        raise TunelabError("give either TEXT or --file FILE to predict on")
    run = load(args.run)
    if args.text is not None:
        for result in run.predict([args.text]):
            print(format_prediction(result))
        return 0
    results = run.predict_file(args.file)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        Path(args.output).write_text(lines)
        print(f"tunelab: {len(results)} predictions written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    import dataclasses

    from tunelab.augment import augment_table
    from tunelab.config import load_config
    from tunelab.data import write_rows
    from tunelab.tasks import TASKS

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
    write_rows(args.output, augmented.rows, augmented.columns)
    print(f"tunelab: {len(table)} rows + {len(augmented) - len(table)} augmented written to {args.output}",
          file=sys.stderr)  # fmt: skip
    return 0


def config_help() -> str:
    from tunelab.config import field_docs

    rows = field_docs()
    width = max(len(k) for k, _, _ in rows) + 2
    return "config keys (key=value):\n" + "\n".join(f"  {k:<{width}}{d} [default: {v}]" for k, d, v in rows)


def build_parser() -> argparse.ArgumentParser:
    from tunelab import __version__

    parser = argparse.ArgumentParser(
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--resume", metavar="RUN", help="continue an unfinished run from its latest checkpoint")
    p.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run (its saved report, or on a labelled file)")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="labelled file with the training columns")
    p.add_argument("--output", help="where to write the metrics JSON (default RUN/eval-<file>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict labels for a text or a file")
    p.add_argument("run", help="run directory")
    p.add_argument("text", nargs="?", help="one input text")
    p.add_argument("--file", help="CSV/TSV/JSON/JSONL/Parquet file with the training text column")
    p.add_argument("--output", help="write JSON lines here instead of standard output")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("augment", help="write the augmented training data to a file for inspection",
                       description="tunelab augment [CONFIG.yaml] [key=value ...] --output FILE")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="CONFIG|key=value", help="as for train (data.augment.*)")
    p.add_argument("--output", required=True, help="where to write: .csv, .tsv, .json or .jsonl")
    p.set_defaults(func=cmd_augment)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` overrides may come before or after flags: `train a=1 --overwrite b=2`.
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if args.command in ("train", "augment") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
