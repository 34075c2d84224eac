"""Stage 6: the ADD student distilled from an LDM teacher, its sampler, its measurements."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from minildm.checkpoints import load_checkpoint
from minildm.cli import main
from minildm.config import EVAL_SEED, get_profile, with_overrides
from minildm.errors import UserError
from minildm.stages import add as add_stage
from minildm.stages import judge as judge_stage
from minildm.stages import ldm as ldm_stage


@pytest.fixture(scope="module")
def add_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("add")
    profile = with_overrides(get_profile("smoke"), ["ldm_train.steps=20"])
    ldm_stage.train(profile, str(root / "teacher"), progress=False)
    code = main(["train", "add", "--profile", "smoke", "--teacher", str(root / "teacher"), "--out", str(root / "run"),
                 "--quiet"])
    assert code == 0
    return json.loads((root / "run" / "card.json").read_text()), root


def test_the_student_starts_from_the_teacher_and_only_its_unet_trains(add_run):
    card, root = add_run
    assert card["stage"] == "add" and card["teacher"] == str(root / "teacher")
    assert card["config"]["add"]["student_timesteps"] == [999, 749, 499, 249]
    teacher, _ = load_checkpoint(root / "teacher")
    student, _ = load_checkpoint(root / "run")
    assert set(teacher) == set(student)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if k.startswith("unet."))
    assert all(torch.equal(teacher[k], student[k]) for k in teacher if k.startswith("text."))
    for name in ("distill", "g_adv", "d_loss", "r1", "d_real_positive", "d_fake_positive"):
        assert name in card["stat_curves"], f"both players' curves are recorded: {name}"


def test_the_discriminator_heads_are_checkpointed_without_the_frozen_vit(add_run):
    from minildm.checkpoints import load_tensors

    _, root = add_run
    heads = load_tensors(root / "run" / "checkpoint" / "critic.safetensors")
    assert heads and all(k.startswith("heads.") for k in heads), "the ViT is frozen and not saved"


def test_the_evaluation_measures_student_teacher_and_forced_teacher(add_run):
    card, _ = add_run
    m = card["metrics"]
    for key in ("alignment_1step", "fid_1step", "alignment_2step", "alignment_4step", "fid_4step",
                "teacher_alignment", "teacher_fid", "teacher_ddim_1step_alignment", "teacher_ddim_4step_alignment",
                "alignment_ratio_1step", "fid_ratio_1step"):
        assert isinstance(m[key], float), key
    for key in ("alignment_1step", "alignment_4step", "teacher_alignment", "teacher_ddim_1step_alignment"):
        assert 0 <= m[key] <= 1
    assert m["speedup_1step"] > 1, "one student step is cheaper than 50 guided teacher steps"
    rounds = m["speedup_1step_rounds"]
    assert len(rounds) == m["sampling_seconds"]["rounds"] >= 2, "teacher and student timed in interleaved rounds"
    assert all(ratio > 0 for ratio in rounds)
    assert m["alignment_ratio_1step"] == pytest.approx(m["alignment_1step"] / max(m["teacher_alignment"], 1e-9))


def test_the_teachers_figures_come_from_its_card_only_where_it_measured_them_alike(add_run):
    card, root = add_run
    teacher_metrics = json.loads((root / "teacher" / "card.json").read_text())["metrics"]
    model, _ = add_stage.load(root / "run")
    judge, n = judge_stage.load(None)[0], teacher_metrics["n"]
    assert card["metrics"]["n"] == n and card["metrics"]["teacher_figures_from"] == "its card"
    assert card["metrics"]["teacher_alignment"] == teacher_metrics["alignment"]
    assert card["metrics"]["teacher_fid"] == teacher_metrics["fid"]
    assert "teacher" not in card["metrics"]["generation_seconds"], "the teacher's images are not drawn again"
    assert add_stage.teacher_figures_from_card(model, n, EVAL_SEED, judge) == teacher_metrics
    measured = ldm_stage.evaluate(model.teacher, n, EVAL_SEED, judge=judge)
    assert measured["alignment"] == teacher_metrics["alignment"], "measured again, the same images"
    assert measured["fid"] == pytest.approx(teacher_metrics["fid"], rel=1e-6)
    other_judge = copy.deepcopy(judge)
    with torch.no_grad():
        next(other_judge.parameters()).add_(1e-3)
    assert add_stage.teacher_figures_from_card(model, n, EVAL_SEED + 1, judge) is None, "another seed"
    assert add_stage.teacher_figures_from_card(model, n - 1, EVAL_SEED, judge) is None, "other prompts"
    assert add_stage.teacher_figures_from_card(model, n, EVAL_SEED, other_judge) is None, "another judge"
    model.teacher_card["metrics"].pop("measured_with")
    assert add_stage.teacher_figures_from_card(model, n, EVAL_SEED, judge) is None, "a card that does not say"


def test_sampling_is_deterministic_per_seed_and_refuses_guidance(add_run):
    _, root = add_run
    model, _ = add_stage.load(root / "run")
    a = model.student(["a red circle"], steps=1, guidance=1.0, seed=3)
    b = model.student(["a red circle"], steps=1, guidance=1.0, seed=3)
    c = model.student(["a red circle"], steps=4, guidance=1.0, seed=3)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="without guidance"):
        model.student(["a red circle"], steps=1, guidance=3.0)


def test_minildm_sample_takes_one_step_without_guidance_for_a_student(add_run, tmp_path, capsys):
    _, root = add_run
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(root / "run"), "--prompt", "a blue square", "--out", str(out)]) == 0
    assert out.is_file() and "1 ADD steps" in capsys.readouterr().out


@pytest.fixture(scope="module")
def make_task():
    """AddTask(**changes to the add config) on the reference teacher and an 8-item cache."""
    profile = get_profile("smoke")
    state, card = load_checkpoint(ldm_stage.REFERENCE)
    from minildm.config import DiffusionConfig, config_from_dict

    diffusion = config_from_dict(DiffusionConfig, card["config"]["diffusion"])
    encoder, autoencoder = ldm_stage._parts("latent", 32)
    cache = ldm_stage.ItemCache(8, 0, 32, autoencoder, embed_images=encoder.encode_image)
    text = {"category": add_stage.pooled_text(encoder, cache.category), "full": add_stage.pooled_text(encoder, cache.full)}

    def task(**changes):
        cfg = dataclasses.replace(profile.add, **changes)
        return add_stage.AddTask(cfg, diffusion, state, encoder, autoencoder, cache, text, 4, 0)

    return task


def test_a_compiled_run_pads_the_captions_and_the_student_predicts_the_same(monkeypatch):
    """With ``add_train.compile`` every caption is padded to the encoder's 32 tokens (one graph
    for every batch, as in the LDM's run); the padding is masked, so the student's output is the
    same."""
    profile = get_profile("smoke")
    monkeypatch.setattr(add_stage, "item_cache", lambda size, seed, image_size, autoencoder, folders=(), embed_images=None:
                        ldm_stage.ItemCache(8, seed, image_size, autoencoder, embed_images=embed_images))
    tasks = [add_stage.make_task(profile, dataclasses.replace(profile.add_train, batch_size=4, compile=compile))[0]
             for compile in (False, True)]
    batch, padded = (task.batch(1, 0, 1) for task in tasks)
    assert batch["input_ids"].shape[1] < padded["input_ids"].shape[1] == tasks[0].encoder.tokenizer.model_max_length
    student = tasks[0].model.eval()
    x, t = torch.randn_like(batch["x0"]), torch.full((4,), 999)
    with torch.no_grad():
        output = student(x, t, {key: batch[key] for key in ("input_ids", "mask", "keep")})
        padded_output = student(x, t, {key: padded[key] for key in ("input_ids", "mask", "keep")})
    assert output.abs().max() > 0.1
    torch.testing.assert_close(padded_output, output, rtol=1e-5, atol=1e-5)


def test_student_timesteps_are_uniform_or_favour_the_top(make_task):
    torch.manual_seed(0)
    uniform = make_task().student_timestep_indices(20_000, "cpu")
    assert torch.allclose(torch.bincount(uniform, minlength=4) / 20_000, torch.full((4,), 0.25), atol=0.02)
    top = make_task(top_share=0.7).student_timestep_indices(20_000, "cpu")
    shares = torch.bincount(top, minlength=4) / 20_000
    assert abs(float(shares[0]) - 0.7) < 0.02 and torch.allclose(shares[1:], torch.full((3,), 0.1), atol=0.02)


def test_the_discriminator_heads_start_from_the_seed_alone(make_task):
    """Not from whatever drew random numbers before (another run in the same process, a notebook)."""
    torch.manual_seed(1)
    a = make_task().critic.state_dict()
    torch.manual_seed(2)
    b = make_task().critic.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_ablation_switches_each_loss_off(make_task):
    def task(losses):
        return make_task(losses=losses)

    distill_only = task("distillation")
    assert distill_only.critic is None
    batch = distill_only.batch(0, 0, 1)
    _, stats = distill_only.loss(distill_only.model, batch)
    assert set(stats) == {"distill"}
    adversarial = task("adversarial")
    _, stats = adversarial.loss(adversarial.model, adversarial.batch(0, 0, 1))
    assert set(stats) == {"g_adv"}


def test_the_teacher_timesteps_stay_in_their_range(make_task, monkeypatch):
    task = make_task(teacher_t_range=(500, 520), losses="distillation")
    seen = []
    add_noise = task.schedule.add_noise
    monkeypatch.setattr(task.schedule, "add_noise", lambda x, n, t: seen.append(t) or add_noise(x, n, t))
    task.loss(task.model, task.batch(0, 0, 1))
    t = torch.cat(seen[1:])  # the first call makes the student's input
    assert len(t) and int(t.min()) >= 500 and int(t.max()) <= 520


def test_the_matching_aware_critic_shows_real_images_with_another_caption(make_task):
    task = make_task(mismatch_weight=1.0)
    batch = task.batch(0, 0, 1)
    task.loss(task.model, batch)
    condition = task.mismatched_condition(batch)
    assert torch.equal(condition[:, :batch["c_text"].shape[1]], batch["c_text"].roll(1, 0).float())
    assert not condition[:, batch["c_text"].shape[1]:].any(), "no image embedding to give the mismatch away"
    _, stats = task.critic_loss(task.critic, batch)
    assert "d_mismatch_positive" in stats
    _, plain = make_task().critic_loss(task.critic, batch)
    assert "d_mismatch_positive" not in plain


def test_the_ladd_critic_reads_latents_through_the_frozen_teacher(make_task):
    """LADD's discriminator: the student's latents (never decoded) re-noised in ``disc_t_range``,
    the teacher's encoder maps, a head each; the teacher stays out of D's parameters and frozen,
    and the generator's gradient reaches the student through it."""
    task = make_task(discriminator="teacher", disc_t_range=(300, 310), distill_space="latent")
    decoded = []
    task.decode = lambda z: decoded.append(z) or z
    seen = []
    add_noise = task.schedule.add_noise
    task.critic.schedule.add_noise = lambda x, n, t: seen.append(t) or add_noise(x, n, t)
    batch = task.batch(0, 0, 1)
    loss, stats = task.loss(task.model, batch)
    assert not decoded, "neither D nor the latent distillation decodes"
    assert batch["fake"].shape == batch["x0"].shape, "D's fakes are latents"
    in_range = lambda ts: ts and all(int(t.min()) >= 300 and int(t.max()) <= 310 for t in ts)
    assert in_range(seen[2:]), "after the student's input and the distillation's re-noising: D's t̂"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.unet.parameters())
    assert all(p.grad is None for p in task.teacher.parameters()), "the teacher is frozen"
    assert set(task.critic.state_dict()) == {k for k in task.critic.state_dict() if k.startswith("heads.")}
    assert len(task.critic.heads) == len(task.teacher.unet.cfg.channel_mult) + 1, "a head per level and the middle"
    del seen[:]
    _, critic_stats = task.critic_loss(task.critic, batch)
    assert {"d_loss", "r1", "d_real_positive"} <= set(critic_stats)
    assert len(seen) == 2 and in_range(seen), "real and generated latents, both re-noised at t̂"


