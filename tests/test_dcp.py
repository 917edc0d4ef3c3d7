"""Sharded FSDP checkpoints (torch.distributed.checkpoint): every process writes its own shards,
nothing is gathered on save, and a run resumes on a different number of processes (2 -> 1 and
1 -> 2) to the metrics of an uninterrupted run, with a final model that loads like any other.

One chain of runs, to stay fast: a run on 2 processes is killed (SIGKILL through the test hook
TUNELAB_TEST_CRASH_AT, as in tests/test_crash.py) right after its second checkpoint (step 6);
it resumes on 1 process, which writes one-process checkpoints and is killed once its eval.json
is written (all its checkpoints still there); a copy cut back to its step-9 checkpoint (what a
kill just after that checkpoint leaves) resumes on 2 processes. The uninterrupted reference is
one process with the same global batch (8): 2 processes x 4 follow it (tests/test_dist.py), and
a resumed run keeps the checkpoint's global batch, so every run sees the same data in the same
order. Not bit for bit: gradient sums are added in another order across processes, so losses,
metrics and final weights are compared at rel 1e-3, abs 1e-5 (measured: losses within 1e-7
relative, weights within 3e-6 absolute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.checkpoint import CRASH_AT, checkpoint_dirs

from .conftest import sentiment_rows, write_csv, write_tiny_bert

BATCH = 8  # the global batch: 64 rows -> 8 steps an epoch, 16 in all


def args(folder: Path, out: Path, batch: int) -> list[str]:
    return ["train", f"model={folder / 'bert'}", "method=full", "full.train_embeddings=true",
            f"data.train={folder / 'train.csv'}", f"data.validation={folder / 'validation.csv'}",
            "train.epochs=2", f"train.batch_size={batch}", "train.precision=fp32", "train.learning_rate=1e-2",
            "train.distributed=fsdp", "train.checkpoint_steps=3", "train.keep_checkpoints=3", "train.eval_steps=4",
            "train.log_steps=1", "train.progress_bar=false", f"output_dir={out}"]  # fmt: skip


def tunelab(argv: list[str], nproc: int, crash: str = "") -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT}
    env.update(OMP_NUM_THREADS="1", **({CRASH_AT: crash} if crash else {}))
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    return subprocess.Popen([sys.executable, "-m", "tunelab", *argv, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def finish(process: subprocess.Popen[str], ok: bool = True) -> str:
    _, stderr = process.communicate(timeout=300)
    assert (process.returncode == 0) == ok, stderr[-3000:]
    return stderr


def losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in lines if "loss" in e and "split" not in e]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dcp")
    write_tiny_bert(folder / "bert", dropout=0.0)  # no dropout: each process draws its own masks
    write_csv(folder / "train.csv", sentiment_rows(64, seed=1))
    write_csv(folder / "validation.csv", sentiment_rows(32, seed=2))
    reference = tunelab(args(folder, folder / "reference", BATCH), 1)
    two = tunelab(args(folder, folder / "two", BATCH // 2), 2, crash="checkpoint-prune:2")  # alongside
    finish(two, ok=False)
    partial = folder / ".two.partial"
    shards = folder / "two-step-6"
    shutil.copytree(checkpoint_dirs(partial / "checkpoints")[-1], shards)  # before the resume prunes it
    to_one = finish(
        tunelab(["train", "--resume", str(folder / "two")], 1, crash="final-checkpoints"), ok=False
    )
    one = folder / "one"
    shutil.copytree(partial, folder / ".one.partial")
    for leftover in ("eval.json", "model"):
        shutil.rmtree(folder / ".one.partial" / leftover, ignore_errors=True)
        (folder / ".one.partial" / leftover).unlink(missing_ok=True)
    written = checkpoint_dirs(folder / ".one.partial" / "checkpoints")
    assert [p.name for p in written] == ["step-000009", "step-000012", "step-000015"]
    for later in written[1:]:
        shutil.rmtree(later)
    shutil.copytree(written[0], folder / "one-step-9")  # the resume below removes it once it is done
    to_two = finish(tunelab(["train", "--resume", str(one)], 2))
    finish(reference)
    return {"reference": folder / "reference", "shards": shards, "two": folder / "two", "one": one,
            "one-shards": folder / "one-step-9", "to_one": to_one, "to_two": to_two}  # fmt: skip


def test_each_process_writes_its_own_shards(runs):
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint = runs["shards"]
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "optimizer.pt", "rng.pt", "state.json"]
    assert json.loads((checkpoint / "state.json").read_text())["global_batch"] == BATCH
    metadata = FileSystemReader(checkpoint).read_metadata()
    where = {(index.fqn, tuple(index.offset or ())): info.relative_path
             for index, info in metadata.storage_data.items()}  # fmt: skip
    matrices = {key: meta for key, meta in metadata.state_dict_metadata.items()
                if key.startswith(("model.", "best.", "optimizer.state.")) and len(getattr(meta, "size", ())) == 2}  # fmt: skip
    assert any(k.startswith("best.") for k in matrices) and any(k.endswith("exp_avg") for k in matrices)
    for key, meta in matrices.items():
        # FSDP shards dim 0: two chunks of half the rows, one in each process's file, never a whole tensor
        chunks = meta.chunks
        assert len(chunks) == 2, key
        assert all(c.sizes[0] < meta.size[0] for c in chunks), key
        assert {where[key, tuple(c.offsets)] for c in chunks} == {"__0_0.distcp", "__1_0.distcp"}, key
    sizes = [(checkpoint / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert max(sizes) < 0.7 * sum(sizes)  # neither process wrote the whole state
    # one process (train.distributed=fsdp without torchrun) writes the same format, in one file
    assert sorted(p.name for p in runs["one-shards"].glob("*.distcp")) == ["__0_0.distcp"]


def assert_like_reference(run: Path, reference: Path) -> None:
    expected, got = losses(reference), losses(run)
    assert [s for s, _ in got] == [s for s, _ in expected] and len(got) == 16
    for (step, x), (_, y) in zip(expected, got):
        assert y == pytest.approx(x, rel=1e-3, abs=1e-5), f"step {step}"
    first = json.loads((reference / "eval.json").read_text())["validation"]
    second = json.loads((run / "eval.json").read_text())["validation"]
    assert first.keys() == second.keys()
    for name, value in first.items():
        if isinstance(value, float):
            assert second[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    # and the final weights themselves (the metrics of a tiny model move little in 16 steps)
    (expected_file,) = (reference / "model").glob("*.safetensors")
    (got_file,) = (run / "model").glob("*.safetensors")
    expected_weights, got_weights = load_file(expected_file), load_file(got_file)
    assert expected_weights.keys() == got_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def test_two_processes_resume_on_one(runs):
    from tunelab.run import train

    assert "resuming from step-000006" in runs["to_one"]
    assert "saved by 2 process(es), resumed on 1; the global batch stays 8" in runs["to_one"]
    assert_like_reference(runs["two"].parent / ".two.partial", runs["reference"])
    run = train(resume=runs["two"])  # killed after its eval.json: put into place, without training
    assert (runs["two"] / "model").is_dir() and not (runs["two"] / "checkpoints").exists()
    assert run.predict(["a lovely warm film"])[0]["label"] in {"positive", "negative"}


def test_one_process_resumes_on_two(runs):
    from tunelab.run import Run

    assert "resuming from step-000009" in runs["to_two"]
    assert "saved by 1 process(es), resumed on 2; the global batch stays 8" in runs["to_two"]
    assert_like_reference(runs["one"], runs["reference"])
    loaded = Run.load(runs["one"])  # the final model is a plain folder, whatever wrote the checkpoints
    assert loaded.predict(["a lovely warm film"])[0]["label"] in {"positive", "negative"}


def test_other_checkpoints_refuse_another_number_of_processes(tmp_path):
    from tunelab.config import load_config
    from tunelab.dist import Dist
    from tunelab.errors import ConfigError
    from tunelab.loop import resumed_batch

    (tmp_path / "state.json").write_text(json.dumps({"world": 2, "distributed": "ddp", "result": {}}))
    with pytest.raises(ConfigError, match="saved by 2 process.*without FSDP"):
        resumed_batch(tmp_path, load_config(overrides=["train.batch_size=4"]), Dist())
    assert resumed_batch(tmp_path, load_config(overrides=["train.batch_size=4"]), Dist(1, 2)) == 8
