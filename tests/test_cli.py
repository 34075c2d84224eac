import json
import subprocess
import sys

import pytest
import torch

from minildm.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minildm", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minildm: error: "), result.stderr
    return lines[0]


def test_unknown_stage_names_the_stages():
    line = one_line_error(run_cli("train", "vae", "--profile", "smoke", "--out", "/tmp/x"))
    assert "unknown stage 'vae'" in line and "judge ae clip ldm pixel experts add" in line


def test_stage_not_built_yet_says_so_in_one_line(tmp_path, monkeypatch):
    import minildm.stages as stages
    from minildm.errors import UserError

    monkeypatch.setattr(stages, "BUILT", tuple(s for s in stages.BUILT if s != "add"))  # as before stage 6 landed
    with pytest.raises(UserError, match="stage 'add' is not built yet"):
        stages.stage_module("add")
    assert "unknown stage 'paint'" in one_line_error(run_cli("train", "paint", "--profile", "smoke", "--out", str(tmp_path)))


def test_usage_mistakes_are_one_line():
    assert "--out" in one_line_error(run_cli("train", "judge"))
    assert "invalid choice" in one_line_error(run_cli("train", "judge", "--profile", "huge", "--out", "x"))


def test_missing_checkpoint(tmp_path):
    line = one_line_error(run_cli("eval", "judge", "--model", str(tmp_path / "nothing"), "--json"))
    assert "no checkpoint at" in line


