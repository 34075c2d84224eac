"""The one training loop that every stage (judge, autoencoder, CLIP, LDM, ...) goes through.

A stage describes itself as a :class:`TrainingTask` (its network, its batches, its loss) and calls
:func:`train`. The loop is ordinary PyTorch, with four additions that every stage wants:

* **Hugging Face Accelerate** places the model, wraps it for data-parallel training and applies
  mixed precision, so ``torchrun --nproc_per_node N`` or ``accelerate launch`` spreads the same
  code over several GPUs (or CPU processes with gloo) unchanged. Rank ``r`` of ``N`` trains on
  ``task.batch(step, r, N)``; the gradients are averaged across ranks before each update.
  ``TrainConfig.accumulate = k`` makes each process play ``k`` ranks one after the other
  (gradient accumulation), so one process with ``k = 2`` makes the same model as two processes.
* **EMA weights** (``torch.optim.swa_utils.AveragedModel``): an exponential moving average of the
  weights, smoother than the last step's; they are what ``model.safetensors`` holds and what
  sampling and evaluation use.
* **Exact resume**: the data and the randomness of step ``s`` are pure functions of
  ``(seed, s, rank)``, so a checkpoint needs only weights, EMA weights, optimizer and scheduler
  state; nothing about data loaders or random generators. ``--resume`` then continues the very
  run that an uninterrupted one would have made, bit for bit on the same machine.
* **An optional critic**: a task may carry a second network trained against the first (a GAN
  discriminator: the autoencoder's PatchGAN, ADD's discriminator). After each step of the model
  the loop takes one step of the critic on ``task.critic_loss`` with its own Adam optimizer;
  while the model's loss runs, the critic's weights are frozen.
* **A card** (``card.json``): config, command, seed, wall time, device, peak memory and the loss
  curve, so that a learner can lay their own run over the reference one.

A run folder, when finished::

    RUN/model.safetensors        EMA weights (the model to sample and evaluate with)
    RUN/card.json                how they were made
    RUN/checkpoint/              the latest periodic checkpoint (itself a loadable checkpoint)
        model.safetensors        EMA weights at that step
        card.json                the card as of that step
        raw.safetensors          the trained (non-averaged) weights
        optimizer.safetensors    AdamW moments and step counts
        critic.safetensors       the critic and its optimizer, when the task has one
        critic_optimizer.safetensors
        state.json               step, loss history, scheduler, EMA count, optimizer groups
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, send_to_device
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from minildm import thread_share
from minildm.checkpoints import (CARD, WEIGHTS, atomic_write_dir, atomic_write_file, existing_dir,
                                 load_json, load_state_into, load_tensors, load_trained,
                                 optimizer_state_from_tensors, optimizer_state_to_tensors,
                                 save_json, save_tensors)
from minildm.config import TrainConfig
from minildm.errors import UserError
from minildm.precision import machine_device_type, resolve as resolve_precision
from minildm.prefetch import batches_ahead, render_workers

__all__ = ["TrainingTask", "train", "is_main_process", "leave_process_group", "load_trained", "lr_multiplier", "ema_with_warmup", "loss_curve"]

CHECKPOINT_DIR = "checkpoint"
LOSS_CURVE_POINTS = 300


class TrainingTask(Protocol):
    """What a stage hands to :func:`train`."""

    stage: str  # "judge", "ae", "clip", "ldm", ...
    model: torch.nn.Module  # the network being trained; the EMA tracks it

    def batch(self, step: int, rank: int, world_size: int):
        """The batch of ``rank`` at ``step``: a pure function of (task seed, step, rank).

        Any nesting of tensors; :func:`train` moves it to the device. Because the data depends on
        nothing but the step, resuming needs no data-loader state.
        """

    def loss(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """``(scalar loss, {name: float})`` for ``batch``. Call ``model(...)`` (its forward) so
        that data-parallel training synchronises the gradients; it runs under autocast."""

    def card_config(self) -> dict:
        """A JSON-able config of the model and stage, stored in the card and checked on resume."""

    # Optional: a critic trained adversarially against the model. A task without one leaves
    # ``critic`` as None (or does not define it).
    critic: torch.nn.Module | None
    critic_lr: float
    critic_betas: tuple[float, float]

    def critic_loss(self, critic: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]] | None:
        """The critic's loss on ``batch`` (after the model's step on it), or None to skip the
        step (a GAN discriminator before it is switched on)."""

    # Optional: a quick measurement of the EMA model at every checkpoint, kept in the card's
    # ``progress`` as [step, training seconds, {name: value}] — e.g. how alignment grows with
    # training. Its time is not counted in the training wall clock.
    def progress_eval(self, ema_model: torch.nn.Module) -> dict[str, float]:
        """Figures of the EMA model at a checkpoint."""

    # Optional: {parameter-name prefix: factor} — those parameters learn at factor × lr (e.g. a
    # zero-initialised projection added to a pretrained model, which otherwise barely moves).
    lr_scales: dict[str, float]


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then cosine decay from 1 to 0.1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, lr: float, lr_scales: dict[str, float] | None) -> list[dict]:
    """AdamW's parameter groups: every trainable parameter at ``lr``, except those whose name
    starts with a prefix of ``lr_scales``, at ``lr × factor`` (one group per prefix, in order)."""
    scales = dict(lr_scales or {})
    groups = {prefix: [] for prefix in [None, *scales]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[next((prefix for prefix in scales if name.startswith(prefix)), None)].append(parameter)
    for prefix in scales:
        if not groups[prefix]:
            raise ValueError(f"lr_scales: no trainable parameter is named {prefix}*")
    return [{"params": params, "lr": lr * (scales[prefix] if prefix else 1.0)}
            for prefix, params in groups.items() if params]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global torch seed of one rank's step: distinct for every (seed, step, rank < 1009)."""
    return (seed * 1_000_003 + step) * 1009 + rank


