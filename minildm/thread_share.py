"""A process's share of the CPU cores, set from outside while it runs.

``minildm course --lanes 2`` runs two jobs at once (say the pixel baseline beside the
autoencoder). The course process decides how many of the machine's cores each job may use — half
each while both run, all of them when one is left alone — and writes that number into a small
file per job; the job's process reads it between training steps and between sampling batches and
calls :func:`torch.set_num_threads` when it changed.

Why not one process with two threads? Each stage seeds torch's *global* random generator at every
step (that is what makes a run reproducible and resumable), so two stages in one process would
stir each other's randomness. Separate processes keep every stage's random draws exactly as
they are when it runs alone.

What changing the count does not keep is the last bits of the arithmetic: a matrix product split
over two threads sums in another order than on one (a bf16 ``nn.Linear`` on this CPU differs by
about 2e-4; the smoke profile's LDM trained twice on one thread gives the same weights to the bit,
once on one thread and once on two, weights up to 2e-6 apart), and the step at which a job goes from
one thread to two depends on when the job beside it ends, a matter of the clock. So a job whose
count changes while it trains (the LDM, when the pixel baseline ends before it; the jobs after the
LDM) gives a slightly different model in two courses at the same seed, and its figures move by their
own spread: the LDM's two-object alignment read 0.509 and 0.482 in two seed-1 courses. A job that
kept one count all its life (the judge, the autoencoder, CLIP, the pixel baseline) reproduces to the
digit. ``--lanes 1`` keeps every job on all the cores.
A run's card says when its count changed: its ``device`` reads ``cpu (1 thread, 2 from step 2210)``
(:func:`minildm.train.thread_changes`).

Outside the course nothing sets ``MINILDM_THREAD_SHARE`` and :func:`follow` does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "MINILDM_THREAD_SHARE"  # the path of the file that holds this process's thread count

_last_seen: tuple[float, int] | None = None  # (the file's mtime, the count it held)


def follow() -> None:
    """Take the thread count written in ``$MINILDM_THREAD_SHARE``, if it changed since the last call."""
    global _last_seen
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        mtime = os.stat(path).st_mtime
        if _last_seen is not None and _last_seen[0] == mtime:
            return
        threads = int(Path(path).read_text().strip())
    except (OSError, ValueError):  # not written yet, or being replaced: keep the current count
        return
    _last_seen = (mtime, threads)
    if threads >= 1 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def write(path: Path, threads: int) -> None:
    """Give the process that follows ``path`` ``threads`` threads (an atomic replace: never half-read)."""
    temp = path.with_suffix(".tmp")
    temp.write_text(f"{threads}\n")
    os.replace(temp, path)
