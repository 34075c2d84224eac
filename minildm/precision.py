"""Which precision a run computes in: bf16 autocast where this machine does it faster, fp32 elsewhere.

Mixed precision (bf16 autocast: matrix products and convolutions in bfloat16, the weights and the
optimiser in fp32) is a speed trick, not part of any of the three papers. Whether it pays depends
on the hardware, and on a CPU it can cost instead of save. Measured with ``minildm bench``'s
training steps at the ``cpu`` profile's sizes (``data/measurements/``):

* a 2-core Xeon **with AMX** (Advanced Matrix Extensions: bf16 matrix tiles) multiplies 2048²
  bf16 matrices at 1700–2000 GFLOP/s, and its judge, autoencoder and LDM steps ran 1.93×, 1.77×
  and 1.30× faster under bf16 autocast;
* a 2-core Xeon **without AMX** (AVX-512 with its BF16 dot-product instructions,
  ``bench_cpu_no_amx.json``) multiplied them at 166 GFLOP/s in bf16 against 325 in fp32, and the
  same steps ran 0.96×, 0.85× and 0.79× as fast under bf16, guided sampling 0.90×: the bf16
  products are no faster there, and autocast adds a cast of every weight at every use. The one
  exception measured is the pixel baseline's step (1.55×), on 32×32 feature maps where the latent
  UNet has 8×8; why bf16 pays there was not traced;
* a CUDA GPU with bf16 support (compute capability 8.0 and up: A100, H100) gets bf16, the usual
  setting for diffusion training on such GPUs (not yet measured here: no GPU has been lent).

So a profile may ask for ``mixed_precision="auto"`` and :func:`resolve` picks ``"bf16"`` on a
CUDA GPU that supports it and on a CPU with AMX, ``"no"`` (fp32) otherwise. The choice depends on
the machine, never on a timing, so it is the same at every call; the card of a run records it
(``mixed_precision``) beside the profile's request (``train.mixed_precision``). bf16 and fp32 runs
of one seed are two different draws, as runs on different thread counts are.

Sampling follows the same rule (:func:`sampling_autocast`): on the CPU the UNet samples under bf16
autocast where AMX makes that faster; on a GPU, and on a CPU without AMX, in fp32.
"""

from __future__ import annotations

import contextlib
import functools

import torch

AUTO = "auto"
MIXED_PRECISIONS = ("no", "bf16", "fp16", AUTO)


@functools.cache
def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU has AMX bf16 tiles (and the OS lets torch use them)."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(is_supported()) if is_supported is not None else False
    except RuntimeError:
        return False


def bf16_is_faster(device_type: str) -> bool:
    """Whether bf16 autocast speeds up training and sampling on ``device_type`` ("cpu" or "cuda")."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16_tiles()


def resolve(mixed_precision: str, device_type: str) -> str:
    """The precision a run with ``mixed_precision`` computes in on ``device_type``: ``"auto"`` becomes
    ``"bf16"`` where :func:`bf16_is_faster`, else ``"no"``; anything else is returned as asked."""
    if mixed_precision != AUTO:
        return mixed_precision
    return "bf16" if bf16_is_faster(device_type) else "no"


_forced_cpu_sampling: bool | None = None  # set by cpu_sampling_in_bf16, for `minildm bench`


def sampling_autocast(device: torch.device):
    """The autocast context the UNet samples in: bf16 on a CPU where :func:`bf16_is_faster`, else
    none (fp32). Outputs are cast back with ``.float()`` by the caller."""
    in_bf16 = bf16_is_faster("cpu") if _forced_cpu_sampling is None else _forced_cpu_sampling
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cpu" and in_bf16)


@contextlib.contextmanager
def cpu_sampling_in_bf16(in_bf16: bool):
    """Within this block the CPU samples in bf16 (True) or fp32 (False) whatever the machine has:
    how ``minildm bench`` times one against the other."""
    global _forced_cpu_sampling
    before, _forced_cpu_sampling = _forced_cpu_sampling, in_bf16
    try:
        yield
    finally:
        _forced_cpu_sampling = before
