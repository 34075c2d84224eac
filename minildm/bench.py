"""``minildm bench`` — speed figures, as ratios of timings taken in one run on one machine.

Absolute timings on shared machines are noise; a ratio of two timings taken back to back is
a fact about the code. Each timing is the median of several repeats after a warm-up; the two
sides of a training-step, matmul or sampling ratio are timed in alternating rounds
(:func:`alternating_median_times`), as are the two attention layers of the attention ratio.

* ``<stage>_step_bf16_speedup`` — a training step of the stage (the profile's sizes) in fp32
  over the same step under bf16 autocast: whether mixed precision pays on this device. The
  autoencoder's step is timed with its GAN and judge-feature terms switched on.
* ``data_share_of_step`` — rendering a batch of the shapes world over a whole judge step:
  whether the procedural data is the bottleneck.
* ``judge_batches_workers_speedup`` — drawing the judge's batches in the training process over
  drawing them with ``render_workers_timed`` worker processes (the number a GPU run on this
  machine would use, at least 2; :mod:`minildm.prefetch`), their start-up counted: what drawing
  ahead gains where the renderer, not the network, would set the pace.
* ``unet_step_speed_vs_diffusers`` — a training step of diffusers' ``UNet2DConditionModel`` at
  the configuration matched to the ldm stage's UNet (same widths, levels, attention levels,
  heads, context width) over ours, both in ``ldm_step_precision``, the precision the ldm stage
  trains in on this device (bf16, or fp32 — ``"no"`` — where bf16 does not pay): above 1, ours
  is faster. None when diffusers (a test extra) is not installed.
* ``attention_explicit_speed_vs_sdpa`` — forward and backward of one attention layer at the
  UNet's 8×8 self-attention size, in ``ldm_step_precision``, with
  ``F.scaled_dot_product_attention`` over the explicit matmul–softmax that
  :mod:`minildm.attention` uses (above 1: explicit is faster).
* ``ldm_step_bf16_speedup`` — the LDM UNet's training step in fp32 over bf16 autocast.
* ``latent_vs_pixel_sampling_speedup`` — LDM's claim: the reference latent model's guided DDIM
  sampling (decoder included) against the reference pixel model's, images per second.
* ``latent_sampling_bf16_speedup`` — (CPU) the reference LDM's same guided sampling in fp32 over
  bf16 autocast, whatever :mod:`minildm.precision` would pick here: whether sampling in bf16 pays.
* ``add_1step_vs_teacher_speedup`` — ADD's claim: the reference student's single step against its
  teacher's 50 guided steps, both decoded (``minildm.stages.add.sampling_speed``).
* ``items_read_speedup_over_encoding`` — making the diffusion stages' item cache
  (:mod:`minildm.stages.items`, the reference autoencoder, 1024 items) by rendering
  and encoding the items, over reading their latents back from an items file as the experts and
  the ADD student do from their LDM's run: what encoding once per chain saves.
* ``ldm_step_flops_share_of_matmul_peak`` — the FLOP/s an LDM training step achieves in
  ``ldm_step_precision`` (its FLOPs counted by ``torch.utils.flop_counter``) over the FLOP/s of
  one large matrix multiply in the same precision on this device: how much of the machine a
  small UNet can use.
* ``bf16_is_faster`` — :func:`minildm.precision.bf16_is_faster`: whether a profile's
  ``mixed_precision="auto"`` trains (and the CPU samples) in bf16 on this device; on a CPU that
  is whether it has AMX tiles, or is AMD's with AVX-512 BF16. ``matmul_gflop_per_s_fp32`` beside
  the bf16 rate shows why.
  ``bf16_is_native`` — :func:`minildm.precision.bf16_is_native`: the same for
  ``"auto-native"`` (the pixel baseline's request), which also counts AVX-512 BF16.
* ``stages`` — each stage's training throughput (images/s, the profile's batch and the precision
  it resolves to), its step in fp32 over bf16 autocast (``bf16_speedup``), and
  the peak memory of a process that does nothing but build the stage and train it for a few
  steps (CPU: peak resident memory, interpreter and torch included — ``baseline_process_mb`` is a
  process that only imports them; CUDA: peak allocated tensor memory); ``adam_fused_speedup``,
  the AdamW update of the stage's parameters by torch's default implementation (on the CPU a
  loop over the tensors) over the fused one the training loop uses, and ``adam_share_of_step``,
  the fused update's time over the whole training step's. The experts' step is the
  LDM's (on an interval of t), so it is not timed twice.
* plus the absolute throughputs behind the ratios, for the record.

No figure's timed rounds run past :data:`FIGURE_BUDGET_S` (then the slow side gets fewer
repeats): on a CPU without bf16 instructions a bf16 step is emulated and about 18× slower, and
before the cap one bench there ran for more than 36 minutes.

The sampling ratios use the reference checkpoints (the cpu profile's models) whatever ``--profile``
says; the training figures use the profile's sizes, with two exceptions. Where the reference text
encoder and autoencoder do not fit the profile (the gpu profile's 64 px), the ldm and pixel steps
are timed with untrained ones of its sizes (:func:`profile_sized_parts`). The add step is always
the reference teacher's (the cpu profile's sizes) at the profile's batch, because the student is
that teacher's copy and no 64 px teacher ships.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from minildm.config import get_profile
from minildm.precision import (bf16_is_faster, bf16_is_native, cpu_sampling_in_bf16, machine_device_type,
                               resolve as resolve_precision)
from minildm.prefetch import gpu_machine_workers
from minildm.train import adam


def _synchronized(fn) -> None:
    """Call ``fn`` and wait for the GPU work it queued, so that a timing covers that work (on a
    CPU, or before CUDA is first used, it is a plain call)."""
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        _synchronized(fn)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _synchronized(fn)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# the most a figure's timed rounds may take (alternating_median_times's budget_s)
FIGURE_BUDGET_S = 60.0


def alternating_median_times(fns: dict, rounds: int = 5, warmup: int = 2,
                             budget_s: float | None = FIGURE_BUDGET_S) -> dict:
    """{name: median seconds} of the callables ``fns``, after ``warmup`` calls of each, timed in
    ``rounds`` rounds that alternate their order (A B, B A, A B …). The step, matmul and
    sampling ratios are taken this way: timed in blocks one after the other, whichever ran first
    in a fresh process read slower (CLIP's bf16 speedup read 1.29 that way and 0.85 alternated).

    ``budget_s`` (every bench figure's :data:`FIGURE_BUDGET_S` unless given; None: no cap) caps
    the time a figure may take, so that one very slow side (bf16 on a CPU that
    has no bf16 instructions emulates it, about 18× slower) does not hold the bench for an hour:
    a callable whose first warm-up call took longer than ``budget_s / rounds`` is not warmed up
    again, and no round starts once the timed rounds have taken ``budget_s``. At least one round
    is always timed, so every figure is still a ratio of timings taken side by side. On a GPU each
    call is timed to the end of the work it queued (:func:`_synchronized`)."""
    for fn in fns.values():
        for call in range(warmup):
            start = time.perf_counter()
            _synchronized(fn)
            if call == 0 and budget_s is not None and time.perf_counter() - start > budget_s / rounds:
                break
    seconds = {name: [] for name in fns}
    order = list(fns)
    started = time.perf_counter()
    for round_ in range(rounds):
        if round_ > 0 and budget_s is not None and time.perf_counter() - started > budget_s:
            break
        for name in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            _synchronized(fns[name])
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def training_step_fn(task, batch, device_type: str, dtype: torch.dtype | None):
    """One optimisation step of a task (and of its critic, if it has one), optionally under autocast."""
    optimizer = adam(task.model.parameters(), lr=1e-5)  # the training loop's optimizer
    critic = getattr(task, "critic", None)
    critic_optimizer = adam(critic.parameters(), decoupled_weight_decay=False, lr=1e-5) if critic is not None else None

    def step():
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if critic is not None:
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                result = task.critic_loss(critic, batch)
            if result is not None:
                critic_optimizer.zero_grad(set_to_none=True)
                result[0].backward()
                critic_optimizer.step()

    return step


def _speedup(task, batch, device: str) -> tuple[float, float]:
    """Median seconds of the task's training step in fp32 and under bf16 autocast."""
    times = alternating_median_times({"fp32": training_step_fn(task, batch, device, None),
                                      "bf16": training_step_fn(task, batch, device, torch.bfloat16)})
    return times["fp32"], times["bf16"]


def run_bench(profile_name: str = "cpu", device: str | None = None) -> dict:
    from minildm.data.datasets import ShapesDataset
    from minildm.judge import JudgeTask
    from minildm.stages import judge as judge_stage
    from minildm.stages.ae import AutoencoderTask

    device = device or machine_device_type()
    profile = get_profile(profile_name)
    torch.manual_seed(0)

    judge_cfg = profile.judge_train
    judge_task = JudgeTask(profile.judge, profile.shapes, judge_cfg.batch_size)
    judge_task.model.to(device)
    judge_batch = send_to_device(judge_task.batch(0, 0, 1), device)
    t_render = _median_time(lambda: judge_task.batch(1, 0, 1))
    judge_fp32, judge_bf16 = _speedup(judge_task, judge_batch, device)
    with torch.no_grad():
        t_read = _median_time(lambda: judge_task.model(judge_batch[0]))
    draw_workers = max(2, gpu_machine_workers())
    drawing = _drawing_times(judge_task, draw_workers)

    ae_cfg = profile.ae_train
    reference_judge = judge_stage.load(None)[0] if profile.ae.perceptual_weight > 0 else None
    ae_task = AutoencoderTask(profile.ae, ShapesDataset(10**9, cfg=profile.shapes), ae_cfg.batch_size,
                              0, reference_judge)
    ae_task.model.to(device)
    ae_task.critic.to(device)
    ae_batch = send_to_device(ae_task.batch(profile.ae.disc_start, 0, 1), device)  # GAN switched on
    ae_fp32, ae_bf16 = _speedup(ae_task, ae_batch, device)

    unet = _unet_step_times(profile, device)
    attention_sdpa, attention_explicit = _attention_times(profile, device, unet["precision"])
    matmul_rate = dict(zip(("bf16", "no"), matmul_rates(device, (torch.bfloat16, torch.float32))))
    ldm_flops_per_s = unet["flops"] / unet["ours"]
    sampling = _sampling_speedups(device, profile)
    items_encode, items_read = _item_cache_times()

    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "profile": profile.name,
        "judge_step_bf16_speedup": round(judge_fp32 / judge_bf16, 3),
        "ae_step_bf16_speedup": round(ae_fp32 / ae_bf16, 3),
        "data_share_of_step": round(t_render / (t_render + min(judge_fp32, judge_bf16)), 3),
        "render_images_per_s": round(judge_cfg.batch_size / t_render, 1),
        "judge_batches_workers_speedup": round(drawing["process"] / drawing["workers"], 2),
        "render_workers_timed": draw_workers,
        "judge_train_steps_per_s_fp32": round(1 / judge_fp32, 2),
        "judge_train_steps_per_s_bf16": round(1 / judge_bf16, 2),
        "judge_read_images_per_s": round(judge_cfg.batch_size / t_read, 1),
        "ae_train_steps_per_s_fp32": round(1 / ae_fp32, 2),
        "ae_train_steps_per_s_bf16": round(1 / ae_bf16, 2),
        "ldm_step_precision": unet["precision"],
        "unet_step_speed_vs_diffusers": round(unet["theirs"] / unet["ours"], 3) if unet["theirs"] else None,
        "unet_parameters_ours_and_diffusers": unet["parameters"],
        "ldm_train_steps_per_s": round(1 / unet["ours"], 2),
        "attention_explicit_speed_vs_sdpa": round(attention_sdpa / attention_explicit, 3),
        "ldm_step_bf16_speedup": round(unet["fp32"] / unet["bf16"], 3),
        **sampling,
        "items_read_speedup_over_encoding": round(items_encode / items_read, 1),
        "items_encoded_per_s": round(ITEMS_TIMED / items_encode, 1),
        "ldm_step_gflop": round(unet["flops"] / 1e9, 2),
        "ldm_step_gflop_per_s": round(ldm_flops_per_s / 1e9, 1),
        "matmul_gflop_per_s_bf16": round(matmul_rate["bf16"] / 1e9, 1),
        "matmul_gflop_per_s_fp32": round(matmul_rate["no"] / 1e9, 1),
        "bf16_is_faster": bf16_is_faster(torch.device(device).type),
        "bf16_is_native": bf16_is_native(torch.device(device).type),
        "ldm_step_flops_share_of_matmul_peak": round(ldm_flops_per_s / matmul_rate[unet["precision"]], 3),
        "stages": {name: stage_figures_in_subprocess(name, profile.name, device) for name in THROUGHPUT_STAGES},
        "baseline_process_mb": stage_figures_in_subprocess("none", profile.name, device)["peak_memory_mb"],
    }


BATCHES_DRAWN = 16


def _drawing_times(task, workers: int) -> dict:
    """Median seconds to draw :data:`BATCHES_DRAWN` of ``task``'s batches in this process, and
    with ``workers`` worker processes (:mod:`minildm.prefetch`) started afresh each round, so that
    no batch was drawn ahead while the other side was timed; their start-up is counted."""
    from minildm.prefetch import batches_ahead

    def in_process():
        for step in range(BATCHES_DRAWN):
            task.batch(step, 0, 1)

    def by_workers():
        drawn = batches_ahead(task, 0, BATCHES_DRAWN, [0], 1, workers)
        for _ in range(BATCHES_DRAWN):
            next(drawn)
        del drawn
    return alternating_median_times({"process": in_process, "workers": by_workers}, rounds=3, warmup=1)


def matched_diffusers_unet(cfg):
    """diffusers' ``UNet2DConditionModel`` configured like our :class:`minildm.unet.UNet`."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channel_mult)
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(levels)))
    return UNet2DConditionModel(
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.heads,  # diffusers: "head dim" = heads (#2011)
        norm_num_groups=8, transformer_layers_per_block=cfg.transformer_depth)


def _unet_step_times(profile, device: str) -> dict:
    """Median training-step times of our UNet in fp32 and under bf16 autocast, and of diffusers'
    matched one in the precision the ldm stage trains in on this device (``precision``: what its
    ``mixed_precision`` resolves to here — a comparison in bf16 on a CPU that emulates bf16 would
    time emulation, not the two UNets); our step's FLOPs."""
    from minildm.unet import UNet

    cfg = profile.ldm.unet
    batch = profile.ldm_train.batch_size
    in_bf16 = resolve_precision(profile.ldm_train.mixed_precision, torch.device(device).type) == "bf16"
    precision, dtype = ("bf16", torch.bfloat16) if in_bf16 else ("no", None)
    x = torch.randn(batch, cfg.in_channels, 8, 8, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 12, cfg.context_dim, device=device)

    def step_fn(model, forward, dtype):
        optimizer = adam(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = forward(model).float().pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    ours = UNet(cfg).to(device)
    forward = lambda m: m(x, t, {"context": context})  # noqa: E731
    steps = {"fp32": step_fn(ours, forward, None), "bf16": step_fn(ours, forward, torch.bfloat16)}
    flops = training_step_flops(ours, forward)
    try:
        theirs = matched_diffusers_unet(cfg).to(device)
    except ImportError:
        theirs = None
    else:
        steps["theirs"] = step_fn(theirs, lambda m: m(x, t, encoder_hidden_states=context).sample, dtype)
    times = alternating_median_times(steps, rounds=3)
    return {"precision": precision, "ours": times["bf16" if in_bf16 else "fp32"],
            "fp32": times["fp32"], "bf16": times["bf16"], "theirs": times.get("theirs"), "flops": flops,
            "parameters": [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)] if theirs else None}


def training_step_flops(model, forward) -> int:
    """FLOPs of one forward and backward pass, counted by ``torch.utils.flop_counter`` (matrix
    multiplies and convolutions: what dominates; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward(model).float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rates(device: str, dtypes: tuple[torch.dtype, ...], size: int = 2048) -> list[float]:
    """FLOP/s of one ``size``×``size`` matrix multiply in each of ``dtypes`` (timed in alternating
    rounds): this device's practical peak in each."""
    def product(dtype):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)

        def run():
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return run
    times = alternating_median_times({dtype: product(dtype) for dtype in dtypes})
    return [2 * size**3 / times[dtype] for dtype in dtypes]


