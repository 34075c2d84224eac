"""``minildm bench`` — speed figures, as ratios of timings taken in one run on one machine.

Absolute timings on shared machines are noise; a ratio of two timings taken back to back is
a fact about the code. Each figure is the median of several repeats after a warm-up.

* ``judge_step_bf16_speedup`` — a training step of the judge (cpu profile) in fp32 over the
  same step under bf16 autocast: whether mixed precision pays on this device.
* ``data_share_of_step`` — rendering a batch of the shapes world over a whole training step:
  whether the procedural data is the bottleneck.
* plus the absolute throughputs behind the ratios, for the record.
"""

from __future__ import annotations

import statistics
import time

import torch

from minildm.config import get_profile


def _median_time(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def judge_step_fn(task, batch, optimizer, device_type: str, dtype: torch.dtype | None):
    """One optimisation step of the judge, optionally under autocast."""

    def step():
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = task.loss(task.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_bench(profile_name: str = "cpu", device: str | None = None) -> dict:
    from minildm.judge import JudgeTask

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = get_profile(profile_name)
    cfg = profile.judge_train
    torch.manual_seed(0)
    task = JudgeTask(profile.judge, profile.shapes, cfg.batch_size)
    task.model.to(device)
    images, target = task.batch(0, 0, 1)
    batch = (images.to(device), {k: v.to(device) for k, v in target.items()})
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-4)

    t_render = _median_time(lambda: task.batch(1, 0, 1))
    t_fp32 = _median_time(judge_step_fn(task, batch, optimizer, device, None))
    t_bf16 = _median_time(judge_step_fn(task, batch, optimizer, device, torch.bfloat16))
    with torch.no_grad():
        t_read = _median_time(lambda: task.model(batch[0]))
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": cfg.batch_size,
        "judge_step_bf16_speedup": round(t_fp32 / t_bf16, 3),
        "data_share_of_step": round(t_render / (t_render + min(t_fp32, t_bf16)), 3),
        "render_images_per_s": round(cfg.batch_size / t_render, 1),
        "judge_train_steps_per_s_fp32": round(1 / t_fp32, 2),
        "judge_train_steps_per_s_bf16": round(1 / t_bf16, 2),
        "judge_read_images_per_s": round(cfg.batch_size / t_read, 1),
    }