def test_the_seed_spread_retrains_both_at_each_seed(monkeypatch, tmp_path):
    calls = []

    def ablation(profile, out, **kwargs):
        calls.append((profile.add_train.seed, str(out), kwargs["runs"]))
        return {"runs": {"both": {"alignment_1step": profile.add_train.seed / 10}}}

    monkeypatch.setattr(add_stage, "ablation", ablation)
    spread = add_stage.seed_spread(get_profile("smoke"), tmp_path, seeds=(3, 4), steps=2, eval_n=4)
    assert spread == {"seed=3": {"alignment_1step": 0.3}, "seed=4": {"alignment_1step": 0.4}}
    assert [c[0] for c in calls] == [3, 4] and len({c[1] for c in calls}) == 2, "a run folder per seed"
    assert all(c[2] == {"both": {}} for c in calls)


@pytest.mark.parametrize("assignment, message", [
    ("add.losses=gan", "add.losses"),
    ("add.weighting=nfsd", "add.weighting"),
    ("add.student_timesteps=[1000]", "student_timesteps"),
    ("add.top_share=2", "top_share"),
    ("add.teacher_t_range=[600,100]", "teacher_t_range"),
    ("add.mismatch_weight=-1", "mismatch_weight"),
    ("add.discriminator=dino", "add.discriminator"),
    ("add.disc_t_range=[0,1000]", "disc_t_range"),
])
def test_bad_settings_get_one_line(assignment, message, tmp_path, capsys):
    code = main(["train", "add", "--profile", "smoke", "--set", assignment, "--out", str(tmp_path / "run")])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_teacher_that_is_not_an_ldm_is_refused(tmp_path, capsys):
    from minildm.stages import ae as ae_stage

    code = main(["train", "add", "--profile", "smoke", "--teacher", str(ae_stage.REFERENCE), "--out", str(tmp_path / "r")])
    assert code != 0 and "latent diffusion model" in capsys.readouterr().err
    code = main(["train", "ldm", "--profile", "smoke", "--teacher", str(ldm_stage.REFERENCE), "--out", str(tmp_path / "r")])
    assert code != 0 and "--teacher applies to the add stage" in capsys.readouterr().err