def _sampling_speedups(device: str, profile) -> dict:
    """Latent against pixel sampling, and the ADD student against its teacher (reference models)."""
    from minildm.stages import add as add_stage
    from minildm.stages import ldm, pixel

    batch = 16 if profile.name == "smoke" else 64
    prompts = [record["prompt"] for record in ldm.evaluation_prompts(batch)]
    steps = 5 if profile.name == "smoke" else 50
    pipelines = {}
    for name, stage in (("latent", ldm), ("pixel", pixel)):
        pipeline = pipelines[name] = stage.load(None)[0]
        pipeline.unet.to(device)
        if pipeline.autoencoder is not None:
            pipeline.autoencoder.to(device)
    in_bf16 = bf16_is_faster("cpu")

    def sample(name: str, other_precision: bool, count: int, n_steps: int) -> None:
        """``count`` prompts in ``n_steps`` steps with pipeline ``name``; with ``other_precision``
        (CPU), in the precision this machine does not pick."""
        with cpu_sampling_in_bf16(not in_bf16) if other_precision else contextlib.nullcontext():
            pipelines[name](prompts[:count], steps=n_steps)

    runs = {"latent": ("latent", False), "pixel": ("pixel", False)}
    if device == "cpu":  # the latent sampling again, in the precision this machine does not pick
        runs["latent_other_precision"] = ("latent", True)
    for name, other in runs.values():
        sample(name, other, 2, 2)  # warm-up: two prompts, two steps
    # two rounds, A B C then C B A: whichever runs first does not read slower for it
    seconds = alternating_median_times({key: partial(sample, *run, batch, steps) for key, run in runs.items()},
                                       rounds=2, warmup=0)
    sampling_bf16_speedup = None
    if device == "cpu":
        latent, other = seconds["latent"], seconds["latent_other_precision"]
        sampling_bf16_speedup = other / latent if in_bf16 else latent / other
    distilled, _ = add_stage.load(None)
    if profile.name == "smoke":
        distilled.teacher.cfg = dataclasses.replace(distilled.teacher.cfg, sample_steps=steps)
    add = add_stage.sampling_speed(distilled, prompts, rounds=2)
    return {"latent_vs_pixel_sampling_speedup": round(seconds["pixel"] / seconds["latent"], 2),
            "latent_images_per_s": round(batch / seconds["latent"], 1),
            "pixel_images_per_s": round(batch / seconds["pixel"], 1),
            "latent_sampling_bf16_speedup": round(sampling_bf16_speedup, 3) if sampling_bf16_speedup else None,
            "add_1step_vs_teacher_speedup": round(add["speedup_1step"], 1),
            "add_1step_vs_teacher_denoising_speedup": round(add["speedup_1step_denoising"], 1),
            "sampling_steps_and_batch": [steps, batch]}


