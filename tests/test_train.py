"""minildm.train: the loop learns, resumes exactly, writes a card, refuses bad runs clearly."""

import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from minildm.config import TrainConfig
from minildm.errors import UserError
from minildm import thread_share
from minildm.train import (THREADS, adam, ema_with_warmup, load_trained, loss_curve, lr_multiplier, parameter_groups,
                           thread_changes, train)

TESTS = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_toy_distributed", TESTS / "_toy_distributed.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)
ToyTask = toy.ToyTask

CFG = TrainConfig(steps=20, batch_size=32, lr=1e-2, warmup_steps=3, ema_decay=0.9,
                  checkpoint_every=10, seed=0)


def _train(task, out, cfg=CFG, **kwargs):
    return train(task, cfg, out, device="cpu", progress=False, command="test", **kwargs)


def test_a_few_steps_lower_the_loss(tmp_path):
    card = _train(ToyTask(), tmp_path / "run", TrainConfig(**{**CFG.__dict__, "steps": 40}))
    losses = [loss for _, loss in card["loss_curve"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


class InterruptedToyTask(ToyTask):
    """Dies at step 13, as a run killed by the user or the cluster would."""

    def batch(self, step, rank, world_size):
        if step == 13:
            raise KeyboardInterrupt
        return super().batch(step, rank, world_size)


def test_resume_continues_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    card = _train(ToyTask(), straight)
    with pytest.raises(KeyboardInterrupt):
        _train(InterruptedToyTask(), interrupted)
    state = json.loads((interrupted / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10 and not (interrupted / "model.safetensors").exists()

    resumed_task = ToyTask(seed=0)
    resumed_card = _train(resumed_task, interrupted, resume=True)

    for name in ("raw", "model", "optimizer"):  # raw weights, EMA weights, AdamW moments
        a = load_file(straight / "checkpoint" / f"{name}.safetensors")
        b = load_file(interrupted / "checkpoint" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (json.loads((run / "checkpoint" / "state.json").read_text())
            for run in (straight, interrupted))
    assert a["optimizer"] == b["optimizer"] and a["scheduler"] == b["scheduler"]
    assert a["ema_updates"] == b["ema_updates"] == 20
    assert resumed_card["loss_curve"] == card["loss_curve"]
    raw = load_file(straight / "checkpoint" / "raw.safetensors")
    assert torch.equal(resumed_task.model[0].weight, raw["0.weight"])  # task.model: raw weights


def test_resume_can_extend_a_finished_run(tmp_path):
    _train(ToyTask(), tmp_path / "run", TrainConfig(**{**CFG.__dict__, "steps": 10}))
    card = _train(ToyTask(), tmp_path / "run", resume=True)
    assert card["steps"] == 20 and card["loss_curve"][-1][0] == 20


class ClockedToyTask(ToyTask):
    """Each step takes one second of a fake clock, which the training loop reads as its own."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.clock = clock

    def batch(self, step, rank, world_size):
        self.clock[0] += 1.0
        return super().batch(step, rank, world_size)


def test_a_time_budget_stops_the_run_and_resuming_goes_on_exactly(tmp_path, monkeypatch):
    import minildm.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    capped = TrainConfig(**{**CFG.__dict__, "max_train_seconds": 5})
    run = tmp_path / "run"
    card = _train(ClockedToyTask(clock), run, capped)
    assert card["steps"] == 5 and card["stopped_by_time_budget"] and card["wall_time_s"] == 5
    assert card["train"]["max_train_seconds"] == 5 and len(card["loss_curve"]) == 5
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 5  # saved where it stopped
    assert json.loads((run / "card.json").read_text()) == card

    again = _train(ClockedToyTask(clock), run, capped, resume=True)  # the budget is spent: nothing to train
    assert again["steps"] == 5 and again["stopped_by_time_budget"]

    exact = TrainConfig(**{**CFG.__dict__, "max_train_seconds": 20})
    on_the_last_step = _train(ClockedToyTask(clock), tmp_path / "exact", exact)
    assert on_the_last_step["steps"] == 20 and not on_the_last_step["stopped_by_time_budget"], "the steps ended it"

    raised = TrainConfig(**{**CFG.__dict__, "max_train_seconds": 100})
    resumed = _train(ClockedToyTask(clock), run, raised, resume=True)
    assert resumed["steps"] == 20 and not resumed["stopped_by_time_budget"] and resumed["wall_time_s"] == 20
    monkeypatch.undo()  # the real clock again
    straight_card = _train(ToyTask(), tmp_path / "straight")  # no budget: the same 20 steps in one call
    assert resumed["loss_curve"] == straight_card["loss_curve"] and not straight_card["stopped_by_time_budget"]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class MeasuredToyTask(ToyTask):
    """Measures its progress (the EMA model's first weight) and counts its measurements."""

    def __init__(self):
        super().__init__()
        self.measurements = 0

    def progress_eval(self, ema_model):
        self.measurements += 1
        return {"first_weight": next(ema_model.parameters()).flatten()[0].item()}


def test_progress_is_measured_at_every_checkpoint_or_only_at_the_end_and_training_is_the_same(tmp_path):
    every = _train(MeasuredToyTask(), tmp_path / "every")
    assert [step for step, _, _ in every["progress"]] == [10, 20]
    at_end = TrainConfig(**{**CFG.__dict__, "progress_at_every_checkpoint": False})
    task = MeasuredToyTask()
    last = _train(task, tmp_path / "last", at_end)
    assert [step for step, _, _ in last["progress"]] == [20] and task.measurements == 1
    assert last["progress"][0][2]["first_weight"] == every["progress"][-1][2]["first_weight"]
    a, b = load_file(tmp_path / "every" / "model.safetensors"), load_file(tmp_path / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "measuring does not change training"
    capped = TrainConfig(**{**at_end.__dict__, "max_train_seconds": 1e-9})  # stopped by its budget after step 1
    stopped = _train(MeasuredToyTask(), tmp_path / "stopped", capped)
    assert stopped["stopped_by_time_budget"] and [step for step, _, _ in stopped["progress"]] == [stopped["steps"]]


def test_a_task_can_scale_the_learning_rate_of_some_parameters(tmp_path):
    model = ToyTask().model
    groups = parameter_groups(model, 1e-3, {"3.": 10.0})
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert [len(g["params"]) for g in groups] == [2, 2]  # layer 0's weight and bias; layer 3's
    with pytest.raises(ValueError, match="no trainable parameter is named nope"):
        parameter_groups(model, 1e-3, {"nope": 2.0})

    # through the loop: the first AdamW step moves each weight by about lr (warm-up factor 1/3
    # here), so the scaled layer moves ten times as far as with one rate for all
    def first_step_move(lr_scales):
        task = ToyTask()
        if lr_scales:
            task.lr_scales = lr_scales
        before = task.model[3].weight.detach().clone()
        _train(task, tmp_path / f"run{len(lr_scales)}", TrainConfig(**{**CFG.__dict__, "steps": 1}))
        return (task.model[3].weight.detach() - before).abs().mean().item()

    plain, scaled = first_step_move({}), first_step_move({"3.": 10.0})
    assert plain > 0 and 8 < scaled / plain < 12


def test_card_records_the_run(tmp_path):
    card = _train(ToyTask(), tmp_path / "run", extra_card={"profile": "smoke"})
    assert json.loads((tmp_path / "run" / "card.json").read_text()) == card
    for key in ("stage", "config", "train", "command", "seed", "steps", "wall_time_s", "device",
                "world_size", "peak_memory_mb", "loss_curve", "final_loss", "torch_version",
                "metrics", "steps_per_s"):
        assert key in card, key
    assert card["stage"] == "toy" and card["config"] == {"in_features": 8, "hidden": 16}
    assert card["train"]["steps"] == 20 and card["command"] == "test" and card["world_size"] == 1
    assert card["device"].startswith("cpu") and card["peak_memory_mb"] > 0
    assert card["profile"] == "smoke" and card["metrics"] == {}
    assert card["final_loss"] == card["loss_curve"][-1][1]
    assert len(card["stat_curves"]["prediction_std"]) == 20


class ThreadsRaisedToyTask(ToyTask):
    """`minildm course --lanes`: the job beside this one ends after step 7, and this one gets 2 threads."""

    def __init__(self, share: Path):
        super().__init__()
        self.share, self.steps_done = share, 0

    def loss(self, model, batch):
        if self.steps_done == 7:  # written during step 7: taken at the start of step 8
            thread_share.write(self.share, 2)
        self.steps_done += 1
        return super().loss(model, batch)


def test_the_card_says_when_the_thread_count_changed(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    share = tmp_path / "job.threads"
    thread_share.write(share, 1)
    monkeypatch.setenv(thread_share.ENV, str(share))
    monkeypatch.setattr(thread_share, "_last_seen", None)
    try:
        card = _train(ThreadsRaisedToyTask(share), tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert card["device"] == "cpu (1 thread, 2 from step 8)"
    assert THREADS not in card["stat_curves"], "a thread count is not a training statistic"
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert thread_changes(state["history"][THREADS]) == [[0, 1], [8, 2]], "kept for a resumed run"


def test_thread_changes_reads_the_history_and_skips_steps_without_a_count():
    assert thread_changes([]) == []
    assert thread_changes([None, None, 2, 2, 1, 1.0, 2]) == [[2, 2], [4, 1], [6, 2]]


def test_loss_curve_has_at_most_300_bin_means():
    losses = [float(i) for i in range(1000)]
    curve = loss_curve(losses)
    assert len(curve) == 300 and curve[-1][0] == 1000 and curve[0] == [3, 1.0]
    assert loss_curve([2.0, 4.0]) == [[1, 2.0], [2, 4.0]]


def test_saved_model_is_the_ema(tmp_path):
    task = ToyTask()
    card = _train(task, tmp_path / "run")
    fresh = ToyTask(seed=1).model
    assert load_trained(fresh, tmp_path / "run") == card
    ema = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert torch.equal(fresh[0].weight, ema["0.weight"])
    assert not torch.equal(fresh[0].weight, task.model[0].weight)  # raw weights differ from EMA


def test_schedule_and_ema_warmup():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1) and lr_multiplier(9, cfg) == 1.0
    assert lr_multiplier(10, cfg) == 1.0 and lr_multiplier(100, cfg) == pytest.approx(0.1)
    ema, weights = [torch.zeros(2)], [torch.ones(2)]
    ema_with_warmup(0.999)(ema, weights, torch.tensor(1))  # first average: decay 2/11
    assert torch.allclose(ema[0], torch.full((2,), 9 / 11))


@pytest.mark.parametrize("decoupled", [True, False])
def test_the_fused_adam_update_is_torchs_default_one(decoupled):
    """minildm's optimizer runs torch's fused kernel; the update is the same AdamW (or Adam)."""
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(4)]
    settings = dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)
    runs = {}
    for name, make in {"fused": partial(adam, decoupled_weight_decay=decoupled),
                       "default": torch.optim.AdamW if decoupled else torch.optim.Adam}.items():
        params = [w.clone().requires_grad_(True) for w in weights]
        optimizer = make(params, **settings)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        runs[name] = params
        assert bool(optimizer.defaults["fused"]) == (name == "fused")
    for fused, default in zip(runs["fused"], runs["default"]):
        assert torch.allclose(fused, default, rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs["fused"][0], weights[0]), "the weights moved"


def test_bf16_autocast_on_cpu(tmp_path):
    task = ToyTask()
    dtypes = set()
    task.model[0].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    card = _train(task, tmp_path / "run", TrainConfig(**{**CFG.__dict__, "steps": 3,
                                                         "mixed_precision": "bf16"}))
    assert dtypes == {torch.bfloat16} and math.isfinite(card["final_loss"])
    assert task.model[0].weight.dtype == torch.float32  # the weights stay fp32
    dtypes.clear()
    task.model(torch.randn(2, 8))
    assert dtypes == {torch.float32}  # after training the model no longer autocasts


def test_bad_runs_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        _train(ToyTask(), tmp_path / "empty", resume=True)
    _train(ToyTask(), tmp_path / "run", TrainConfig(**{**CFG.__dict__, "steps": 2}))
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        _train(ToyTask(), tmp_path / "run")
    with pytest.raises(UserError, match="differs in: hidden"):
        _train(ToyTask(hidden=32), tmp_path / "run", resume=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write to --out"):
        _train(ToyTask(), tmp_path / "a_file" / "run")
    for seconds in (0, -1, "abc"):
        with pytest.raises(UserError, match="give a positive number of seconds, or null for no cap"):
            _train(ToyTask(), tmp_path / "budget", TrainConfig(max_train_seconds=seconds))
        assert not (tmp_path / "budget").exists(), "refused before anything is written"
    with pytest.raises(ValueError, match="mixed_precision must be one of no, bf16, fp16, auto, auto-native"):
        TrainConfig(mixed_precision="fp32")  # refused when the config is made (test_config: --set's one line)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
            _train(ToyTask(), tmp_path / "x", TrainConfig(mixed_precision="fp16"))


def test_compiled_training_learns_the_same_and_saves_plain_weights(tmp_path):
    """``TrainConfig.compile``: the step runs through ``torch.compile``, but the run's files are
    the plain module's (no ``_orig_mod.`` prefixes) and the weights are the eager run's up to the
    compiled kernels' rounding."""
    compiled_cfg = TrainConfig(**{**CFG.__dict__, "steps": 6, "compile": True})
    eager_cfg = TrainConfig(**{**CFG.__dict__, "steps": 6})
    compiled_task = ToyTask(seed=0)
    card = _train(compiled_task, tmp_path / "compiled", compiled_cfg)
    _train(ToyTask(seed=0), tmp_path / "eager", eager_cfg)
    assert card["train"]["compile"] is True
    assert type(compiled_task.model) is torch.nn.Sequential  # the task keeps its plain module
    for name in ("model.safetensors", "checkpoint/raw.safetensors"):
        a, b = load_file(tmp_path / "compiled" / name), load_file(tmp_path / "eager" / name)
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_compile_without_a_cpp_compiler_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr("minildm.train.shutil.which", lambda name: None)  # the run is on the CPU
    with pytest.raises(UserError, match=re.escape("compile needs a C++ compiler")):
        _train(ToyTask(), tmp_path / "run", TrainConfig(**{**CFG.__dict__, "steps": 1, "compile": True}))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_toy(out: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={_free_port()}", str(TESTS / "_toy_distributed.py"), str(out), *options],
        env=env, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_on_cpu(tmp_path):
    out = tmp_path / "run"
    result = _torchrun_toy(out)
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    assert card["world_size"] == 2 and card["steps"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "checkpoint", "model.safetensors"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6


def test_a_time_budget_stops_every_rank_at_the_main_process_step(tmp_path):
    """Rank 0's clock reaches the 2 s budget after step 2, rank 1's never moves: rank 0's reading
    decides for both. Were each rank to read its own, rank 1 would wait for rank 0 at step 3 forever."""
    out = tmp_path / "run"
    result = _torchrun_toy(out, "--time-budget-on-rank-0-only")
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    assert card["world_size"] == 2 and card["steps"] == 2 and card["stopped_by_time_budget"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


@pytest.mark.parametrize("stage", ["judge", "ae", "clip"])
def test_a_stage_run_is_a_function_of_its_seed(stage, tmp_path):
    """The initial weights come from the profile's seed, not from whatever ran before."""
    from minildm.config import get_profile
    from minildm.stages import stage_module

    module = stage_module(stage, (stage,))
    for run, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)
        module.train(get_profile("smoke"), str(tmp_path / run), steps=1, progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: two runs with one seed differ"
