"""``minildm bench`` — speed figures, as ratios of timings taken in one run on one machine.

Absolute timings on shared machines are noise; a ratio of two timings taken back to back is
a fact about the code. Each timing is the median of several repeats after a warm-up.

* ``<stage>_step_bf16_speedup`` — a training step of the stage (the profile's sizes) in fp32
  over the same step under bf16 autocast: whether mixed precision pays on this device. The
  autoencoder's step is timed with its GAN and judge-feature terms switched on.
* ``data_share_of_step`` — rendering a batch of the shapes world over a whole judge step:
  whether the procedural data is the bottleneck.
* ``unet_step_speed_vs_diffusers`` — a bf16 training step of diffusers' ``UNet2DConditionModel``
  at the configuration matched to the ldm stage's UNet (same widths, levels, attention levels,
  heads, context width) over ours: above 1, ours is faster. None when diffusers (a test extra) is
  not installed.
* ``attention_explicit_speed_vs_sdpa`` — forward and backward of one attention layer at the
  UNet's 8×8 self-attention size with ``F.scaled_dot_product_attention`` over the explicit
  matmul–softmax that :mod:`minildm.attention` uses (above 1: explicit is faster).
* plus the absolute throughputs behind the ratios, for the record.
"""

from __future__ import annotations

import statistics
import time

import torch
from accelerate.utils import send_to_device

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


def training_step_fn(task, batch, device_type: str, dtype: torch.dtype | None):
    """One optimisation step of a task (and of its critic, if it has one), optionally under autocast."""
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-5)
    critic = getattr(task, "critic", None)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-5) if critic is not None else None

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
    t_fp32 = _median_time(training_step_fn(task, batch, device, None))
    t_bf16 = _median_time(training_step_fn(task, batch, device, torch.bfloat16))
    return t_fp32, t_bf16


def run_bench(profile_name: str = "cpu", device: str | None = None) -> dict:
    from minildm.data.datasets import ShapesDataset
    from minildm.judge import JudgeTask
    from minildm.stages import judge as judge_stage
    from minildm.stages.ae import AutoencoderTask

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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

    ae_cfg = profile.ae_train
    reference_judge = judge_stage.load(None)[0] if profile.ae.perceptual_weight > 0 else None
    ae_task = AutoencoderTask(profile.ae, ShapesDataset(10**9, cfg=profile.shapes), ae_cfg.batch_size,
                              0, reference_judge)
    ae_task.model.to(device)
    ae_task.critic.to(device)
    ae_batch = send_to_device(ae_task.batch(profile.ae.disc_start, 0, 1), device)  # GAN switched on
    ae_fp32, ae_bf16 = _speedup(ae_task, ae_batch, device)

    unet_ours, unet_diffusers, unet_params = _unet_step_times(profile, device)
    attention_sdpa, attention_explicit = _attention_times(profile, device)

    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "profile": profile.name,
        "judge_step_bf16_speedup": round(judge_fp32 / judge_bf16, 3),
        "ae_step_bf16_speedup": round(ae_fp32 / ae_bf16, 3),
        "data_share_of_step": round(t_render / (t_render + min(judge_fp32, judge_bf16)), 3),
        "render_images_per_s": round(judge_cfg.batch_size / t_render, 1),
        "judge_train_steps_per_s_fp32": round(1 / judge_fp32, 2),
        "judge_train_steps_per_s_bf16": round(1 / judge_bf16, 2),
        "judge_read_images_per_s": round(judge_cfg.batch_size / t_read, 1),
        "ae_train_steps_per_s_fp32": round(1 / ae_fp32, 2),
        "ae_train_steps_per_s_bf16": round(1 / ae_bf16, 2),
        "unet_step_speed_vs_diffusers": round(unet_diffusers / unet_ours, 3) if unet_diffusers else None,
        "unet_parameters_ours_and_diffusers": unet_params,
        "ldm_train_steps_per_s_bf16": round(1 / unet_ours, 2),
        "attention_explicit_speed_vs_sdpa": round(attention_sdpa / attention_explicit, 3),
    }


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


def _unet_step_times(profile, device: str):
    """Median bf16 training-step times of our UNet and of diffusers' matched one."""
    from minildm.unet import UNet

    cfg = profile.ldm.unet
    batch = profile.ldm_train.batch_size
    x = torch.randn(batch, cfg.in_channels, 8, 8, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 12, cfg.context_dim, device=device)

    def step_fn(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = forward(model).float().pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    ours = UNet(cfg).to(device)
    t_ours = _median_time(step_fn(ours, lambda m: m(x, t, {"context": context})), repeats=3)
    try:
        theirs = matched_diffusers_unet(cfg).to(device)
    except ImportError:
        return t_ours, None, None
    t_theirs = _median_time(step_fn(theirs, lambda m: m(x, t, encoder_hidden_states=context).sample), repeats=3)
    params = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    return t_ours, t_theirs, params


def _attention_times(profile, device: str):
    """One attention layer, forward + backward under bf16: SDPA against the explicit softmax."""
    import torch.nn.functional as F

    from minildm.attention import Attention

    cfg = profile.ldm.unet
    layer = Attention(cfg.model_channels, None, cfg.heads, cfg.model_channels // cfg.heads).to(device)
    x = torch.randn(profile.ldm_train.batch_size, 64, cfg.model_channels, device=device, requires_grad=True)

    def sdpa_forward(h):
        split = lambda y: y.view(y.shape[0], y.shape[1], layer.heads, layer.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(layer.to_q(h)), split(layer.to_k(h)), split(layer.to_v(h)))
        return layer.to_out(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))

    def timed(forward):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                forward(x).float().sum().backward()
        return _median_time(run)

    return timed(sdpa_forward), timed(layer)
