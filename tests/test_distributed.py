"""Scale beyond one process: the LDM's smoke config trained by ``torchrun`` on two CPU processes
(gloo) makes the same checkpoint as one process playing both ranks (``accumulate = 2``).

This is what makes multi-GPU training trustworthy: the global batch, the randomness of every
sample and the initial weights depend on the seed alone, not on how many processes share the work.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from minildm.config import TrainConfig, get_profile, with_overrides
from minildm.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_make_the_one_process_checkpoint(tmp_path):
    train = ["-m", "minildm", "train", "ldm", "--profile", "smoke", "--device", "cpu", "--quiet"]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
          *train, "--out", "two"], tmp_path)
    _run([sys.executable, *train, "--out", "one", "--set", "ldm_train.accumulate=2"], tmp_path)
    two_card = json.loads((tmp_path / "two" / "card.json").read_text())
    one_card = json.loads((tmp_path / "one" / "card.json").read_text())
    assert (two_card["world_size"], one_card["world_size"]) == (2, 1)
    assert two_card["steps"] == one_card["steps"] > 1
    assert [loss for _, loss in two_card["loss_curve"]] == pytest.approx([loss for _, loss in one_card["loss_curve"]], rel=1e-4)
    for weights in ("model.safetensors", "checkpoint/raw.safetensors"):
        two, one = load_file(tmp_path / "two" / weights), load_file(tmp_path / "one" / weights)
        assert two.keys() == one.keys()
        initial_scale = max(t.abs().max().item() for t in one.values())
        worst = max((two[k] - one[k]).abs().max().item() for k in two)
        assert worst <= 1e-5 * initial_scale, f"{weights}: weights differ by up to {worst:.3g}"


def test_accumulate_must_be_a_positive_count():
    with pytest.raises(ValueError, match="accumulate must be at least 1"):
        TrainConfig(accumulate=0)
    with pytest.raises(UserError, match="--set ldm_train.accumulate=0: accumulate must be at least 1"):
        with_overrides(get_profile("smoke"), ["ldm_train.accumulate=0"])