# ------------------------------------------------------------------------ per-stage throughput
THROUGHPUT_STAGES = ("judge", "ae", "clip", "ldm", "pixel", "add")
STEPS_TIMED = 3


def stage_task(name: str, profile):
    """The training task of stage ``name`` as the stage builds it, with a small item cache, and
    the batch of one step (the autoencoder's with its GAN switched on)."""
    from minildm.data.datasets import ShapesDataset
    from minildm.judge import JudgeTask
    from minildm.stages import add as add_stage
    from minildm.stages import judge as judge_stage
    from minildm.stages import ldm
    from minildm.stages.ae import AutoencoderTask
    from minildm.stages.clip import ClipTask

    if name == "judge":
        task = JudgeTask(profile.judge, profile.shapes, profile.judge_train.batch_size)
    elif name == "ae":
        judge = judge_stage.load(None)[0] if profile.ae.perceptual_weight > 0 else None
        task = AutoencoderTask(profile.ae, ShapesDataset(10**9, cfg=profile.shapes), profile.ae_train.batch_size,
                               0, judge)
        return task, task.batch(profile.ae.disc_start, 0, 1)
    elif name == "clip":
        task = ClipTask(profile.clip, profile.clip_train.batch_size, profile.clip_train.seed)
    elif name in ("ldm", "pixel"):
        train_cfg = getattr(profile, f"{name}_train")
        task = ldm.make_task(name, getattr(profile, name), train_cfg, profile, profile_sized_parts(profile),
                             cache_size=2 * train_cfg.batch_size)
    elif name == "add":
        task = add_stage.make_task(profile, profile.add_train, cache_size=2 * profile.add_train.batch_size)[0]
    else:
        raise ValueError(f"no throughput figure for stage {name!r}")
    return task, task.batch(0, 0, 1)


