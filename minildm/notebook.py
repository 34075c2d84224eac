"""What every notebook's first cell does, kept in the package so the notebooks stay lessons.

:func:`setup` fixes seeds and threads and picks the profile; :func:`train_or_load` is the one
switch of each notebook: train the stage yourself now, or load the reference checkpoint. Under
the ``smoke`` profile (CI) it trains a few steps to prove the loop runs, then loads the reference.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from minildm.config import Profile, get_profile
from minildm.precision import cpu_profile_in_fp32, machine_device_type


def setup(seed: int = 0) -> Profile:
    """Seed every generator, keep torch to the machine's cores, and return the profile."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    profile = get_profile()
    device_type = machine_device_type()
    device = "cuda" if device_type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"minildm profile: {profile.name} ({profile.shapes.image_size} px), device: {device}")
    note = fp32_training_note(profile, device_type)
    if note:
        print(note)
    return profile


def fp32_training_note(profile: Profile, device_type: str) -> str | None:
    """One line for a learner whose CPU will train the ``cpu`` profile in fp32, or None.

    ``mixed_precision="auto"`` (:mod:`minildm.precision`) trains in bf16 only where bf16 is
    faster; the README's training times were measured that way, on a Xeon with AMX. On a 2-core
    AMD Zen 3 in fp32 the judge, autoencoder, CLIP and LDM, each trained alone, took 1.6× (the
    LDM) to 2.7× as long (``data/measurements/course_cpu_amd_zen3_partial.json``,
    ``ldm_compile_amd_zen3.json``), and the pixel baseline's training step in ``minildm bench``
    5.3× (``bench_cpu_amd_zen3.json`` against ``bench_cpu.json``), so ``TRAIN_NOW = True``
    deserves a warning there. The pixel baseline's 576 steps would take about an hour there; its
    cap (``pixel_train.max_train_seconds``) stops it at 25 minutes of training, after fewer steps."""
    if not cpu_profile_in_fp32(profile, device_type):
        return None
    cap = profile.pixel_train.max_train_seconds
    pixel = f" (the pixel baseline stops at its {cap / 60:g}-minute cap, after fewer steps)" if cap else ""
    return ("This CPU trains in fp32 (no fast bf16 here): with TRAIN_NOW = True expect about 1.6-2.7x the "
            f"training times in the README, measured in bf16 on a Xeon with AMX{pixel}; "
            "TRAIN_NOW = False loads the reference checkpoint at once.")


def train_or_load(stage_name: str, profile: Profile, train_now: bool, run_dir: str | Path | None = None):
    """(model, card of what was trained or loaded, reference card).

    ``train_now``: train with the profile into ``run_dir`` (default ``runs/<stage>``), resuming
    if a checkpoint is there, and return that model. Otherwise return the reference checkpoint.
    The ``smoke`` profile always trains its few steps, into a temporary folder, and then returns
    the reference, so that the rest of the notebook has a model worth inspecting.
    """
    from minildm.stages import stage_module

    stage = stage_module(stage_name)
    reference_model, reference_card = stage.load(None)
    if not (train_now or profile.name == "smoke"):
        return reference_model, reference_card, reference_card
    if profile.name == "smoke":
        run_dir = Path(tempfile.mkdtemp(prefix=f"minildm-{stage_name}-"))
    run_dir = Path(run_dir or Path("runs") / stage_name)
    card = stage.train(profile, str(run_dir), resume=(run_dir / "checkpoint").exists(),
                       command=f"notebook: train_or_load({stage_name!r})")
    if profile.name == "smoke":
        return reference_model, card, reference_card
    model, _ = stage.load(run_dir)
    return model, card, reference_card
