"""Worker processes draw the coming batches (minildm.prefetch): the model trains on the very same
batches, so the weights are the same bit for bit, and only the tasks that draw use them."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from minildm import prefetch
from minildm import train as train_module
from minildm.config import get_profile


def make_task(stage: str, profile):
    from minildm.data.datasets import ShapesDataset
    from minildm.judge import JudgeTask
    from minildm.stages import ldm
    from minildm.stages.ae import AutoencoderTask
    from minildm.stages.clip import ClipTask

    torch.manual_seed(0)
    if stage == "judge":
        return JudgeTask(profile.judge, profile.shapes, 8)
    if stage == "ae":  # the PatchGAN from the second step, so the critic's batches are the drawn ones too
        from minildm.stages import judge

        return AutoencoderTask(dataclasses.replace(profile.ae, disc_start=1), ShapesDataset(10**9, cfg=profile.shapes), 4, 0,
                               judge.load(None)[0])
    if stage == "clip":
        return ClipTask(profile.clip, 8, 0)
    return ldm.make_task("pixel", profile.pixel, dataclasses.replace(profile.pixel_train, batch_size=4), profile, cache_size=16)


@pytest.mark.parametrize("stage", ["judge", "ae", "clip", "pixel"])
def test_batches_drawn_by_workers_train_the_same_weights(stage, tmp_path, monkeypatch):
    profile = get_profile("smoke")
    used = []
    real = train_module.batches_ahead
    monkeypatch.setattr(train_module, "batches_ahead", lambda *a, **k: used.append(a[5]) or real(*a, **k))
    weights = {}
    for workers in (0, 2):
        cfg = dataclasses.replace(profile.judge_train, steps=4, checkpoint_every=0, ema_decay=0.5, accumulate=2,
                                  render_workers=workers)
        train_module.train(make_task(stage, profile), cfg, tmp_path / str(workers), device="cpu", progress=False)
        weights[workers] = load_file(tmp_path / str(workers) / "model.safetensors")
    assert used == [2], "the second run drew its batches in two worker processes"
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0]), f"{stage}: other weights with workers"


def test_workers_are_used_on_a_gpu_for_drawn_batches_only(monkeypatch):
    from minildm.stages import ldm

    profile = get_profile("smoke")
    judge = make_task("judge", profile)
    latent = ldm.make_task("ldm", profile.ldm, profile.ldm_train, profile, cache_size=8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name in ("LOCAL_WORLD_SIZE", "MINILDM_LANES"):  # one training process on the machine
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(prefetch.os, "cpu_count", lambda: 16)
    assert prefetch.render_workers(judge, None, cuda) == prefetch.MAX_WORKERS
    assert prefetch.render_workers(judge, None, cpu) == 0, "a CPU's cores are training"
    assert prefetch.render_workers(judge, 3, cpu) == 3
    assert prefetch.render_workers(latent, None, cuda) == prefetch.render_workers(latent, 3, cuda) == 0
    assert make_task("pixel", profile).renders_batches and not latent.renders_batches
    monkeypatch.setattr(prefetch.os, "cpu_count", lambda: 2)
    assert prefetch.render_workers(judge, None, cuda) == 0


def test_processes_sharing_a_gpu_machine_share_its_workers(monkeypatch):
    judge, cuda = make_task("judge", get_profile("smoke")), torch.device("cuda")
    monkeypatch.setattr(prefetch.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("MINILDM_LANES", "2")  # the course's two lanes: 8 cores each, 2 kept
    assert prefetch.render_workers(judge, None, cuda) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # and four torchrun ranks in each: 2 cores a process
    assert prefetch.render_workers(judge, None, cuda) == 0
    monkeypatch.setenv("MINILDM_LANES", "1")
    assert prefetch.render_workers(judge, None, cuda) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert prefetch.render_workers(judge, None, cuda) == prefetch.MAX_WORKERS