def adam(params, *, decoupled_weight_decay: bool = True, **settings) -> torch.optim.Optimizer:
    """AdamW (or, with ``decoupled_weight_decay=False``, plain Adam) with torch's **fused** update.

    The update is Loshchilov and Hutter's AdamW, the same formula whichever implementation runs
    it. torch's default on the CPU is a Python loop over the parameter tensors, one small kernel
    per moment per tensor; the fused one updates every tensor in one kernel. At the ``cpu``
    profile's sizes, on a 2-core AMD Zen 4 (``minildm bench``, ``stages``:
    ``adam_fused_speedup`` and ``adam_share_of_step``; two runs in ``data/measurements/``,
    ``bench_cpu_amd_zen4_fused_adam.json`` and ``bench_cpu_amd_zen4_alternated_sampling.json``),
    the fused update ran 2.7–4.3× as fast as the default for every stage and took 0.3–2.3% of a
    training step: it saves 0.7–3.8% of every step. The two round differently in the last bits, so a run made before this change is
    a different draw from one made after it.
    """
    optimizer = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return optimizer(params, fused=True, **settings)


def ema_with_warmup(decay: float):
    """An ``AveragedModel`` update: ``ema ← d·ema + (1 − d)·weights`` with a warm-up decay
    ``d = min(decay, (1 + n) / (10 + n))``, where ``n`` counts the updates so far.

    The warm-up makes the average forget the random initial weights quickly, which matters in
    short runs (the same rule as timm's and diffusers' EMA).
    """

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        # ema_param.lerp_(param, 1 − d) for every pair, in one call rather than a Python loop
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def loss_curve(losses: list[float | None], max_points: int = LOSS_CURVE_POINTS) -> list[list]:
    """``[[step, mean loss], ...]``: the per-step losses averaged over at most ``max_points`` equal
    bins; ``step`` is the 1-based number of the last step in the bin. Steps without a value
    (``None``: a stat that starts later, like a GAN loss) are left out of the means."""
    n, bins = len(losses), min(len(losses), max_points)
    points = []
    for i in range(bins):
        lo, hi = i * n // bins, (i + 1) * n // bins
        values = [v for v in losses[lo:hi] if v is not None]
        if values:
            points.append([hi, float(f"{sum(values) / len(values):.6g}")])
    return points


