"""A toy TrainingTask for the tests of minildm.train, and a script that trains it.

``python -m torch.distributed.run --nproc_per_node=2 tests/_toy_distributed.py OUT`` trains it on
two CPU processes (gloo); ``tests/test_train.py`` runs that and checks ``OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find minildm

from minildm.config import TrainConfig  # noqa: E402
from minildm.train import leave_process_group, train  # noqa: E402

IN_FEATURES = 8


class ToyTask:
    """Regression of y = x·w + noise with a small MLP (with dropout, to use the global RNG)."""

    stage = "toy"

    def __init__(self, hidden: int = 16, seed: int = 0, batch_size: int = 32):
        self.hidden, self.seed, self.batch_size = hidden, seed, batch_size
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.Tanh(), nn.Dropout(0.1),
                                   nn.Linear(hidden, 1))
        self.true_weights = torch.randn(IN_FEATURES, 1, generator=torch.Generator().manual_seed(99))

    def batch(self, step: int, rank: int, world_size: int):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step * world_size + rank)
        x = torch.randn(self.batch_size, IN_FEATURES, generator=generator)
        noise = 0.05 * torch.randn(self.batch_size, 1, generator=generator)
        return {"x": x, "y": x @ self.true_weights + noise}

    def loss(self, model, batch):
        prediction = model(batch["x"])
        loss = torch.nn.functional.mse_loss(prediction.float(), batch["y"])
        return loss, {"prediction_std": prediction.detach().float().std().item()}

    def card_config(self) -> dict:
        return {"in_features": IN_FEATURES, "hidden": self.hidden}


class MainClockToyTask(ToyTask):
    """Only rank 0's fake clock moves (a second a step): the ranks disagree about the time spent."""

    def __init__(self, clock: list[float], rank: int):
        super().__init__()
        self.clock, self.rank = clock, rank

    def batch(self, step: int, rank: int, world_size: int):
        self.clock[0] += 1.0 if self.rank == 0 else 0.0
        return super().batch(step, rank, world_size)


if __name__ == "__main__":
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9,
                      checkpoint_every=3, seed=0)
    task = ToyTask()
    if sys.argv[2:] == ["--time-budget-on-rank-0-only"]:  # TrainConfig.max_train_seconds across ranks
        import dataclasses
        import os
        from types import SimpleNamespace

        import minildm.train as train_module

        clock = [0.0]
        train_module.time = SimpleNamespace(perf_counter=lambda: clock[0])
        task, cfg = MainClockToyTask(clock, int(os.environ["RANK"])), dataclasses.replace(cfg, max_train_seconds=2)
    card = train(task, cfg, sys.argv[1], device="cpu", progress=False)
    assert card["world_size"] == 2, card["world_size"]
    leave_process_group()  # as minildm's command line does, or a rank can abort at teardown
