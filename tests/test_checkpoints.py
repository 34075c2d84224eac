"""minildm.checkpoints: safetensors + card round trips, crash-safe writes, clear errors."""

import json
import struct

import pytest
import torch
from torch import nn

from minildm.checkpoints import (atomic_write_dir, atomic_write_file, load_checkpoint, load_trained,
                                 optimizer_state_from_tensors,
                                 optimizer_state_to_tensors, resolve_checkpoint, save_checkpoint,
                                 save_json, save_tensors)
from minildm.errors import UserError


def _leftovers(folder):
    """Temporary or backup entries that a finished write must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".old"))


def test_round_trip_through_folder_and_file(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3)}
    card = {"stage": "toy", "loss_curve": [[1, 0.5]], "metrics": {}}
    save_checkpoint(tmp_path / "ckpt", tensors, card)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):
        state, loaded_card = load_checkpoint(path)
        assert loaded_card == card
        assert state.keys() == tensors.keys()
        assert all(torch.equal(state[k], tensors[k]) for k in tensors)
    assert json.loads((tmp_path / "ckpt" / "card.json").read_text()) == card
    assert _leftovers(tmp_path) == []


def test_weights_are_safetensors_not_pickle(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {})
    raw = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_length])
    assert header["w"]["dtype"] == "F32" and header["w"]["shape"] == [2]


def test_tied_weights_can_be_saved(tmp_path):
    shared = torch.randn(4, 4)
    save_checkpoint(tmp_path / "ckpt", {"embed": shared, "unembed": shared}, {})
    state, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(state["embed"], state["unembed"])


def test_crash_inside_a_write_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"version": 1})

    def crashing_write(folder):
        save_tensors(folder / "model.safetensors", {"w": torch.ones(2)})
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        atomic_write_dir(tmp_path / "ckpt", crashing_write)
    state, card = load_checkpoint(tmp_path / "ckpt")
    assert card == {"version": 1} and torch.equal(state["w"], torch.zeros(2))
    assert _leftovers(tmp_path) == []


def test_crash_inside_a_file_write_keeps_the_previous_file(tmp_path):
    save_json(tmp_path / "card.json", {"version": 1})

    def crashing_write(path):
        path.write_text('{"vers')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_file(tmp_path / "card.json", crashing_write)
    assert json.loads((tmp_path / "card.json").read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []


def test_crash_between_the_renames_is_recovered(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"version": 1})
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # as if killed right after moving it aside
    assert load_checkpoint(tmp_path / "ckpt")[1] == {"version": 1}
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"version": 2})
    assert load_checkpoint(tmp_path / "ckpt")[1] == {"version": 2}
    assert _leftovers(tmp_path) == []


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at .*nowhere: expected a run directory"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    save_tensors(tmp_path / "half" / "model.safetensors", {"w": torch.ones(1)})
    with pytest.raises(UserError, match="card.json missing") as error:
        load_checkpoint(tmp_path / "half")
    assert "\n" not in str(error.value)


def test_a_folder_of_runs_names_them(tmp_path):
    """``--model runs/course`` (the course's folder, not one of its runs) names the runs inside."""
    for stage in ("ae", "ldm"):
        save_checkpoint(tmp_path / "course" / stage, {"w": torch.ones(1)}, {"stage": stage})
    with pytest.raises(UserError, match="it holds the runs ae, ldm; pass one of them, e.g. .*course/ldm$"):
        resolve_checkpoint(tmp_path / "course")
    assert resolve_checkpoint(tmp_path / "course" / "ldm") == tmp_path / "course" / "ldm"


def test_unfinished_run_points_to_resume(tmp_path):
    save_checkpoint(tmp_path / "run" / "checkpoint", {"w": torch.ones(1)}, {})
    with pytest.raises(UserError, match="--resume"):
        resolve_checkpoint(tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "run" / "checkpoint") == tmp_path / "run" / "checkpoint"


def test_corrupt_weights_are_a_user_error(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(1)}, {})
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "ckpt")


def test_another_config_names_the_mismatched_keys(tmp_path):
    made = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Linear(4, 4))
    save_checkpoint(tmp_path / "ckpt", made.state_dict(), {})
    other = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(UserError) as error:
        load_trained(other, tmp_path / "ckpt")
    message = str(error.value)
    assert "another config" in message and "\n" not in message
    assert "missing keys (2) [2.weight, 2.bias]" in message
    assert "unexpected keys (2) [1.bias, 1.weight]" in message
    assert "0.weight (32, 3, 3, 3) vs (16, 3, 3, 3)" in message


def test_matching_model_loads(tmp_path):
    made = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "ckpt", made.state_dict(), {"stage": "toy"})
    fresh = nn.Linear(3, 2)
    assert load_trained(fresh, tmp_path / "ckpt") == {"stage": "toy"}
    assert torch.equal(fresh.weight, made.weight)


def _adamw_after_two_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model, optimizer = _adamw_after_two_steps()
    tensors, skeleton = optimizer_state_to_tensors(optimizer.state_dict())
    assert set(tensors) == {f"state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    save_tensors(tmp_path / "optimizer.safetensors", tensors)
    save_json(tmp_path / "skeleton.json", skeleton)

    from safetensors.torch import load_file
    restored = optimizer_state_from_tensors(load_file(tmp_path / "optimizer.safetensors"),
                                            json.loads((tmp_path / "skeleton.json").read_text()))
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters())
    twin_optimizer.load_state_dict(restored)
    original, copy = optimizer.state_dict(), twin_optimizer.state_dict()
    assert original["param_groups"] == copy["param_groups"]
    for index, state in original["state"].items():
        assert all(torch.equal(value, copy["state"][index][name]) for name, value in state.items())

    x = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):  # one more identical step
        net(x).square().mean().backward()
        opt.step()
    assert torch.equal(model.weight, twin.weight)