def test_the_student_reads_the_teachers_encoded_items(add_run):
    """ADD's items are the first of the teacher's: read from the teacher's run, not encoded again."""
    from minildm.stages.items import ITEMS

    _, root = add_run
    assert (root / "teacher" / ITEMS).is_file() and not (root / "run" / ITEMS).exists()


def test_the_teacher_guidance_sweep_changes_only_the_targets_guidance(monkeypatch, tmp_path):
    seen = {}

    def train(profile, out, **kwargs):
        seen[Path(out).name] = profile
        metrics = {k: 0.5 for k in ("alignment_1step", "fid_1step", "alignment_4step", "fid_4step",
                                    "teacher_alignment", "teacher_fid")}
        return {"wall_time_s": 1.0, "metrics": {**metrics, "alignment_by_category_1step": {}}}

    monkeypatch.setattr(add_stage, "train", train)
    profile = get_profile("smoke")
    results = add_stage.ablation(profile, tmp_path, steps=2, eval_n=4, runs=add_stage.TEACHER_GUIDANCE_RUNS)
    assert {name: p.add.teacher_guidance for name, p in seen.items()} == {
        "teacher-guidance=3": 3.0, "both": profile.add.teacher_guidance, "teacher-guidance=9": 9.0,
        "teacher-guidance=12": 12.0}
    assert all(dataclasses.replace(p.add, teacher_guidance=profile.add.teacher_guidance) == profile.add
               for p in seen.values()), "nothing else of the recipe changes"
    assert results["command"].endswith("runs=TEACHER_GUIDANCE_RUNS)"), "the command names the sweep it ran"
    assert json.loads((tmp_path / "ablation.json").read_text())["runs"].keys() == seen.keys()
