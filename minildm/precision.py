"""Which precision a run computes in: bf16 autocast where this machine does it faster, fp32 elsewhere.

Mixed precision (bf16 autocast: matrix products and convolutions in bfloat16, the weights and the
optimiser in fp32) is a speed trick, not part of any of the three papers. Whether it pays depends
on the hardware, and on a CPU it can cost instead of save. Measured with ``minildm bench``'s
training steps at the ``cpu`` profile's sizes (``data/measurements/``), on five kinds of 2-core
machine:

* an Intel Xeon **with AMX** (Advanced Matrix Extensions: bf16 matrix tiles; ``bench_cpu.json``)
  multiplies 2048² bf16 matrices at 1700–2000 GFLOP/s, and its judge, autoencoder and LDM steps
  ran 1.93×, 1.77× and 1.30× faster under bf16 autocast;
* an Intel Xeon **without AMX** but with AVX-512 BF16 dot products (``bench_cpu_no_amx.json``)
  multiplied them at 166 GFLOP/s in bf16 against 325 in fp32, and the same steps ran 0.96×,
  0.85× and 0.79× as fast under bf16, guided sampling 0.90×: the bf16 products are no faster
  there, and autocast adds a cast of every weight at every use. The one exception measured is
  the pixel baseline's step (1.55×, 1.40× and 1.30× in three bench runs), on 32×32 feature maps
  where the latent UNet has 8×8; why was not traced (its activations are the course's largest);
* an **AMD EPYC of the Zen 4 generation** (AVX-512 BF16, no AMX; ``bench_cpu_amd_zen4.json``)
  multiplied them at 209 GFLOP/s in bf16 against 154 in fp32 — the reverse of the Intel chip with
  the same instructions — and every stage's step ran faster under bf16, timed in alternating
  rounds: judge 2.41×, autoencoder 1.90×, CLIP 1.63×, LDM 1.68×, pixel 2.77×, ADD 1.36×; guided
  sampling 1.09×;
* an **AMD EPYC of the Zen 5 generation** (the same instructions on full 512-bit units;
  ``bench_cpu_amd_zen5.json``) multiplied them at 894 GFLOP/s in bf16 against 215 in fp32, and
  every stage's step ran 1.19–2.97× faster under bf16;
* an **AMD EPYC of the Zen 3 generation** (AVX2 only: no AVX-512, no bf16 instructions) took
  15.7 s for one LDM training step under bf16 autocast against 0.84–0.86 s in fp32 (medians of 8
  steps of bench's ``training_step_fn``, a scratch script, 2 threads): about 18× slower, the
  bf16 products emulated in software. ``"auto"`` gives fp32 there, as it does on every CPU
  without bf16 instructions;
* a CUDA GPU with bf16 support (compute capability 8.0 and up: A100, H100) gets bf16, the usual
  setting for diffusion training on such GPUs (not yet measured here: no GPU has been lent).

The instruction set alone does not tell the two AVX-512 BF16 machines apart, so the rule names
the vendor too. A profile may ask for one of two automatic choices, which :func:`resolve` turns
into ``"bf16"`` or ``"no"`` (fp32):

* ``"auto"`` — bf16 on a CUDA GPU that supports it, on a CPU with AMX, and on an AMD CPU with
  AVX-512 BF16; fp32 elsewhere: every stage of the ``cpu`` profile but one;
* ``"auto-native"`` — bf16 also on any other CPU with AVX-512 BF16 (the Intel one without AMX):
  the pixel baseline, the one stage measured faster in bf16 there.

A CPU with no bf16 arithmetic of its own (no AVX-512 BF16: most laptops before 2023, and any CPU
not yet measured) gets fp32 from both. The choice depends on the machine, never on a timing, so it
is the same at every call; the card of a run records it (``mixed_precision``) beside the profile's
request (``train.mixed_precision``). bf16 and fp32 runs of one seed are two different draws, as
runs on different thread counts are.

Sampling follows ``"auto"``'s rule (:func:`sampling_autocast`): on the CPU the UNet samples under
bf16 autocast where that rule says bf16 is faster; on a GPU, and on other CPUs, in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

AUTO = "auto"
AUTO_NATIVE = "auto-native"


def _torch_cpu_probe(name: str) -> bool:
    """torch's own answer to ``torch.cpu.<name>()``; False where this torch has no such probe."""
    is_supported = getattr(torch.cpu, name, None)
    try:
        return bool(is_supported()) if is_supported is not None else False
    except RuntimeError:
        return False


