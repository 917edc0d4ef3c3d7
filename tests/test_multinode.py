"""Many machines and elastic recovery, on one machine: two torchrun agents joined as two nodes
(c10d rendezvous on 127.0.0.1, one CPU process each, gloo) follow the loss trajectory of one
process with the same global batch; and under `--max-restarts`, a worker killed mid-training
(SIGKILL, through the test hook TUNELAB_TEST_CRASH_AT=train-step:N@RANK) makes torchrun restart
the group, which continues from the last checkpoint by itself and ends with the eval.json, the
metrics.jsonl and the weights of the uninterrupted two-process run, bit for bit.

The runs are shared by the tests (module scope): one process in this one, the two-node run
(which is also the uninterrupted two-process run) and the killed-and-restarted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.checkpoint import CRASH_AT
from tunelab.config import load_config, save_config
from tunelab.errors import TunelabError
from tunelab.run import partial_dir, start_point, train

from .conftest import write_tiny_bert

STEPS = 50  # 2 epochs of 400 rows, global batch 16
KILLED_AT = 12  # rank 1 dies after its 12th step; the latest checkpoint then is step 10
TIMINGS = {"runtime_s", "eval_s", "setup_s", "samples_per_s", "tokens_per_s", "peak_rss_mb"}


def settings(bert: Path, files: dict[str, Path], out: Path, batch_size: int) -> list[str]:
    return [f"model={bert}", "method=full", "full.train_embeddings=true", f"data.train={files['train']}",
            f"data.validation={files['validation']}", f"data.test={files['test']}", "data.check=false",
            "train.epochs=2", f"train.batch_size={batch_size}", "train.precision=fp32",
            "train.learning_rate=3e-3", "train.log_steps=1", "train.progress_bar=false",
            "train.checkpoint_steps=5", f"output_dir={out}"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    # one thread per process, the same in every run: the runs compared bit for bit do the same sums
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start_two_nodes(args: list[str]) -> list[subprocess.Popen]:
    """Two torchrun agents, as two machines would run them: the same command on each node."""
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"127.0.0.1:{free_port()}", "--rdzv-id", f"tunelab-test-{os.getpid()}", "--local-addr", "127.0.0.1"]  # fmt: skip
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "tunelab", "train",
                              *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=torchrun_env(),
                              start_new_session=True) for _ in range(2)]  # fmt: skip


@pytest.fixture(scope="module")
def runs(sentiment_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multinode")
    bert = write_tiny_bert(folder / "bert", dropout=0.0)  # no dropout: the processes' RNGs differ
    out = {name: folder / name for name in ("single", "nodes", "restarted")}
    # the two torchrun launches run side by side (most of their time is start-up and waiting)
    nodes = start_two_nodes(settings(bert, sentiment_files, out["nodes"], 8))
    restarted = subprocess.Popen([sys.executable, "-m", "tunelab", "train", *settings(bert, sentiment_files,
                                  out["restarted"], 8), "--nproc", "2", "--max-restarts", "1"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                 env={**torchrun_env(), CRASH_AT: f"train-step:{KILLED_AT}@1"})  # fmt: skip
    try:
        train(overrides=settings(bert, sentiment_files, out["single"], 16))  # one process, in this one
        for name, processes in (("nodes", nodes), ("restarted", [restarted])):
            log = "\n".join(process.communicate(timeout=300)[0] for process in processes)
            (folder / f"{name}.log").write_text(log)
            assert all(process.returncode == 0 for process in processes), log[-4000:]
            out[f"{name}_log"] = folder / f"{name}.log"
    finally:
        for process in [*nodes, restarted]:  # nothing left running when a step above failed
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
                process.communicate()
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in metrics(run) if "loss" in e and "split" not in e]


def test_two_nodes_follow_one_process_with_the_global_batch(runs):
    single, nodes = losses(runs["single"]), losses(runs["nodes"])
    assert [s for s, _ in single] == [s for s, _ in nodes] == list(range(1, STEPS + 1))
    for (step, x), (_, y) in zip(single, nodes):
        # the same sums, split in two and added up in another order: float32 rounding only
        assert y == pytest.approx(x, rel=1e-5, abs=1e-6), f"step {step}"
    assert "2 processes" in runs["nodes_log"].read_text()
    one, two = (json.loads((runs[r] / "eval.json").read_text()) for r in ("single", "nodes"))
    for split in ("validation", "test"):
        assert two[split]["accuracy"] == pytest.approx(one[split]["accuracy"], abs=1 / 32)


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_never_killed(runs):
    log = runs["restarted_log"].read_text()
    assert "exitcode: -9" in log  # rank 1 died of SIGKILL, and torchrun restarted the group
    assert "(restart 1): continuing its unfinished run from step-000010" in log
    # every score, count and loss as the uninterrupted two-process run; only timings differ
    whole, restarted = (json.loads((runs[r] / "eval.json").read_text()) for r in ("nodes", "restarted"))
    assert restarted["validation"] == whole["validation"] and restarted["test"] == whole["test"]
    assert {k: v for k, v in restarted["train"].items() if k not in TIMINGS} == {
        k: v for k, v in whole["train"].items() if k not in TIMINGS
    }
    assert [{k: v for k, v in e.items() if k not in TIMINGS} for e in metrics(runs["restarted"])] == [
        {k: v for k, v in e.items() if k not in TIMINGS} for e in metrics(runs["nodes"])
    ]
    weights = [(runs[r] / "model" / "model.safetensors").read_bytes() for r in ("nodes", "restarted")]
    assert weights[0] == weights[1]
    assert not partial_dir(runs["restarted"]).exists()


def test_only_the_job_that_started_a_run_continues_it(tmp_path, monkeypatch):
    """A restart continues the unfinished run its own torchrun job started (env.json records the
    job's rendezvous id); another job's is refused as before, and so is any run when torchrun has
    no id of its own ("none", static rendezvous) and has not restarted."""
    out = tmp_path / "run"
    config = load_config(overrides=["model=bert", "data.train=train.csv", f"output_dir={out}"])
    partial = partial_dir(out)
    (partial / "checkpoints" / "step-000005").mkdir(parents=True)
    (partial / "checkpoints" / "step-000005" / "state.json").write_text("{}")
    save_config(config, partial / "config.yaml")

    def started_by(job):
        (partial / "env.json").write_text(json.dumps({"torchrun_job": job}))

    def job(run_id, restarts):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts))

    started_by("job-a")
    job("job-a", 1)
    assert start_point(config, out, resume=False, overwrite=False)[1:] == (
        partial / "checkpoints" / "step-000005",
        False,
    )
    job("job-a", 0)  # a requeued job, launched again with its own --rdzv-id
    assert start_point(config, out, resume=False, overwrite=True)[1] is not None
    job("job-b", 1)
    with pytest.raises(TunelabError, match="unfinished run is in the way"):
        start_point(config, out, resume=False, overwrite=False)
    started_by("none")
    job("none", 0)
    with pytest.raises(TunelabError, match="unfinished run is in the way"):
        start_point(config, out, resume=False, overwrite=False)
    job("none", 1)
    assert start_point(config, out, resume=False, overwrite=False)[1] is not None
    (partial / "checkpoints" / "step-000005" / "state.json").unlink()  # died before its first checkpoint
    assert start_point(config, out, resume=False, overwrite=False) == (config, None, False)  # starts again
    changed = load_config(overrides=["model=bert", "data.train=train.csv", f"output_dir={out}", "seed=7"])
    with pytest.raises(TunelabError, match="other settings"):
        start_point(changed, out, resume=False, overwrite=False)
