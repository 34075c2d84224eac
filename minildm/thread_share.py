"""A process's share of the CPU cores, set from outside while it runs.

``minildm course --lanes 2`` runs two jobs at once (say the pixel baseline beside the
autoencoder). The course process decides how many of the machine's cores each job may use — half
each while both run, all of them when one is left alone — and writes that number into a small
file per job; the job's process reads it between training steps and between sampling batches and
calls :func:`torch.set_num_threads` when it changed.

Why not one process with two threads? Each stage seeds torch's *global* random generator at every
step (that is what makes a run reproducible and resumable), so two stages in one process would
stir each other's randomness. Separate processes keep every stage exactly as it runs alone.

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
