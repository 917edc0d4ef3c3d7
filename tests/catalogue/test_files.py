"""Catalogue rows: the files train, predict, eval, export and compare read and write (see
harness.py for what each row is held to), and the tests a row cannot express: `--overwrite`
replacing a real run only once the new one has finished, a full disk, a read-only place, and
the base model an adapter export names."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import SafetensorError

import tunelab.outputs
import tunelab.run
from tests.catalogue.harness import Case, check, snapshot
from tests.conftest import sentiment_rows
from tunelab.cli import main
from tunelab.compare import compare_folder
from tunelab.config import load_config
from tunelab.export import portable_base
from tunelab.methods import METHODS

TRAIN = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in sentiment_rows(24))
TEXTS = "text\ngood film\nbad plot\n"
BASE = "model: {bert}\ntask: classification\nmethod: lora\ndata:\n  train: train.csv\n"
QUICK = ["train.max_steps=2", "train.progress_bar=false"]
RUN: dict[str, Path] = {}  # "run": a finished tiny LoRA run, trained once per module (the `finished` fixture)


def with_run(name: str = "run", drop: tuple[str, ...] = (), add: dict[str, str] | None = None,
             old: bool = False) -> Callable[[Path], None]:  # fmt: skip
    """Set-up that copies the finished run into the user folder as `name`, without the files in
    `drop`, with the files in `add`; `old`: as written before runs carried their marker."""

    def setup(folder: Path) -> None:
        shutil.copytree(RUN["run"], folder / name)
        for path in drop:
            (folder / name / path).unlink()
        for path, text in (add or {}).items():
            (folder / name / path).write_text(text)
        if old:
            (folder / name / tunelab.outputs.MARKER).unlink()

    return setup


def config(**keys: str) -> str:
    return BASE + "".join(f"{k}: {v}\n" for k, v in keys.items())


USER: dict[str, str | bytes] = {"data/train.csv": TRAIN, "data/notes.txt": "notes\n"}  # data and notes

CASES = [
    # train: where output_dir points
    Case(
        "overwrite-user-folder",
        ["train", "c.yaml", "--overwrite", *QUICK],
        "notes.txt",
        files={"c.yaml": config(output_dir="data").replace("train.csv", "data/train.csv"), **USER},
    ),
    Case(
        "overwrite-refusal-says-not-a-run",
        ["train", "c.yaml", "output_dir=data", "--overwrite", *QUICK],
        "only replaces a tunelab run",
        files={"c.yaml": BASE, "train.csv": TRAIN, **USER},
    ),
    Case(
        "output-dir-is-data-folder",
        ["train", "c.yaml", "output_dir=data", *QUICK],
        "not a tunelab run",
        files={"c.yaml": BASE, "train.csv": TRAIN, **USER},
    ),
    Case(
        "output-dir-is-cwd",
        ["train", "c.yaml", "output_dir=.", "--overwrite", *QUICK],
        "train.csv",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "output-dir-is-a-file",
        ["train", "c.yaml", "output_dir=notes.txt", *QUICK],
        "is a file",
        files={"c.yaml": BASE, "train.csv": TRAIN, "notes.txt": "x\n"},
    ),
    Case(
        "overwrite-output-dir-is-a-file",
        ["train", "c.yaml", "output_dir=notes.txt", "--overwrite", *QUICK],
        "is a file",
        files={"c.yaml": BASE, "train.csv": TRAIN, "notes.txt": "x\n"},
    ),
    Case(
        "output-dir-under-a-file",
        ["train", "c.yaml", "output_dir=train.csv/run", *QUICK],
        "train.csv is a file",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "output-dir-under-proc",
        ["train", "c.yaml", "output_dir=/proc/tunelab-run", *QUICK],
        "/proc",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "overwrite-run-holding-user-files",
        ["train", "c.yaml", "output_dir=run", "--overwrite", *QUICK],
        "my-analysis.md",
        files={"c.yaml": BASE, "train.csv": TRAIN},
        setup=with_run(add={"my-analysis.md": "what I found\n"}),
    ),
    Case(
        "overwrite-symlink-to-user-folder",
        ["train", "c.yaml", "output_dir=link", "--overwrite", *QUICK],
        "symbolic link",
        files={"c.yaml": BASE, "train.csv": TRAIN, **USER},
        setup=lambda folder: (folder / "link").symlink_to("data"),
    ),
    Case(
        "existing-run-needs-overwrite",
        ["train", "c.yaml", "output_dir=run", *QUICK],
        "--overwrite",
        files={"c.yaml": BASE, "train.csv": TRAIN},
        setup=with_run(),
    ),
    Case(
        "model-folder-without-weights",
        ["train", "c.yaml", *QUICK],
        "no weights",
        files={
            "c.yaml": BASE.replace("{bert}", "empty-model"),
            "train.csv": TRAIN,
            "empty-model/config.json": '{"model_type": "bert"}',
        },
    ),
    Case(
        "max-length-over-model-positions",
        ["train", "c.yaml", "data.max_length=100", *QUICK],
        "data.max_length=100",
        files={"c.yaml": BASE, "train.csv": TRAIN},
    ),
    Case(
        "block-size-over-model-positions",
        ["train", "c.yaml", "data.block_size=500", *QUICK],
        "data.block_size=500",
        files={
            "c.yaml": BASE.replace("{bert}", "{llama}").replace("classification", "causal-lm"),
            "train.csv": "text\ngood film\n",
        },
    ),
    # predict / eval: the run read, the file written
    Case("predict-missing-run", ["predict", "nope", "good film"], "not a finished tunelab run"),
    Case(
        "predict-run-without-adapter-weights",
        ["predict", "run", "good film"],
        "holds no weights",
        setup=with_run(drop=("model/adapter_model.safetensors",)),
    ),
    Case(
        "predict-output-folder-missing",
        ["predict", "run", "--file", "t.csv", "--output", "out/p.jsonl"],
        "does not exist",
        files={"t.csv": TEXTS},
        setup=with_run(),
    ),
    Case(
        "predict-output-is-a-folder",
        ["predict", "run", "--file", "t.csv", "--output", "data"],
        "is a folder",
        files={"t.csv": TEXTS, **USER},
        setup=with_run(),
    ),
    Case(
        "predict-output-under-a-file",
        ["predict", "run", "--file", "t.csv", "--output", "t.csv/p.jsonl"],
        "t.csv is a file",
        files={"t.csv": TEXTS},
        setup=with_run(),
    ),
    Case(
        "predict-output-exists",
        ["predict", "run", "--file", "t.csv", "--output", "mine.jsonl"],
        "mine.jsonl already exists",
        files={"t.csv": TEXTS, "mine.jsonl": "my own notes\n"},
        setup=with_run(),
    ),
    Case(
        "eval-output-exists",
        ["eval", "run", "--data", "t.csv", "--output", "mine.json"],
        "mine.json already exists",
        files={"t.csv": TEXTS, "mine.json": "{}\n"},
        setup=with_run(),
    ),
    Case(
        "augment-output-exists",
        ["augment", "model=x", "data.train=t.csv", "--output", "t.csv"],
        "t.csv already exists",
        files={"t.csv": TEXTS},
    ),
    Case(
        "augment-output-format",
        ["augment", "model=x", "data.train=t.csv", "--output", "aug.parquet"],
        "write augmented data as .csv",
        files={"t.csv": TEXTS},
    ),
    Case(
        "predict-on-unfinished-run",
        ["predict", "run", "good film"],
        "unfinished attempt",
        files={".run.partial/config.yaml": "model: x\n"},
    ),
    Case("eval-missing-run", ["eval", "nope"], "not a finished tunelab run"),
    Case(
        "eval-output-folder-missing",
        ["eval", "run", "--data", "train.csv", "--output", "out/m.json"],
        "does not exist",
        files={"train.csv": TRAIN},
        setup=with_run(),
    ),
    # export: the run read, the folder created
    Case(
        "export-missing-run", ["export", "nope", "--merge", "--out", "exported"], "not a finished tunelab run"
    ),
    Case(
        "export-into-user-folder",
        ["export", "run", "--merge", "--out", "data"],
        "already exists",
        files=USER,
        setup=with_run(),
    ),
    Case(
        "export-under-a-file",
        ["export", "run", "--merge", "--out", "data/notes.txt/x"],
        "notes.txt is a file",
        files=USER,
        setup=with_run(),
    ),
    Case(
        "export-under-proc",
        ["export", "run", "--merge", "--out", "/proc/tunelab-export"],
        "/proc",
        setup=with_run(),
    ),
    Case(
        "export-run-without-weights",
        ["export", "run", "--adapter-only", "--out", "exported"],
        "holds no weights",
        setup=with_run(drop=("model/adapter_model.safetensors",)),
    ),
    # compare: its folder
    Case(
        "compare-out-user-folder",
        ["compare", "c.yaml", "--methods", "lora", "--out", "data", *QUICK],
        "not a tunelab compare folder",
        files={"c.yaml": BASE, "train.csv": TRAIN, **USER},
    ),
    Case(
        "compare-output-dir-under-a-file",
        ["compare", "c.yaml", "--methods", "lora", *QUICK],
        "notes.txt is a file",
        files={"c.yaml": config(output_dir="notes.txt/run"), "train.csv": TRAIN, "notes.txt": "x\n"},
    ),
    Case(
        "compare-output-dir-beside-user-files",
        ["compare", "c.yaml", "--methods", "lora", *QUICK],
        "not a tunelab compare folder",
        files={
            "c.yaml": config(output_dir="data/run"),
            "train.csv": TRAIN,
            "data/compare-run/notes.txt": "mine\n",
        },
    ),
]


@pytest.fixture(scope="module")
def finished(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny LoRA run (2 steps), copied into the rows that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    tunelab.run.train(overrides=[f"model={models['bert']}", "method=lora", "task=classification",
                                 f"data.train={write(out.parent / 'train.csv', TRAIN)}", *QUICK,
                                 f"output_dir={out}"])  # fmt: skip
    RUN["run"] = out
    return out


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_catalogue(case: Case, tmp_path: Path, models: dict[str, Path], finished: Path,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    check(case, tmp_path / "user", models, capsys, monkeypatch)


def train_argv(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", f"model={models['bert']}", "method=lora", f"data.train={RUN['run'].parent / 'train.csv'}",
            *QUICK, f"output_dir={out}", *extra]  # fmt: skip


def test_overwrite_replaces_a_run_only_once_the_new_one_has_finished(
    finished: Path, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / tunelab.outputs.MARKER).unlink()  # a run written before the marker: known by its own files
    before = snapshot(out)

    def failing_fit(*args: object, **kwargs: object) -> None:
        assert snapshot(out) == before, "the old run was touched before the new one finished"
        raise RuntimeError("training broke")

    with monkeypatch.context() as patch:
        patch.setattr(tunelab.run, "fit", failing_fit)
        with pytest.raises(RuntimeError, match="training broke"):
            main(train_argv(models, out, "--overwrite", "seed=7"))
    assert snapshot(out) == before, "a failed re-run changed the old run"

    assert main(train_argv(models, out, "--overwrite", "seed=7")) == 0
    assert load_config(out / "config.yaml").seed == 7  # the new run is in place
    assert (out / tunelab.outputs.MARKER).is_file() and (
        out / "model" / "adapter_model.safetensors"
    ).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .partial, no old run left aside

    assert main(train_argv(models, out, "--overwrite", "seed=8")) == 0  # twice in a row, as make quickstart
    assert load_config(out / "config.yaml").seed == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_folder_carries_its_marker_while_unfinished(finished: Path, models: dict[str, Path],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "run"
    seen = []

    def fit(*args: object, **kwargs: object) -> None:
        seen.append((tunelab.run.partial_dir(out) / tunelab.outputs.MARKER).is_file())
        raise RuntimeError("stop")

    monkeypatch.setattr(tunelab.run, "fit", fit)
    with pytest.raises(RuntimeError):
        main(train_argv(models, out))
    assert seen == [True]
    assert tunelab.outputs.is_run(tunelab.run.partial_dir(out))


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
            'left on device" })'
        ),
    ],
    ids=["oserror", "safetensors"],
)
def test_a_full_disk_while_saving_says_so_and_leaves_nothing_hidden(
    error: Exception, finished: Path, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)

    def save(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(METHODS["lora"], "save", save)
    assert main(train_argv(models, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "removed" in lines[0], err
    assert snapshot(out) == before  # the previous run is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no hidden .partial blocks a re-run


def test_a_full_disk_with_a_checkpoint_keeps_it_and_says_how_to_resume_or_clear(
    finished: Path, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "run"

    def save(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(METHODS["lora"], "save", save)
    assert main(train_argv(models, out, "train.checkpoint_steps=1")) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")][0]
    partial = tunelab.run.partial_dir(out)
    assert "no space left" in line and f"--resume {out}" in line and f"delete {partial}" in line
    assert tunelab.outputs.is_run(partial)
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0  # once there is room again, it finishes
    assert (out / "eval.json").is_file() and not partial.exists()


def test_a_read_only_place_fails_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded the model before checking the output folder")

    monkeypatch.setattr(tunelab.outputs.tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(tunelab.run, "load_inputs", never)
    monkeypatch.setattr(tunelab.run.Run, "load", never)
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "model=x", "data.train=t.csv", "output_dir=mounted/run"],
                 ["export", "run", "--merge", "--out", "mounted/export"],
                 ["predict", "run", "--file", "t.csv", "--output", "p.jsonl"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "read-only" in err, err
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_full_disk_leaves_nothing(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import tunelab.export

    def full(run: object, tmp: Path, batch: object) -> dict[str, object]:
        (tmp / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tunelab.export, "_export_adapter", full)
    out = tmp_path / "deep" / "er" / "export"
    assert main(["export", str(finished), "--adapter-only", "--out", str(out)]) == 2
    assert "no space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the export nor the folders made for it


def test_adapter_export_names_its_base_portably(finished: Path, tmp_path: Path) -> None:
    assert portable_base("minilm-l6") == {"base_model": "minilm-l6",
                                          "base_model_hub_id": "sentence-transformers/all-MiniLM-L6-v2"}  # fmt: skip
    assert portable_base("org/model") == {"base_model": "org/model"}
    out = tmp_path / "export"
    assert main(["export", str(finished), "--adapter-only", "--out", str(out)]) == 0
    given = load_config(finished / "config.yaml").model  # the path as the config gave it
    assert json.loads((out / "export.json").read_text())["base_model"] == given
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == given
    assert "site-packages" not in (out / "export.json").read_text()


def test_compare_writes_beside_the_configs_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "exp"
    config = load_config(overrides=["model=m", "data.train=t.csv", f"output_dir={exp / 'sentiment'}"])
    assert compare_folder(config, None, None) == exp / "compare-sentiment"
    assert compare_folder(config, None, str(tmp_path / "mine")) == tmp_path / "mine"
    config.output_dir = None
    assert compare_folder(config, "configs/sst.yaml", None) == Path("runs/compare-sst")
    assert not (tmp_path / "runs").exists() and not exp.exists()  # choosing creates nothing


def test_is_run_knows_runs_with_and_without_their_marker(finished: Path, tmp_path: Path) -> None:
    assert tunelab.outputs.is_run(finished)
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    (old / tunelab.outputs.MARKER).unlink()
    assert tunelab.outputs.is_run(old)  # config.yaml + env.json + eval.json + model/
    (old / "eval.json").unlink()
    assert not tunelab.outputs.is_run(old)
    assert not tunelab.outputs.is_run(tmp_path / "missing")
    partial = tmp_path / ".old.partial"  # an unfinished run written before the marker
    partial.mkdir()
    assert not tunelab.outputs.is_run(partial)
    (partial / "config.yaml").write_text((finished / "config.yaml").read_text())
    assert tunelab.outputs.is_run(partial)
