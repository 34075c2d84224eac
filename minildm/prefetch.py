"""Rendering the coming steps' batches in worker processes while the GPU trains on this one.

The shapes world is drawn by the CPU, scene by scene: about 1 800 images of 64 px a second, and
hardly more with more threads (1 514 on one thread of a 2-core Xeon, 1 794 on two). The gpu
profile's judge wants 128 of them a step and its CLIP and pixel baseline 256, about 0.1 s of
drawing a step, so on a GPU the network would wait for the renderer most of the time: on an H200
the gpu profile's judge had not finished 300 steps and its measuring after 45 s.

Every random draw in ``task.batch(step, rank, world_size)`` comes from a generator seeded by its
arguments, so the batch is a pure function of them. Worker processes can therefore draw the next
steps' batches ahead, in order, and the model trains on exactly the batches it would have drawn
itself: the same weights, bit for bit (``tests/test_prefetch.py``).

Only tasks that draw their batches (``renders_batches = True``: the judge, the autoencoder, CLIP,
the pixel baseline) use workers; a latent stage's batch is a look-up in its encoded items. On a
CPU the cores are already training, so ``TrainConfig.render_workers = None`` (the default) means
none there, and on a GPU under Linux :data:`MAX_WORKERS` at most, leaving two cores to each
training process. Where several training processes share the machine (``torchrun``'s ranks on one
node, ``LOCAL_WORLD_SIZE``; the course's lanes, ``MINILDM_LANES``), each gets its share of the
cores: 16 cores and two lanes give each lane 6 workers, not 8 (18 drawing processes on 16 cores).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

MAX_WORKERS = 8
# Linux forks the workers, so they share the task as it is, networks on the GPU included (they
# draw on the CPU and never touch those); Python 3.14 starts them by "forkserver" unless told.
_FORK = "fork" if sys.platform == "linux" else None
AHEAD_PER_WORKER = 4  # batches each worker keeps ready
CORES_KEPT = 2  # cores left to each training process
LANES_ENV = "MINILDM_LANES"  # set by ``minildm course`` for the jobs it runs side by side


def render_workers(task, requested: int | None, device: torch.device) -> int:
    """How many worker processes draw ``task``'s batches: ``requested`` if given, else up to
    :data:`MAX_WORKERS` on a GPU (two cores left to training) and none on a CPU; none for a task
    whose batches are not drawn."""
    if not getattr(task, "renders_batches", False):
        return 0
    if requested is not None:
        return max(0, requested)
    if device.type != "cuda" or sys.platform != "linux":
        return 0  # elsewhere workers start by pickling the task, its networks too
    return gpu_machine_workers()


def gpu_machine_workers() -> int:
    """The workers a GPU run on this machine draws with: its processes' share of the cores, less
    :data:`CORES_KEPT` for the training process itself, at most :data:`MAX_WORKERS`."""
    return max(0, min(MAX_WORKERS, (os.cpu_count() or 1) // training_processes() - CORES_KEPT))


def training_processes() -> int:
    """How many training processes share this machine's cores: torchrun's ranks on this node
    (``LOCAL_WORLD_SIZE``) times the course's lanes (``MINILDM_LANES``), each 1 when unset."""
    count = 1
    for name in ("LOCAL_WORLD_SIZE", LANES_ENV):
        try:
            count *= max(1, int(os.environ.get(name, "1")))
        except ValueError:
            pass  # not ours to judge: torchrun and the course write these
    return count


class _StepBatches(Dataset):
    """Item ``i``: micro-batch ``i % len(virtual_ranks)`` of step ``start + i // len(virtual_ranks)``,
    in the order the training loop asks for them."""

    def __init__(self, task, start: int, stop: int, virtual_ranks: list[int], world_size: int):
        self.task, self.start, self.stop = task, start, stop
        self.virtual_ranks, self.world_size = virtual_ranks, world_size

    def __len__(self) -> int:
        return (self.stop - self.start) * len(self.virtual_ranks)

    def __getitem__(self, i: int):
        step, micro = divmod(i, len(self.virtual_ranks))
        return self.task.batch(self.start + step, self.virtual_ranks[micro], self.world_size)


def _as_drawn(batch):
    return batch


def batches_ahead(task, start: int, stop: int, virtual_ranks: list[int], world_size: int, workers: int,
                  pin_memory: bool = False) -> Iterator:
    """The batches of steps ``start`` … ``stop - 1`` (each step's micro-batches for ``virtual_ranks``
    in turn), drawn ahead by ``workers`` processes and handed over in order."""
    loader = DataLoader(_StepBatches(task, start, stop, virtual_ranks, world_size), batch_size=None,
                        shuffle=False, num_workers=workers, collate_fn=_as_drawn, pin_memory=pin_memory,
                        prefetch_factor=AHEAD_PER_WORKER, multiprocessing_context=_FORK if workers else None)
    return iter(loader)