def profile_sized_parts(profile) -> dict | None:
    """The diffusion stages' frozen parts for timing their steps: None (the reference text encoder
    and autoencoder) when those fit the profile; else an untrained text encoder and autoencoder of
    the profile's own configurations. The references are the cpu profile's (32 px, 64-wide text
    tokens); the gpu profile's UNets take 64 px images and 128-wide tokens, and no reference of
    that size ships. A step's time does not depend on the weights."""
    from minildm.autoencoder import AutoencoderKL
    from minildm.stages import ae as ae_stage
    from minildm.stages import clip as clip_stage
    from minildm.stages.clip import ClipTask

    encoder, autoencoder = clip_stage.load(None)[0], ae_stage.load(None)[0]
    if (autoencoder.cfg.image_size, encoder.token_dim) == (profile.shapes.image_size, profile.ldm.unet.context_dim):
        return None
    return {"encoder": ClipTask(profile.clip, 1, 0).model, "autoencoder": AutoencoderKL(profile.ae)}


def stage_figures(name: str, profile_name: str, device: str) -> dict:
    """Images/s of stage ``name``'s training step (the profile's batch size and mixed precision)
    and this process's peak memory. Meant to run in a process of its own."""
    profile = get_profile(profile_name)
    figures = {}
    if name != "none":
        task, batch = stage_task(name, profile)
        task.model.to(device)
        if getattr(task, "critic", None) is not None:
            task.critic.to(device)
        batch = send_to_device(batch, device)
        train_cfg = getattr(profile, f"{name}_train")
        precision = resolve_precision(train_cfg.mixed_precision, torch.device(device).type)
        other = "no" if precision == "bf16" else "bf16"
        steps = {p: training_step_fn(task, batch, device, torch.bfloat16 if p == "bf16" else None)
                 for p in (precision, other)}

        def timed(p):
            steps[p]()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        timed(precision)  # warm-up, then the memory reading: the precision the stage trains in alone
    figures["peak_memory_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda")
                                 else peak_resident_mb())
    if name != "none":
        # then both precisions in alternating rounds: whether "auto" chose well
        timed(other)
        median = alternating_median_times({p: partial(timed, p) for p in (precision, other)},
                                          rounds=STEPS_TIMED, warmup=0)
        figures["train_images_per_s"] = round(train_cfg.batch_size / median[precision], 1)
        figures["batch_size"] = train_cfg.batch_size
        figures["mixed_precision"] = precision
        figures["bf16_speedup"] = round(median["no"] / median["bf16"], 3)
        adam_times = adam_step_times([p for p in task.model.parameters() if p.requires_grad], device)
        figures["adam_fused_speedup"] = round(adam_times["default"] / adam_times["fused"], 2)
        figures["adam_share_of_step"] = round(adam_times["fused"] / median[precision], 3)
    return figures