@functools.cache
def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU has AMX bf16 tiles (and the OS lets torch use them)."""
    return _torch_cpu_probe("_is_amx_tile_supported")


@functools.cache
def cpu_has_bf16_dot_products() -> bool:
    """Whether this CPU has AVX-512 BF16 (``vdpbf16ps``: bf16 dot products into fp32)."""
    return _torch_cpu_probe("_is_avx512_bf16_supported")


@functools.cache
def cpu_is_amd() -> bool:
    """Whether this CPU is AMD's: Linux's ``/proc/cpuinfo`` says ``AuthenticAMD``, or (Windows)
    ``platform.processor()`` does."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return "AuthenticAMD" in cpuinfo or "AuthenticAMD" in platform.processor()


def bf16_is_faster(device_type: str) -> bool:
    """Whether bf16 autocast speeds up training and sampling on ``device_type`` ("cpu" or "cuda"):
    a CUDA GPU with bf16; a CPU with AMX tiles, or an AMD one with AVX-512 BF16 (module docstring)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16_tiles() or cpu_is_amd() and cpu_has_bf16_dot_products()


def bf16_is_native(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 products in hardware: :func:`bf16_is_faster`, or any
    CPU with AVX-512 BF16 dot products."""
    return bf16_is_faster(device_type) or device_type == "cpu" and cpu_has_bf16_dot_products()


def resolve(mixed_precision: str, device_type: str) -> str:
    """The precision a run with ``mixed_precision`` computes in on ``device_type``: ``"auto"`` becomes
    ``"bf16"`` where :func:`bf16_is_faster`, ``"auto-native"`` where :func:`bf16_is_native`, else
    ``"no"``; anything else is returned as asked."""
    if mixed_precision == AUTO:
        return "bf16" if bf16_is_faster(device_type) else "no"
    if mixed_precision == AUTO_NATIVE:
        return "bf16" if bf16_is_native(device_type) else "no"
    return mixed_precision


def machine_device_type() -> str:
    """"cuda" where torch sees a CUDA GPU, else "cpu": where a run goes when no device is named."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_profile_in_fp32(profile, device_type: str) -> bool:
    """Whether the ``cpu`` profile's LDM will train in fp32 on this CPU (``"auto"`` where bf16 is not
    faster): the README's training times were measured in bf16, on a Xeon with AMX, so the course
    and the notebooks' first cell say so in one line before they train."""
    return profile.name == "cpu" and device_type == "cpu" and resolve(profile.ldm_train.mixed_precision, "cpu") == "no"


_forced_cpu_sampling: bool | None = None  # set by cpu_sampling_in_bf16, for `minildm bench`


def sampling_precision(device: torch.device) -> str:
    """``"bf16"`` where the UNet samples under bf16 autocast on ``device`` (a CPU where
    :func:`bf16_is_faster`), else ``"fp32"``."""
    in_bf16 = bf16_is_faster("cpu") if _forced_cpu_sampling is None else _forced_cpu_sampling
    return "bf16" if device.type == "cpu" and in_bf16 else "fp32"


def sampling_autocast(device: torch.device):
    """The autocast context the UNet samples in (:func:`sampling_precision`). Outputs are cast back
    with ``.float()`` by the caller."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=sampling_precision(device) == "bf16")


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
