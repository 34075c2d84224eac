"""minildm.precision: a profile's mixed_precision="auto" trains and samples in bf16 only where the
machine computes bf16 faster (a CPU with AMX tiles, a CUDA GPU with bf16), and says which."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from minildm import precision
from minildm.config import TrainConfig, get_profile
from minildm.train import train

_spec = importlib.util.spec_from_file_location("_toy_distributed", Path(__file__).parent / "_toy_distributed.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


@pytest.fixture(params=[True, False], ids=["cpu-with-amx", "cpu-without-amx"])
def amx(request, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_tiles", lambda: request.param)
    return request.param


def test_auto_resolves_by_the_machine_and_explicit_choices_stand(amx):
    assert precision.resolve("auto", "cpu") == ("bf16" if amx else "no")
    for asked in ("no", "bf16", "fp16"):
        assert precision.resolve(asked, "cpu") == asked  # asked for explicitly: never overridden
    if not torch.cuda.is_available():
        assert precision.resolve("auto", "cuda") == "no"


def test_an_auto_run_autocasts_as_resolved_and_its_card_says_so(amx, tmp_path):
    task = toy.ToyTask()
    dtypes = set()
    task.model[0].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    cfg = TrainConfig(steps=3, batch_size=32, lr=1e-2, warmup_steps=1, checkpoint_every=10, seed=0,
                      mixed_precision="auto")
    card = train(task, cfg, tmp_path / "run", device="cpu", progress=False, command="test")
    assert dtypes == {torch.bfloat16 if amx else torch.float32}
    assert card["mixed_precision"] == ("bf16" if amx else "no")
    assert card["train"]["mixed_precision"] == "auto"  # what the profile asked for, beside what ran
    assert math.isfinite(card["final_loss"])


def test_sampling_autocast_follows_the_same_rule(amx):
    layer = torch.nn.Linear(4, 4)
    with precision.sampling_autocast(torch.device("cpu")):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if amx else torch.float32)


def test_the_cpu_profile_leaves_the_choice_to_the_machine_and_the_gpu_profile_asks_for_bf16():
    def precisions(profile):
        return {name: getattr(profile, name).mixed_precision for name in vars(profile) if name.endswith("_train")}

    assert set(precisions(get_profile("cpu")).values()) == {"auto"}
    assert set(precisions(get_profile("gpu")).values()) == {"bf16"}


def test_the_amx_probe_answers_a_bool():
    precision.cpu_has_bf16_tiles.cache_clear()
    assert isinstance(precision.cpu_has_bf16_tiles(), bool)


def test_bench_can_force_either_precision_for_sampling(amx):
    layer = torch.nn.Linear(4, 4)
    for forced in (True, False):
        with precision.cpu_sampling_in_bf16(forced), precision.sampling_autocast(torch.device("cpu")):
            assert layer(torch.randn(2, 4)).dtype == (torch.bfloat16 if forced else torch.float32)
    with precision.sampling_autocast(torch.device("cpu")):  # and the machine's choice once it ends
        assert layer(torch.randn(2, 4)).dtype == (torch.bfloat16 if amx else torch.float32)