def test_bad_data_and_unwritable_out(tmp_path, capsys):
    assert main(["train", "judge", "--profile", "smoke", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "none")]) == 2
    assert "the judge learns from the shapes world" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "judge", "--profile", "smoke", "--out", str(blocker / "sub")]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_train_resume_and_reuse_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "judge", "--profile", "smoke", "--out", out, "--resume", "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "judge", "--profile", "smoke", "--out", out, "--steps", "12", "--quiet"]) == 0
    assert main(["train", "judge", "--profile", "smoke", "--out", out, "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "judge", "--profile", "smoke", "--out", out, "--steps", "20", "--resume", "--quiet"]) == 0
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["steps"] == 20 and card["metrics"]["n"] == 64


def test_eval_prints_one_json_object(capsys):
    assert main(["eval", "judge", "--n", "40", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("attribute_accuracy", "alignment_true", "alignment_mismatched", "fid_heldout"):
        assert key in metrics
    assert metrics["n"] == 40
    assert main(["eval", "judge", "--n", "40", "--seed", "7", "--json"]) == 0
    reseeded = json.loads(capsys.readouterr().out)
    assert reseeded["fid_heldout"] != metrics["fid_heldout"], "--seed draws other scenes"


def test_sample_mistakes_are_one_line(tmp_path):
    assert "no checkpoint at" in one_line_error(run_cli("sample", "--model", str(tmp_path / "x"), "--prompt", "a red circle",
                                                        "--out", str(tmp_path / "x.png")))
    assert ".png" in one_line_error(run_cli("sample", "--prompt", "a red circle", "--out", str(tmp_path / "x.jpg")))
    assert "not in the prompt" in one_line_error(run_cli("sample", "--prompt", "a red circle", "--paint", "blue=0,0,1,1",
                                                         "--out", str(tmp_path / "x.png")))
    assert "x0 < x1" in one_line_error(run_cli("sample", "--prompt", "a red circle", "--paint", "red=1,0,0,1",
                                               "--out", str(tmp_path / "x.png")))


def test_seeds_and_step_counts_out_of_range_are_one_line(tmp_path):
    """A negative seed used to fail inside numpy (a traceback, after a course had started its first
    job); 1000 DDIM steps asked for t = 1000 and 1001 for a step the schedule does not have."""
    out = tmp_path / "course"
    line = one_line_error(run_cli("course", "--profile", "smoke", "--seed", "-1", "--out", str(out)))
    assert "argument --seed: '-1' is not a whole number from 0 to 4294967295" in line
    assert not out.exists(), "nothing is written before the mistake is found"
    assert "--seed" in one_line_error(run_cli("eval", "judge", "--seed", "x", "--json"))
    png = tmp_path / "x.png"
    assert "at most 1000 steps" in one_line_error(run_cli("sample", "--prompt", "a red circle", "--steps", "1001",
                                                          "--out", str(png)))
    assert not png.exists()
    assert "--upscale 1000: at most 32" in one_line_error(run_cli("sample", "--prompt", "a red circle", "--upscale",
                                                                  "1000", "--out", str(png)))
    run = tmp_path / "run"
    line = one_line_error(run_cli("train", "judge", "--profile", "smoke", "--set", "judge_train.steps=abc",
                                  "--out", str(run)))
    assert "--set judge_train.steps=abc: judge_train.steps takes a whole number" in line and not run.exists()


def test_an_unwritable_save_is_refused_before_the_claims_are_measured(tmp_path, monkeypatch, capsys):
    from minildm import results

    monkeypatch.setattr(results, "measure", lambda *a, **k: pytest.fail("measured before checking --save"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["results", "--profile", "smoke", "--save", str(blocker / "claims.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("minildm: error: --save ") and "cannot write there" in error


def test_bench_times_the_two_sides_of_a_ratio_in_alternating_rounds():
    from minildm.bench import alternating_median_times

    calls = []
    times = alternating_median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"], "a warm-up of each, then A B, B A, A B"
    assert set(times) == {"a", "b"} and all(seconds >= 0 for seconds in times.values())


def test_bench_waits_for_the_gpu_after_every_timed_call(monkeypatch):
    """On CUDA a call returns once its kernels are queued: each timing must wait for them."""
    from minildm.bench import alternating_median_times

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append("sync"))
    alternating_median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=1, warmup=1)
    assert calls == ["a", "sync", "b", "sync", "a", "sync", "b", "sync"]


def test_bench_gives_a_slow_figure_fewer_rounds_within_its_budget():
    import time

    from minildm.bench import alternating_median_times

    calls = []

    def slow():  # takes longer than the whole budget: one warm-up, one round
        calls.append("slow")
        time.sleep(0.02)
    times = alternating_median_times({"fast": lambda: calls.append("fast"), "slow": slow},
                                     rounds=5, warmup=2, budget_s=0.01)
    assert calls == ["fast", "fast", "slow", "fast", "slow"], "the slow side warmed up once, then one round A B"
    assert times["slow"] >= 0.02 > times["fast"]


def test_bench_reports_ratios(capsys):
    assert main(["bench", "--profile", "smoke", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["judge_step_bf16_speedup"] > 0 and figures["ae_step_bf16_speedup"] > 0
    assert 0 < figures["data_share_of_step"] < 1
    assert figures["judge_batches_workers_speedup"] > 0 and figures["render_workers_timed"] >= 2
    assert figures["unet_step_speed_vs_diffusers"] > 0 and figures["attention_explicit_speed_vs_sdpa"] > 0
    assert figures["ldm_step_precision"] == "no", "the smoke profile trains in fp32: both UNets are timed in it"
    assert figures["ldm_train_steps_per_s"] > 0 and figures["ldm_step_gflop_per_s"] > 0
    ours, theirs = figures["unet_parameters_ours_and_diffusers"]
    assert abs(ours - theirs) / ours < 0.05, "the diffusers UNet is matched to ours"
    for ratio in ("ldm_step_bf16_speedup", "latent_vs_pixel_sampling_speedup", "add_1step_vs_teacher_speedup",
                  "ldm_step_flops_share_of_matmul_peak", "latent_sampling_bf16_speedup"):
        assert figures[ratio] > 0, ratio
    assert figures["items_read_speedup_over_encoding"] > 1, "reading the encoded items beats encoding them"
    assert figures["items_encoded_per_s"] > 0
    assert figures["ldm_step_gflop"] > 0 and figures["matmul_gflop_per_s_bf16"] > 0
    assert figures["matmul_gflop_per_s_fp32"] > 0 and isinstance(figures["bf16_is_faster"], bool)
    assert figures["bf16_is_native"] >= figures["bf16_is_faster"], "auto-native gives bf16 wherever auto does"
    assert set(figures["stages"]) == {"judge", "ae", "clip", "ldm", "pixel", "add"}
    for name, stage in figures["stages"].items():
        assert stage["train_images_per_s"] > 0 and stage["batch_size"] > 0, name
        assert stage["mixed_precision"] in ("no", "bf16") and stage["bf16_speedup"] > 0, name
        assert stage["peak_memory_mb"] > figures["baseline_process_mb"] > 0, f"{name}: measured in a process of its own"
        assert stage["adam_fused_speedup"] > 0 and 0 < stage["adam_share_of_step"] < 1, name


def test_course_runs_the_built_stages_and_writes_a_report(tmp_path, capsys):
    assert main(["course", "--profile", "smoke", "--out", str(tmp_path), "--quiet", "--lanes", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "report.md") in printed
    stages = ["judge", "ae", "clip", "ldm", "pixel", "experts", "paint", "add"]
    progress = [line for line in printed.splitlines() if line.startswith("course [")]
    assert len(progress) == 2 * len(stages), "a line when each stage starts and one when it ends"
    assert "[4/8] ldm: training from scratch" in printed and "[4/8] ldm: done in " in printed
    assert "[7/8] paint: measuring on the course's own LDM" in printed, "paint-with-words trains nothing"
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert list(report["stages"]) == stages
    assert report["profile"] == "smoke" and report["targets_met"][1] >= 8
    met, total = report["targets_met"]
    assert f"Targets met: {met} of {total}." in printed, "the course ends by printing its report's summary"
    assert "follow_b_early_karras" in report["stages"]["experts"]["targets"] and "placement" in report["stages"]["paint"]["targets"]
    # trained from scratch: each stage on the course's own earlier runs
    ae_card = json.loads((tmp_path / "ae" / "card.json").read_text())
    assert ae_card["judge"] == str(tmp_path / "judge"), "the course's autoencoder learns on the course's judge"
    ldm_card = json.loads((tmp_path / "ldm" / "card.json").read_text())
    assert ldm_card["parts"] == {"encoder": str(tmp_path / "clip"), "autoencoder": str(tmp_path / "ae")}
    pixel_card = json.loads((tmp_path / "pixel" / "card.json").read_text())
    assert pixel_card["parts"] == {"encoder": str(tmp_path / "clip"), "autoencoder": None}
    assert [point[0] for point in pixel_card["progress"]] == [pixel_card["steps"]], \
        "the course measures its pixel baseline only where it reads it: at the last step (course_profile)"
    assert len(ldm_card["progress"]) > 1, "the LDM's curve is measured at every checkpoint, as in minildm train"
    experts_card = json.loads((tmp_path / "experts" / "card.json").read_text())
    assert experts_card["base"] == str(tmp_path / "ldm"), "the course's experts start from the course's own LDM"
    assert experts_card["parts"] == ldm_card["parts"]
    add_card = json.loads((tmp_path / "add" / "card.json").read_text())
    assert add_card["teacher"] == str(tmp_path / "ldm"), "the course distils its own LDM"
    assert add_card["parts"] == ldm_card["parts"]
    assert "speedup_1step" in report["stages"]["add"]["targets"]
    assert "attribute_accuracy" in report["stages"]["judge"]["targets"]
    assert "judge_alignment_gap" in report["stages"]["ae"]["targets"]
    assert "text_to_image_top1" in report["stages"]["clip"]["targets"]
    assert (tmp_path / "judge" / "loss_curve.png").exists() and (tmp_path / "ae" / "loss_curve.png").exists()
    assert "| attribute_accuracy |" in (tmp_path / "report.md").read_text()
    comparison = report["latent_against_pixel"]  # LDM's claim from the course's own two runs
    assert comparison["pixel"]["steps"] == pixel_card["steps"] and comparison["ldm"]["steps"] > 0
    assert "## latent against pixel diffusion" in (tmp_path / "report.md").read_text()

    # interrupted: the last stage lost its finish mark and sits at a checkpoint; a second call
    # skips what is done and resumes there
    (tmp_path / "add" / "course.json").unlink()
    (tmp_path / "add" / "model.safetensors").unlink()
    trained_before = json.loads((tmp_path / "add" / "checkpoint" / "state.json").read_text())["wall_time_s"]
    assert main(["course", "--profile", "smoke", "--out", str(tmp_path), "--quiet", "--lanes", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[1/8] judge: finished in an earlier call" in printed
    assert "[8/8] add: resuming at step" in printed and "[8/8] add: done in " in printed
    resumed = json.loads((tmp_path / "metrics.json").read_text())["stages"]["add"]
    assert resumed["steps"] == add_card["steps"]
    assert resumed["wall_time_s"] >= trained_before > 0, "a resumed stage's time counts its earlier training"


def test_train_builds_on_named_runs_only_where_it_can(capsys):
    assert main(["train", "judge", "--profile", "smoke", "--out", "/tmp/x", "--autoencoder", "runs/ae"]) == 2
    assert "--autoencoder applies to the stages that build on a trained autoencoder (ldm)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
