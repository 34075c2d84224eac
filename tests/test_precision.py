"""minildm.precision: a profile's mixed_precision="auto" trains and samples in bf16 only where the
machine computes bf16 faster (a CPU with AMX tiles, an AMD CPU with AVX-512 BF16, a CUDA GPU with
bf16), "auto-native" also on any CPU with AVX-512 BF16 dot products, and the card says which."""

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


# (AMX tiles, AVX-512 BF16 dot products, AMD): the kinds of x86 CPU the two automatic choices tell apart
CPU_KINDS = {"intel-amx": (True, True, False), "intel-avx512-bf16-without-amx": (False, True, False),
             "amd-avx512-bf16": (False, True, True), "no-bf16-arithmetic": (False, False, False),
             "amd-without-bf16": (False, False, True)}
BF16_FASTER = {"intel-amx", "amd-avx512-bf16"}  # measured: bench_cpu.json, bench_cpu_amd_zen4.json


def pretend_cpu(monkeypatch, kind: str) -> None:
    tiles, dot_products, amd = CPU_KINDS[kind]
    monkeypatch.setattr(precision, "cpu_has_bf16_tiles", lambda: tiles)
    monkeypatch.setattr(precision, "cpu_has_bf16_dot_products", lambda: dot_products)
    monkeypatch.setattr(precision, "cpu_is_amd", lambda: amd)


@pytest.fixture(params=["intel-amx", "intel-avx512-bf16-without-amx"])
def amx(request, monkeypatch):
    """A CPU where "auto" gives bf16 (True) and one where it gives fp32 (False); both have AVX-512 BF16."""
    pretend_cpu(monkeypatch, request.param)
    return request.param in BF16_FASTER


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_auto_and_auto_native_resolve_by_the_machine_and_explicit_choices_stand(kind, monkeypatch):
    pretend_cpu(monkeypatch, kind)
    dot_products = CPU_KINDS[kind][1]
    assert precision.resolve("auto", "cpu") == ("bf16" if kind in BF16_FASTER else "no")
    assert precision.resolve("auto-native", "cpu") == ("bf16" if dot_products else "no")
    for asked in ("no", "bf16", "fp16"):
        assert precision.resolve(asked, "cpu") == asked  # asked for explicitly: never overridden
    if not torch.cuda.is_available():
        assert precision.resolve("auto", "cuda") == precision.resolve("auto-native", "cuda") == "no"


@pytest.mark.parametrize("asked", ["auto", "auto-native"])
def test_an_automatic_run_autocasts_as_resolved_and_its_card_says_so(asked, amx, tmp_path):
    in_bf16 = amx or asked == "auto-native"
    task = toy.ToyTask()
    dtypes = set()
    task.model[0].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    cfg = TrainConfig(steps=3, batch_size=32, lr=1e-2, warmup_steps=1, checkpoint_every=10, seed=0,
                      mixed_precision=asked)
    card = train(task, cfg, tmp_path / "run", device="cpu", progress=False, command="test")
    assert dtypes == {torch.bfloat16 if in_bf16 else torch.float32}
    assert card["mixed_precision"] == ("bf16" if in_bf16 else "no")
    assert card["train"]["mixed_precision"] == asked  # what the profile asked for, beside what ran
    assert math.isfinite(card["final_loss"])


def test_sampling_autocast_follows_the_same_rule(amx):
    layer = torch.nn.Linear(4, 4)
    with precision.sampling_autocast(torch.device("cpu")):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if amx else torch.float32)


def test_the_cpu_profile_leaves_the_choice_to_the_machine_and_the_gpu_profile_asks_for_bf16():
    def precisions(profile):
        return {name: getattr(profile, name).mixed_precision for name in vars(profile) if name.endswith("_train")}

    cpu = precisions(get_profile("cpu"))
    assert cpu.pop("pixel_train") == "auto-native"  # the one step measured faster in bf16 without AMX
    assert set(cpu.values()) == {"auto"}
    assert set(precisions(get_profile("gpu")).values()) == {"bf16"}


def test_the_cpu_probes_answer_a_bool():
    for probe in (precision.cpu_has_bf16_tiles, precision.cpu_has_bf16_dot_products, precision.cpu_is_amd):
        probe.cache_clear()
        assert isinstance(probe(), bool)


def test_bench_can_force_either_precision_for_sampling(amx):
    layer = torch.nn.Linear(4, 4)
    for forced in (True, False):
        with precision.cpu_sampling_in_bf16(forced), precision.sampling_autocast(torch.device("cpu")):
            assert layer(torch.randn(2, 4)).dtype == (torch.bfloat16 if forced else torch.float32)
    with precision.sampling_autocast(torch.device("cpu")):  # and the machine's choice once it ends
        assert layer(torch.randn(2, 4)).dtype == (torch.bfloat16 if amx else torch.float32)
