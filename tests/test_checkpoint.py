"""Resumable checkpoints (tunelab.checkpoint): atomic writes, pruning, and an exact round trip."""

from __future__ import annotations

import json
import random

import torch

from tunelab.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen weight is not saved
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, schedule, scaler


def step(model, optimizer, schedule):
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def save(folder, model, optimizer, schedule, scaler, steps, keep=2, best=None):
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {"result": {"steps": steps}, "world": 1}
    return save_checkpoint(folder, weights, optimizer.state_dict(), schedule, scaler, state, random.Random(steps),
                           best, keep)  # fmt: skip


def test_round_trip_restores_weights_optimizer_schedule_and_every_random_stream(tmp_path):
    model, optimizer, schedule, scaler = parts()
    for _ in range(3):
        step(model, optimizer, schedule)
    data_rng = random.Random(7)
    data_rng.random()
    torch.manual_seed(11)
    random.seed(12)
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    best = {n: p.detach() * 2 for n, p in weights.items()}
    saved = save_checkpoint(tmp_path, weights, optimizer.state_dict(), schedule, scaler, {"result": {"steps": 3}},
                            data_rng, best, keep=2)  # fmt: skip
    expected_draws = (torch.rand(2), random.random(), data_rng.random())

    torch.manual_seed(99)  # a fresh model and other random states: the checkpoint must bring all back
    random.seed(98)
    fresh, fresh_optimizer, fresh_schedule, fresh_scaler = parts(seed=5)
    other_rng = random.Random(0)
    state, loaded_best = load_checkpoint(
        saved, fresh, fresh_optimizer, fresh_schedule, fresh_scaler, other_rng
    )
    assert state == {"result": {"steps": 3}}
    assert set(loaded_best) == set(best) and all(torch.equal(loaded_best[n], best[n]) for n in best)
    for name, value in weights.items():
        assert torch.equal(dict(fresh.named_parameters())[name], value), name
    assert fresh_schedule.last_epoch == schedule.last_epoch == 3
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    drawn = (torch.rand(2), random.random(), other_rng.random())
    assert torch.equal(drawn[0], expected_draws[0]) and drawn[1:] == expected_draws[1:]


def test_the_same_state_gives_the_same_next_step(tmp_path):
    model, optimizer, schedule, scaler = parts()
    step(model, optimizer, schedule)
    saved = save(tmp_path, model, optimizer, schedule, scaler, steps=1)
    torch.manual_seed(3)
    step(model, optimizer, schedule)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    fresh, fresh_optimizer, fresh_schedule, fresh_scaler = parts(seed=1)
    fresh[0].weight.data.copy_(model[0].weight)
    load_checkpoint(saved, fresh, fresh_optimizer, fresh_schedule, fresh_scaler, random.Random())
    torch.manual_seed(3)
    step(fresh, fresh_optimizer, fresh_schedule)
    for name, value in fresh.named_parameters():
        assert torch.equal(value, original[name]), name


def test_only_the_last_k_are_kept_and_the_latest_is_found(tmp_path):
    model, optimizer, schedule, scaler = parts()
    for steps in (10, 20, 30):
        save(tmp_path, model, optimizer, schedule, scaler, steps, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000020", "step-000030"]
    assert latest_checkpoint(tmp_path).name == "step-000030"
    saved = json.loads((tmp_path / "step-000030" / "state.json").read_text())
    assert saved["result"]["steps"] == 30
    # the frozen weight is not in the checkpoint; the trained ones are
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "step-000030" / "trainable.safetensors")) == {
        "0.bias",
        "1.weight",
        "1.bias",
    }


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(tmp_path):
    model, optimizer, schedule, scaler = parts()
    save(tmp_path, model, optimizer, schedule, scaler, 10)
    # a crash mid-write leaves the temporary folder (and a folder without state.json)
    (tmp_path / ".tmp-step-000020").mkdir()
    (tmp_path / ".tmp-step-000020" / "trainable.safetensors").write_bytes(b"partial")
    (tmp_path / "step-000030").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000010"
    # the next save over the same step replaces the leftover temporary folder
    save(tmp_path, model, optimizer, schedule, scaler, 20)
    assert latest_checkpoint(tmp_path).name == "step-000020"
    assert not (tmp_path / ".tmp-step-000020").exists()


def test_no_folder_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint_dirs(tmp_path) == []