def train(task: TrainingTask, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          device: str | None = None, command: str | None = None, progress: bool = True,
          extra_card: dict | None = None) -> dict:
    """Train ``task.model`` for ``cfg.steps`` steps in total and write the run to ``out_dir``;
    with ``cfg.max_train_seconds``, stop sooner once training has taken that long.

    ``resume=True`` continues from ``out_dir/checkpoint`` up to ``cfg.steps`` (a larger value than
    the first time extends the run). ``device`` is ``"cpu"``, ``"cuda"`` or ``None`` (a GPU when
    there is one). ``command`` is recorded in the card (default: this process's command line).
    Every rank returns the card; only the main process writes files. On return ``task.model``
    holds the raw trained weights; :func:`load_trained` loads the EMA weights that were saved.
    """
    _check_time_budget(cfg.max_train_seconds)
    accelerator = _make_accelerator(cfg, device)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    virtual_ranks = world_size * cfg.accumulate  # see TrainConfig.accumulate
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, resume)
    accelerator.wait_for_everyone()

    model = task.model.to(accelerator.device)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema_decay))  # before prepare()
    optimizer = adam(parameter_groups(model, cfg.lr, getattr(task, "lr_scales", None)),
                     lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    critic = getattr(task, "critic", None)
    critic_optimizer = None
    if critic is not None:
        critic = critic.to(accelerator.device)
        critic_optimizer = adam(critic.parameters(), decoupled_weight_decay=False, lr=task.critic_lr,
                                betas=task.critic_betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, cfg=cfg))
    history: dict[str, list[float]] = {"loss": []}
    measured: list = []  # [step, training seconds, figures] from task.progress_eval
    start, wall_before = 0, 0.0
    if resume:
        state = _load_training_state(out_dir / CHECKPOINT_DIR, task, cfg, accelerator,
                                     model, ema, optimizer, scheduler, critic, critic_optimizer)
        start, history, wall_before = state["step"], state["history"], state["wall_time_s"]
        measured = state.get("progress", [])

    # prepare(): DDP wrapper when world_size > 1, autocast around forward, grad scaler for fp16.
    # The scheduler stays unprepared: Accelerate would step it once per process.
    ddp_model, ddp_optimizer = accelerator.prepare(compiled(model) if cfg.compile else model, optimizer)
    ddp_model.train()
    if critic is not None:
        ddp_critic, ddp_critic_optimizer = accelerator.prepare(critic, critic_optimizer)
        ddp_critic.train()
    card_of = partial(_card, task, cfg, accelerator, command=command, extra_card=extra_card, progress=measured)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {task.stage}", dynamic_ncols=True,
               disable=not _show_progress(progress, accelerator.is_main_process))
    session_start = time.perf_counter()
    measuring = {"seconds": 0.0}  # time spent in progress_eval, left out of the wall clock

    def wall() -> float:  # seconds trained in this session and the ones it resumes
        return wall_before + time.perf_counter() - session_start - measuring["seconds"]

    workers = render_workers(task, cfg.render_workers, accelerator.device)
    own_ranks = [rank * cfg.accumulate + micro for micro in range(cfg.accumulate)]
    ahead = (batches_ahead(task, start, cfg.steps, own_ranks, virtual_ranks, workers,
                           pin_memory=accelerator.device.type == "cuda") if workers else None)
    budget = cfg.max_train_seconds
    out_of_time = budget is not None and wall_before >= budget  # resumed after the cap was reached
    done = start
    until = start if out_of_time else cfg.steps  # the step the loop stops before
    try:
        for step in range(start, until):
            thread_share.follow()  # `minildm course --lanes`: this run's share of the cores
            if critic is not None:
                critic.requires_grad_(False)  # the model's loss may look through the critic
            batches, rng_after, losses, step_stats = [], [], [], []
            for micro in range(cfg.accumulate):  # one micro-batch per virtual rank of this process
                virtual = rank * cfg.accumulate + micro
                torch.manual_seed(step_seed(cfg.seed, step, virtual))  # dropout, noise, timesteps...
                drawn = next(ahead) if ahead is not None else task.batch(step, virtual, virtual_ranks)
                batch = send_to_device(drawn, accelerator.device)
                with _sync_on_last(accelerator, ddp_model, micro, cfg.accumulate):
                    with accelerator.autocast():
                        loss, stats = task.loss(ddp_model, batch)
                    accelerator.backward(loss / cfg.accumulate)
                batches.append(batch)
                rng_after.append(_rng_state(accelerator.device))
                losses.append(loss.detach())
                step_stats.append(stats)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip)
            ddp_optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps with inf gradients
                scheduler.step()
            ddp_optimizer.zero_grad(set_to_none=True)
            ema.update_parameters(model)
            loss, stats = torch.stack(losses).mean(), _mean_stats(step_stats)
            if critic is not None:
                stats = {**stats, **_critic_step(task, ddp_critic, ddp_critic_optimizer, batches, rng_after,
                                                 accelerator)}

            if accelerator.device.type == "cpu":  # the thread count it trained on: minildm.thread_share
                stats = {**stats, THREADS: torch.get_num_threads()}
            _record(history, accelerator, loss, stats)
            recent = history["loss"][-20:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            bar.update(1)
            done = step + 1
            every = cfg.checkpoint_every
            out_of_time = budget is not None and _time_is_up(wall(), budget, accelerator)
            last = done == cfg.steps or out_of_time
            if accelerator.is_main_process and (last or every > 0 and done % every == 0):
                seconds = wall()
                if getattr(task, "progress_eval", None) is not None and (last or cfg.progress_at_every_checkpoint):
                    measured.append([done, round(seconds, 2), _measure(task, ema.module, measuring)])
                _save_training_state(out_dir / CHECKPOINT_DIR, card_of(done, history, seconds),
                                     history, seconds, model, ema, optimizer, scheduler, accelerator,
                                     critic, critic_optimizer)
            if out_of_time:
                break
    finally:
        del ahead  # stops the workers drawing batches, if any
        bar.close()
        accelerator.unwrap_model(ddp_model, keep_fp32_wrapper=False)  # undo the autocast patch
        if critic is not None:
            accelerator.unwrap_model(ddp_critic, keep_fp32_wrapper=False)
            critic.requires_grad_(True)

    stopped_early = out_of_time and done < cfg.steps  # on the last step, the steps ended it
    if stopped_early and accelerator.is_main_process:
        print(f"train {task.stage}: stopped at step {done} of {cfg.steps}: its time budget of {budget:g} s "
              "of training is spent (TrainConfig.max_train_seconds)", flush=True)
    trained = done - start
    elapsed = time.perf_counter() - session_start
    card = card_of(done, history, wall(), steps_per_s=round(trained / elapsed, 3) if trained and elapsed > 0 else None,
                   stopped_by_time_budget=stopped_early)
    if accelerator.is_main_process:
        atomic_write_file(out_dir / WEIGHTS, lambda path: save_tensors(path, ema.module.state_dict()))
        atomic_write_file(out_dir / CARD, lambda path: save_json(path, card))
    accelerator.wait_for_everyone()
    return card


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` compiled by ``torch.compile`` for training (``TrainConfig.compile``).

    The compiled module shares ``model``'s parameters; the EMA copy, the checkpoints and what
    :func:`train` returns stay the plain module, so a run's files do not depend on the option.
    TorchInductor fuses the chains of small operations (group norm, SiLU, the residual adds) that
    dominate these small networks' steps into C++ loops on the CPU. The first step traces and
    compiles: about three minutes for the cpu profile's LDM on a 2-core AMD Zen 3, seconds when
    TorchInductor's on-disk cache already holds the graph. There an LDM step then took 0.60 s
    against 0.70 eager (0.30 against 0.37 in bf16 on a 2-core Xeon with AMX), while the ADD
    student's step (its discriminator and teacher stay eager) ran 0.95× as fast compiled (README,
    *Compiling*). The compiled kernels round differently. Random operations inside the model
    (dropout) draw from torch's generator as in eager mode (TorchInductor's ``fallback_random``,
    set for the whole process), so a compiled run keeps the seed's draws and differs from the
    eager run by rounding alone.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        raise UserError("compile needs a C++ compiler on the PATH (c++, g++ or clang++) for TorchInductor's CPU "
                        "kernels; install one, or train without it (the default: compile false)")
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


def leave_process_group(status: int = 0) -> None:
    """End a rank of a ``torchrun`` run: wait for the other ranks, then exit with ``status`` at once.
    Does nothing outside a multi-process run. Call it last in a script that :func:`train` s under
    ``torchrun``; ``minildm``'s command line does.

    Left to the interpreter's teardown, a rank that had finished its work and written its output
    was sometimes aborted (``terminate called without an active exception``, signal 6), and
    torchrun then reported the whole run failed: twice in about 250 two-process runs on a loaded
    2-core machine, once of them after ``destroy_process_group``. ``os._exit`` skips that
    teardown; the run's files are complete (written atomically) and the streams are flushed
    first. After an error (``status`` ≠ 0) the barrier is skipped: the other ranks may never
    reach it.
    """
    if not _in_process_group():
        return
    if status == 0:
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def is_main_process() -> bool:
    """True in a single-process run, and on rank 0 of a multi-process one."""
    return not _in_process_group() or torch.distributed.get_rank() == 0


def _in_process_group() -> bool:
    """True in a process of a multi-process (torchrun / accelerate launch) run."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------ the pieces
def _measure(task, ema_model: torch.nn.Module, measuring: dict) -> dict:
    """``task.progress_eval`` on the EMA model, in eval mode and without gradients, timed."""
    started = time.perf_counter()
    was_training = ema_model.training
    ema_model.eval()
    try:
        with torch.no_grad():
            figures = _jsonable(task.progress_eval(ema_model))
    finally:
        ema_model.train(was_training)
        measuring["seconds"] += time.perf_counter() - started
    return figures


def _critic_step(task, critic, optimizer, batches: list, rng_after: list, accelerator: Accelerator) -> dict[str, float]:
    """One step of the critic on ``task.critic_loss`` over this step's micro-batches (nothing when
    it returns None). Micro-batch ``j`` runs with the random state its model loss left behind, as
    it would on a process of its own."""
    critic.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)  # drop what the model's loss left in its gradients
    all_stats = []
    for micro, (batch, rng) in enumerate(zip(batches, rng_after)):
        _set_rng_state(rng, accelerator.device)
        with _sync_on_last(accelerator, critic, micro, len(batches)):
            with accelerator.autocast():
                result = task.critic_loss(critic, batch)
            if result is None:
                optimizer.zero_grad(set_to_none=True)
                return {}
            loss, stats = result
            accelerator.backward(loss / len(batches))
        all_stats.append(stats)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _mean_stats(all_stats)


def _sync_on_last(accelerator: Accelerator, model, micro: int, micro_batches: int):
    """Data-parallel gradient averaging on the last micro-batch only (``no_sync`` before it)."""
    return contextlib.nullcontext() if micro == micro_batches - 1 else accelerator.no_sync(model)


def _mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each stat over the micro-batches that report it."""
    names = {name for s in stats for name in s}
    return {name: sum(float(s[name]) for s in stats if name in s) / sum(name in s for s in stats)
            for name in sorted(names)}


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _make_accelerator(cfg: TrainConfig, device: str | None) -> Accelerator:
    if device not in (None, "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; choose cpu or cuda, or leave it out")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if cfg.mixed_precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        raise UserError("mixed precision fp16 needs a CUDA GPU; use bf16, auto or no on the CPU")
    precision = resolve_precision(cfg.mixed_precision, device or machine_device_type())
    # Accelerate keeps its settings in process-wide state, and refuses a second Accelerator with
    # other settings; a notebook that trains one stage in bf16 and the next in fp32 needs it
    # afresh. Under torchrun the process group (the "partial state") is kept.
    AcceleratorState._reset_state(reset_partial_state=not _in_process_group())
    return Accelerator(cpu=device == "cpu", mixed_precision=precision)


def _check_time_budget(seconds) -> None:
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
        raise UserError(f"max_train_seconds={seconds!r}: give a positive number of seconds, or null for no cap")


def _time_is_up(seconds_trained: float, budget: float, accelerator: Accelerator) -> bool:
    """Whether the training time has reached ``budget``. With several processes the main one's clock
    decides and every rank gets its answer, so that all stop at the same step; one process just
    compares (no tensor, so no GPU synchronisation on every step)."""
    up = seconds_trained >= budget
    if accelerator.num_processes == 1:
        return up
    return bool(broadcast(torch.tensor([float(up)], device=accelerator.device), from_process=0).item())


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise UserError(f"cannot write to --out {out_dir}: {error.strerror or error}") from None
    has_checkpoint = existing_dir(out_dir / CHECKPOINT_DIR) is not None
    if resume and not has_checkpoint:
        raise UserError(f"nothing to resume in {out_dir}: it holds no {CHECKPOINT_DIR}/ folder; "
                        "leave out --resume to start a new run")
    if not resume and (has_checkpoint or (out_dir / WEIGHTS).exists()):
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, "
                        "or pick another --out")


def _show_progress(progress: bool, is_main_process: bool) -> bool:
    """A bar on a terminal or in a notebook; nothing in CI, in logs, or on other ranks."""
    if not (progress and is_main_process) or os.environ.get("CI") or os.environ.get("TQDM_DISABLE"):
        return False
    in_notebook = type(sys.stderr).__module__.startswith("ipykernel")
    return in_notebook or sys.stderr.isatty()


def _record(history: dict[str, list[float]], accelerator: Accelerator, loss: torch.Tensor,
            stats: dict[str, float]) -> None:
    """Append this step's loss and stats, averaged over the ranks, to ``history``."""
    names = sorted(stats)
    values = torch.tensor([loss.detach().float().item()] + [float(stats[n]) for n in names],
                          device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean").tolist()
    steps_before = len(history["loss"])
    for name, value in zip(["loss"] + names, values):
        # a stat that first appears now gets None for the steps before, so indices stay steps
        history.setdefault(name, [None] * steps_before).append(value)
    for name in history:  # and a stat missing at this step gets None
        if len(history[name]) == steps_before:
            history[name].append(None)


def _jsonable(value):
    return json.loads(json.dumps(value))


THREADS = "cpu_threads"  # the per-step record of the CPU thread count, kept in the run's history


def thread_changes(counts: list[float | None]) -> list[list[int]]:
    """``[[first step, threads], ...]``: where a CPU run's thread count changed, from its history.

    ``minildm course --lanes`` gives a job more threads when the job beside it ends, at a step set
    by the clock, and a product summed on more threads rounds differently (:mod:`minildm.thread_share`),
    so a card that says when its count changed explains why two runs at one seed differ."""
    changes: list[list[int]] = []
    for step, count in enumerate(counts):
        if count is not None and (not changes or changes[-1][1] != round(count)):
            changes.append([step, round(count)])
    return changes


def _device_name(device: torch.device, changes: list[list[int]] | None = None) -> str:
    """``cpu (2 threads)``; ``cpu (1 thread, 2 from step 2210)`` for a run whose count changed."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if not changes:
        changes = [[0, torch.get_num_threads()]]
    first = changes[0][1]
    later = "".join(f", {threads} from step {step}" for step, threads in changes[1:])
    return f"{device.type} ({first} thread{'' if first == 1 else 's'}{later})"


def _peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _card(task: TrainingTask, cfg: TrainConfig, accelerator: Accelerator, steps: int,
          history: dict[str, list[float]], wall_time_s: float, *, command: str | None,
          extra_card: dict | None, progress: list | None = None, steps_per_s: float | None = None,
          stopped_by_time_budget: bool = False) -> dict:
    curve = loss_curve(history["loss"])
    card = {
        "stage": task.stage,
        "config": _jsonable(task.card_config()),
        "train": _jsonable(dataclasses.asdict(cfg)),
        "command": command if command is not None else shlex.join(sys.argv),
        "seed": cfg.seed,
        "steps": steps,
        "wall_time_s": round(wall_time_s, 2),
        "stopped_by_time_budget": stopped_by_time_budget,  # before cfg.steps: TrainConfig.max_train_seconds
        "steps_per_s": steps_per_s,
        "device": _device_name(accelerator.device, thread_changes(history.get(THREADS, []))),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # "auto" resolved (minildm.precision)
        "peak_memory_mb": _peak_memory_mb(accelerator.device),
        "loss_curve": curve,
        "final_loss": curve[-1][1] if curve else None,
        "stat_curves": {name: loss_curve(values) for name, values in history.items()
                        if name not in ("loss", THREADS)},
        "torch_version": torch.__version__,
        "progress": list(progress or []),
        "metrics": {},
    }
    card.update(extra_card or {})
    return card


def _save_training_state(folder: Path, card: dict, history: dict, wall_time_s: float,
                         model, ema: AveragedModel, optimizer, scheduler, accelerator,
                         critic=None, critic_optimizer=None) -> None:
    """Write ``folder`` (``RUN/checkpoint``) atomically: everything :func:`train` needs to resume."""
    optimizer_tensors, optimizer_skeleton = optimizer_state_to_tensors(optimizer.state_dict())
    state = {
        "stage": card["stage"], "config": card["config"], "step": card["steps"],
        "wall_time_s": wall_time_s, "history": history, "progress": card.get("progress", []),
        "ema_updates": int(ema.n_averaged), "scheduler": scheduler.state_dict(),
        "optimizer": optimizer_skeleton,
        "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
    }
    if critic is not None:
        critic_tensors, state["critic_optimizer"] = optimizer_state_to_tensors(critic_optimizer.state_dict())

    def write(temp: Path) -> None:
        save_tensors(temp / WEIGHTS, ema.module.state_dict())
        save_json(temp / CARD, card)
        save_tensors(temp / "raw.safetensors", model.state_dict())
        save_tensors(temp / "optimizer.safetensors", optimizer_tensors)
        save_json(temp / "state.json", state)
        if critic is not None:
            save_tensors(temp / "critic.safetensors", critic.state_dict())
            save_tensors(temp / "critic_optimizer.safetensors", critic_tensors)

    atomic_write_dir(folder, write)


def _load_training_state(folder: Path, task: TrainingTask, cfg: TrainConfig, accelerator,
                         model, ema: AveragedModel, optimizer, scheduler,
                         critic=None, critic_optimizer=None) -> dict:
    """Restore what :func:`_save_training_state` wrote; returns the ``state.json`` dict."""
    folder = existing_dir(folder)
    state = load_json(folder / "state.json")
    config = _jsonable(task.card_config())
    if state["stage"] != task.stage or state["config"] != config:
        differing = sorted(k for k in set(config) | set(state["config"])
                           if config.get(k) != state["config"].get(k))
        raise UserError(f"cannot resume: {folder} was made for stage {state['stage']!r} with another "
                        f"config (differs in: {', '.join(differing) or 'stage'}); pick another --out")
    if state["step"] > cfg.steps:
        raise UserError(f"cannot resume: {folder} is already at step {state['step']}, "
                        f"beyond the {cfg.steps} steps asked for")
    load_state_into(model, load_tensors(folder / "raw.safetensors"), str(folder))
    load_state_into(ema.module, load_tensors(folder / WEIGHTS), str(folder))
    ema.n_averaged.fill_(state["ema_updates"])
    optimizer.load_state_dict(optimizer_state_from_tensors(
        load_tensors(folder / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler and state["grad_scaler"]:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    if critic is not None:
        load_state_into(critic, load_tensors(folder / "critic.safetensors"), str(folder))
        critic_optimizer.load_state_dict(optimizer_state_from_tensors(
            load_tensors(folder / "critic_optimizer.safetensors"), state["critic_optimizer"]))
    return state