def adam_step_times(parameters: list[torch.Tensor], device: str, rounds: int = 9) -> dict[str, float]:
    """Median seconds of one AdamW update of ``parameters`` (with random gradients) by torch's
    default implementation on this device (``"default"``: on the CPU a Python loop over the
    tensors, on CUDA the ``foreach`` kernels) and by the fused one that :func:`minildm.train.adam`
    uses. The parameters are copied first, so the model is left as it was."""
    copies = [p.detach().clone().requires_grad_(True) for p in parameters]
    for copy in copies:
        copy.grad = torch.randn_like(copy)
    optimizers = {"default": torch.optim.AdamW(copies, lr=1e-5),
                  "fused": adam(copies, lr=1e-5)}

    def timed(name):
        def run():
            optimizers[name].step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return run
    return alternating_median_times({name: timed(name) for name in optimizers}, rounds=rounds)


def peak_resident_mb() -> float | None:
    """This process's peak resident memory. Linux: ``VmHWM`` — not ``ru_maxrss``, which a child
    process inherits from its parent's size at the fork and keeps across ``exec``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def stage_figures_in_subprocess(name: str, profile_name: str, device: str) -> dict:
    """:func:`stage_figures` in a fresh Python process, so that its peak memory is the stage's alone."""
    code = ("import json, sys; from minildm.bench import stage_figures; "
            "print(json.dumps(stage_figures(*sys.argv[1:4])))")
    result = subprocess.run([sys.executable, "-c", code, name, profile_name, device],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench of stage {name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


ITEMS_TIMED = 1024


def _item_cache_times() -> tuple[float, float]:
    """Median seconds to make an item cache of :data:`ITEMS_TIMED` items with the reference
    autoencoder by encoding them, and by reading their latents from the items file written once
    beforehand, where the stages encode: on the GPU when there is one, else on the CPU."""
    import tempfile

    from minildm.stages import ae as ae_stage
    from minildm.stages.items import ItemCache, item_cache

    autoencoder = ae_stage.load(None)[0]
    size = autoencoder.cfg.image_size
    with tempfile.TemporaryDirectory() as folder:
        item_cache(ITEMS_TIMED, 0, size, autoencoder, (folder,))
        times = alternating_median_times({
            "encode": lambda: ItemCache(ITEMS_TIMED, 0, size, autoencoder),
            "read": lambda: item_cache(ITEMS_TIMED, 0, size, autoencoder, (folder,))}, rounds=3, warmup=1)
    return times["encode"], times["read"]


def _attention_times(profile, device: str, precision: str):
    """One attention layer, forward + backward in ``precision`` (the ldm stage's here): SDPA
    against the explicit softmax."""
    import torch.nn.functional as F

    from minildm.attention import Attention

    cfg = profile.ldm.unet
    layer = Attention(cfg.model_channels, None, cfg.heads, cfg.model_channels // cfg.heads).to(device)
    x = torch.randn(profile.ldm_train.batch_size, 64, cfg.model_channels, device=device, requires_grad=True)

    def sdpa_forward(h):
        split = lambda y: y.view(y.shape[0], y.shape[1], layer.heads, layer.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(layer.to_q(h)), split(layer.to_k(h)), split(layer.to_v(h)))
        return layer.to_out(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))

    def run(forward):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            forward(x).float().sum().backward()

    times = alternating_median_times({"sdpa": partial(run, sdpa_forward), "explicit": partial(run, layer)})
    return times["sdpa"], times["explicit"]
