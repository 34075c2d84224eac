"""The notebooks' first cell (:mod:`minildm.notebook`): what it tells a learner before training."""

from minildm import notebook
from minildm.config import get_profile


def test_setup_warns_a_learner_whose_cpu_trains_in_fp32(monkeypatch, capsys):
    """On a CPU where `auto` precision picks fp32 the README's bf16 training times do not hold:
    the first cell says so in one line and names the way round it; elsewhere it says nothing."""
    monkeypatch.setattr("minildm.precision.resolve", lambda asked, device: "no")
    cpu = get_profile("cpu")
    line = notebook.fp32_training_note(cpu, "cpu")
    assert line is not None and "fp32" in line and "TRAIN_NOW = False" in line and "\n" not in line
    assert "pixel baseline stops at its 25-minute cap" in line  # pixel_train.max_train_seconds
    assert notebook.fp32_training_note(cpu, "cuda") is None
    assert notebook.fp32_training_note(get_profile("smoke"), "cpu") is None, "smoke trains a few steps"

    monkeypatch.setenv("MINILDM_PROFILE", "cpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert notebook.setup().name == "cpu"
    assert line in capsys.readouterr().out

    monkeypatch.setattr("minildm.precision.resolve", lambda asked, device: "bf16")
    assert notebook.fp32_training_note(cpu, "cpu") is None
    notebook.setup()
    assert "fp32" not in capsys.readouterr().out
