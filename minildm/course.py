"""``minildm course`` — the headless course: every stage in order, from scratch, then one report.

Each stage trains on the runs of the stages before it — the autoencoder's perceptual loss on the
course's judge, the LDM on the course's autoencoder and text encoder, the experts and the ADD
student on the course's LDM — so nothing but the measuring instrument comes from the references:
every metric is read by the *reference* judge, the course's fixed ruler (as FID always uses the
same Inception network), so that a course run and the reference runs compare.

For each stage: train it with the profile (``DIR/<stage>/``; :func:`course_profile` says what the
course changes of it), measure it with its ``evaluate``, check its targets, and draw its loss
curve over the reference's. One progress line per stage.
Interrupted, a second call with the same ``DIR`` skips the finished stages (``DIR/<stage>/course.json``)
and resumes the unfinished one at the step of its last checkpoint. The report is ``DIR/report.md``
(for people) and ``DIR/metrics.json`` (for programs).

``--lanes 2`` (the command line's default on two cores or more) runs the stages that need nothing
of each other side by side, each in a process of its own with its share of the cores
(:mod:`minildm.course_lanes`); the stages themselves run the same code, with the same random
draws, as they do here one at a time, which is ``--lanes 1`` — only their thread counts differ,
and with them the last bits of their sums (:mod:`minildm.thread_share`).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path

from minildm.config import Profile, with_training_seed
from minildm.errors import UserError
from minildm.precision import cpu_profile_in_fp32, machine_device_type
from minildm.stages import BASED_STAGES, BUILT, TRAIN_STAGES, UPSTREAM, stage_module

STAGE_OF_PART = {"judge": "judge", "autoencoder": "ae", "encoder": "clip"}
DONE = "course.json"


ROUNDING = 1e-9  # figures are fractions of counts: 0.64375 − 0.59375 is 0.05 + 4e-17 in floating point


# figures the report shows beside each stage's targets: what a teacher looks for first. The pixel
# baseline has no target of its own: its alignment is the LDM's point of comparison. Not its fid,
# taken on fewer images than the LDM's (a Fréchet distance grows as the count falls), nor images/s,
# timed while the lanes share the cores: `minildm results` and `minildm bench` measure those alike.
ALSO_MEASURED = {
    "ae": ("rfid", "object_psnr"),
    "clip": ("probe_shape", "probe_colour", "probe_position"),
    "ldm": ("alignment", "fid", "colour_swaps"),
    "pixel": ("alignment", "colour_swaps"),
    "experts": ("alignment", "base_alignment", "follow_b_late"),  # the late switch with steps uniform in t
    "paint": ("best_recipe", "best_weight", "placement_unpainted", "alignment", "alignment_unpainted"),
    "add": ("alignment_1step", "alignment_4step", "teacher_alignment", "teacher_ddim_4step_alignment"),
}


# what each stage's target measures, in words, for the report's table (its key is the stage's
# TARGETS key, the metric's name in `minildm eval --json`); a test checks every target has words
TARGET_WORDS = {
    "judge": {"attribute_accuracy": "each object's cell, shape, colour and size read right on held-out renders",
              "alignment_true": "renders read as following their own captions",
              "alignment_mismatched": "renders read as following another scene's caption (near chance)"},
    "ae": {"psnr": "reconstruction PSNR in dB",
           "judge_alignment_gap": "judge alignment lost by reconstructing the renders"},
    "clip": {"text_to_image_top1": "retrieval: the right image first for a caption",
             "image_to_text_top1": "retrieval: the right caption first for an image"},
    "ldm": {"alignment_single_object": "one-object prompts followed",
            "alignment_two_object": "two-object prompts followed (the hardest binding)"},
    "experts": {"follow_b_early_karras": "images following prompt B when A→B switches in the first 30% of "
                                         "the steps (spaced as EDM's sampler)",
                "follow_b_late_karras": "the same when it switches in the last 30% of those steps",
                "alignment_gain": "alignment, experts minus one model fine-tuned for the same steps"},
    "paint": {"placement": "two-object prompts with both objects in their painted cells",
              "alignment_drop": "alignment, unpainted minus painted"},
    "add": {"alignment_ratio_1step": "alignment, student 1 step over teacher 50 guided steps",
            "fid_ratio_1step": "fid, student 1 step over teacher 50 guided steps",
            "speedup_1step": "seconds to a decoded batch, teacher 50 guided steps over student 1 step",
            "alignment_4step_minus_1step": "alignment, student 4 steps minus 1 step",
            "alignment_1step_minus_teacher_ddim_1step": "alignment, student 1 step minus teacher forced to 1 DDIM step",
            "alignment_4step_minus_teacher_ddim_4step": "alignment, student 4 steps minus teacher's 4 DDIM steps"},
}


def precision_note(profile: Profile, device_type: str) -> str | None:
    """One line for a ``cpu`` course about to train its LDM in fp32 (``mixed_precision="auto"`` on
    a CPU where bf16 is not faster, :mod:`minildm.precision`), or None: the course's times in the
    README were measured in bf16 on a Xeon with AMX, and a teacher should know before the start
    that this machine will take longer (``data/measurements/course_runs.md``, the Zen 3 run), and
    what to run instead if the hours are not there."""
    if not cpu_profile_in_fp32(profile, device_type):
        return None
    return ("course: this CPU trains in fp32 (bf16 is not faster here; README, Precision). The README's "
            "78 minutes were measured in bf16 on a 2-core Xeon with AMX; on a 2-core AMD Zen 3 in fp32 the "
            "first three stages took 2.3-2.7x as long as there (35 minutes for the three); the whole course "
            "has not been timed on such a CPU. Without the wait: `minildm results` measures the papers' claims "
            "on the reference checkpoints, the notebooks load them with TRAIN_NOW = False, and "
            "`--profile smoke` checks in minutes that the course runs")


def check_targets(metrics: dict, targets: dict) -> dict:
    """{metric: {"value", "target", "met"}} for every target of a stage. A value on the bound meets
    it, floating-point rounding included (``ROUNDING``)."""
    out = {}
    for name, (op, bound) in targets.items():
        value = metrics.get(name)
        met = value is not None and (value >= bound - ROUNDING if op == ">=" else value <= bound + ROUNDING)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": bool(met)}
    return out


def course_command(profile: Profile) -> str:
    """The command line a card of the course records (its seed: the profile's training seed; its
    ``--set`` assignments: the profile's ``overrides``)."""
    seed = profile.ldm_train.seed
    return f"minildm course --profile {profile.name}" + (f" --seed {seed}" if seed else "") + _set_flags(profile.overrides)


def _set_flags(assignments) -> str:
    """`` --set A --set B`` for the assignments, each quoted for a shell."""
    return "".join(f" --set {shlex.quote(assignment)}" for assignment in assignments)


def _same_settings_as_before(out: Path, profile: Profile, seed: int) -> dict:
    """A course directory holds one course: resuming it with another profile, seed or ``--set``
    would mix two. Returns the settings (``settings.json``), which also open ``metrics.json``."""
    def flags(settings: dict) -> str:
        return f"--profile {settings['profile']} --seed {settings['seed']}" + _set_flags(settings.get("set", []))

    wanted = {"profile": profile.name, "seed": seed, **({"set": list(profile.overrides)} if profile.overrides else {})}
    settings = out / "settings.json"
    if settings.exists():
        before = json.loads(settings.read_text())
        if before != wanted:
            raise UserError(f"{out} holds a course run with {flags(before)}; resume it with those, "
                            f"or give {flags(wanted)} a new --out")
    else:
        settings.write_text(json.dumps(wanted) + "\n")
    return wanted


def upstream_runs(name: str, out: Path) -> dict[str, str]:
    """The course's own earlier runs that stage ``name`` builds on, as ``stage.train`` keywords."""
    runs = {part: str(out / STAGE_OF_PART[part]) for part in UPSTREAM.get(name, ())}
    if name in BASED_STAGES:
        runs["base"] = str(out / "ldm")  # experts and ADD start from the course's own LDM
    return runs


def course_profile(profile: Profile, seed: int) -> Profile:
    """The profile as the course trains it: every run at training seed ``seed``
    (:func:`minildm.config.with_training_seed`), and the pixel baseline measuring its progress only
    at its last step — the course reads no other (:func:`latent_against_pixel`), and each earlier one
    took about 31 s of a lane on a 2-core AMD Zen 5, time the LDM beside it gets instead
    (``data/measurements/course_cpu_amd_zen5_seed1.json``). The baseline trains the same;
    ``minildm train pixel`` keeps the whole curve (``minildm results``)."""
    profile = with_training_seed(profile, seed)
    return dataclasses.replace(profile, pixel_train=dataclasses.replace(profile.pixel_train,
                                                                        progress_at_every_checkpoint=False))


def run_course(profile: Profile, out: Path, progress: bool = True, log=print, lanes: int = 1, seed: int = 0) -> Path:
    """Run (or resume) the course in ``out``; returns the path of ``report.md``.

    ``lanes=1`` runs the stages one after another in this process. ``lanes=2`` (or more) runs
    independent work side by side in processes of its own, sharing the cores
    (:mod:`minildm.course_lanes`); every stage draws the same random numbers as it does alone,
    though a job whose thread count changes while it trains rounds its sums differently
    (:mod:`minildm.thread_share` says which jobs, and by how much their figures moved).
    ``seed``: every stage's training seed (:func:`course_profile`; 0, the profile's, draws what
    the reference runs drew) — another seed is another draw of the course."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _same_settings_as_before(out, profile, seed)
    profile = course_profile(profile, seed)
    note = precision_note(profile, machine_device_type())
    if note:
        log(note)
    results = {**settings, "stages": {}}
    if lanes > 1:
        from minildm.course_lanes import run_lanes

        results["lanes"] = run_lanes(profile, out, lanes, log)
    else:
        started = time.time()
        for number, name in enumerate(BUILT, 1):
            run_stage(name, profile, out, progress, log, f"course [{number}/{len(BUILT)}] {name}:",
                      so_far=lambda: time.time() - started)
    for name in BUILT:
        results["stages"][name] = json.loads((out / name / DONE).read_text())
    results["wall_time_s"] = round(sum(r["wall_time_s"] for r in results["stages"].values()), 1)
    all_checks = [c["met"] for r in results["stages"].values() for c in r["targets"].values()]
    results["targets_met"] = [sum(all_checks), len(all_checks)]
    results["latent_against_pixel"] = latent_against_pixel(out)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report_markdown(results, out))
    log("\n".join(line.replace("**", "") for line in course_summary(results)).rstrip())
    return out / "report.md"


def latent_against_pixel(out: Path) -> dict | None:
    """LDM's headline claim (Rombach et al. 2022, Tab. 6 and Fig. 6) from the course's own two runs:
    the pixel baseline's last progress measurement, and the LDM's last one at no more seconds of
    training (its first, if none is that early). Both are ``progress_eval`` on the same prompts with
    the same sampler, so their fids compare (the stages' final evaluations use different numbers of
    images). None without them."""
    cards = {}
    for name in ("pixel", "ldm"):
        card_path = out / name / "card.json"
        if not card_path.exists():
            return None
        cards[name] = json.loads(card_path.read_text()).get("progress") or []
        if not cards[name]:
            return None
    pixel = cards["pixel"][-1]  # [step, training seconds, figures]
    latent = ([point for point in cards["ldm"] if point[1] <= pixel[1]] or cards["ldm"][:1])[-1]
    points = {"pixel": pixel, "ldm": latent}
    comparison = {name: {"steps": step, "training_seconds": seconds, **figures}
                  for name, (step, seconds, figures) in points.items()}
    if "alignment" in pixel[2] and "alignment" in latent[2]:
        comparison["alignment_latent_minus_pixel"] = latent[2]["alignment"] - pixel[2]["alignment"]
    if pixel[2].get("fid") and latent[2].get("fid"):
        comparison["fid_pixel_over_latent"] = pixel[2]["fid"] / latent[2]["fid"]
    return comparison


def run_stage(name: str, profile: Profile, out: Path, progress: bool, log, prefix: str, so_far=None) -> dict:
    """Train (or resume) and measure one stage into ``out/name``, unless an earlier call finished it;
    ``out/name/course.json`` marks it finished and holds its result."""
    from minildm.checkpoints import load_json, save_json

    done_file = out / name / DONE
    if done_file.exists():
        result = load_json(done_file)
        log(f"{prefix} finished in an earlier call ({result['wall_time_s']:.0f} s), skipped", flush=True)
        return result
    starting = _starting(out / name) if name in TRAIN_STAGES else "measuring on the course's own LDM"
    log(f"{prefix} {starting} …", flush=True)
    stage_start, earlier = time.time(), _earlier_training_seconds(out / name)
    result = _train_stage(name, profile, out, progress) if name in TRAIN_STAGES else _evaluate_only(name, profile, out)
    result["wall_time_s"] = round(time.time() - stage_start + earlier, 1)
    save_json(done_file, result)
    met = [check["met"] for check in result["targets"].values()]
    course_time = f"; course {so_far():.0f} s so far" if so_far is not None else ""
    log(f"{prefix} done in {result['wall_time_s']:.0f} s, targets met {sum(met)}/{len(met)}{course_time}", flush=True)
    return result


def _starting(run_dir: Path) -> str:
    state = run_dir / "checkpoint" / "state.json"
    if state.exists():
        return f"resuming at step {json.loads(state.read_text())['step']}"
    return "resuming" if run_dir.exists() and any(run_dir.iterdir()) else "training from scratch"


def _earlier_training_seconds(run_dir: Path) -> float:
    """Training time an interrupted stage had already spent, up to its runs' last checkpoints
    (the experts stage holds several runs: its nodes, the baseline, the multi-embedding model).

    A resumed stage's time is this call's time plus that; work lost after a checkpoint is not counted.
    """
    return sum(float(json.loads(state.read_text()).get("wall_time_s", 0.0))
               for state in run_dir.glob("**/checkpoint/state.json"))


def _train_stage(name: str, profile: Profile, out: Path, progress: bool) -> dict:
    from minildm import plots
    from minildm.checkpoints import load_checkpoint

    stage = stage_module(name)
    run_dir = out / name
    card = stage.train(profile, str(run_dir), command=course_command(profile),
                       progress=progress, resume=(run_dir / "checkpoint").exists(), **upstream_runs(name, out))
    try:
        _, reference = load_checkpoint(stage.REFERENCE)
    except Exception:  # noqa: BLE001 - the report simply has no reference curve then
        reference = None
    fig = plots.loss_curves(card, reference, title=f"{name}: training loss")
    fig.savefig(run_dir / "loss_curve.png", dpi=120)
    # the experts stage also trains an equal-cost baseline and a multi-embedding model: count them all
    return {"steps": card.get("training_steps", card["steps"]),
            "train_wall_time_s": card.get("training_wall_time_s", card["wall_time_s"]), "device": card["device"],
            "mixed_precision": card.get("mixed_precision"),  # the profile's "auto" resolved (minildm.precision)
            "stopped_by_time_budget": card.get("stopped_by_time_budget", False),  # TrainConfig.max_train_seconds
            "builds_on": upstream_runs(name, out), "metrics": card["metrics"],
            "targets": check_targets(card["metrics"], getattr(stage, "TARGETS", {})), "loss_curve": "loss_curve.png"}


def _evaluate_only(name: str, profile: Profile, out: Path) -> dict:
    """A stage that trains nothing (paint-with-words): measured on the course's own LDM."""
    from minildm.checkpoints import save_json

    stage = stage_module(name, BUILT)
    model, _ = stage.load(out / "ldm")
    metrics = stage.evaluate(model, stage.default_eval_n(profile))
    (out / name).mkdir(parents=True, exist_ok=True)
    save_json(out / name / "metrics.json", metrics)
    return {"builds_on": {"ldm": str(out / "ldm")}, "metrics": metrics,
            "targets": check_targets(metrics, getattr(stage, "TARGETS", {}))}


def course_summary(results: dict) -> list[str]:
    """The lines a teacher reads first (Markdown): the course's wall clock, and the targets met and
    missed, each missed one with its value and bound (not on the smoke profile, whose few steps are
    not meant to meet them). They open ``report.md``, and the course prints them when it ends."""
    met, total = results["targets_met"]
    stages, summed = len(results["stages"]), results["wall_time_s"]
    lines = []
    if "lanes" in results:
        lanes = results["lanes"]
        lines += [f"The course took **{lanes['elapsed_s'] / 60:.1f} minutes** of wall clock ({lanes['elapsed_s']:.0f} s), "
                  f"run on {lanes['lanes']} lanes sharing {lanes['cores']} cores. Each stage's own time was "
                  f"measured while it shared the cores; the {stages} stages' times sum to {summed:.0f} s.", ""]
    else:
        lines += [f"The course took **{summed / 60:.1f} minutes**: {stages} stage{'s' * (stages != 1)} one after "
                  f"another, {summed:.0f} s.", ""]
    lines += [f"Targets met: **{met} of {total}**."]
    missed = [(name, metric, check) for name, result in results["stages"].items()
              for metric, check in result["targets"].items() if not check["met"]]
    if results.get("set"):
        lines += ["", f"Run with --set {' '.join(results['set'])}; the targets were set for the "
                      f"{results['profile']} profile as it is written, so they may not apply."]
    if results["profile"] == "smoke":
        lines += ["", "(smoke profile: a few steps to prove the code runs; the targets are for the cpu profile)"]
    elif missed:
        lines += ["", "Missed:"] + [f"- {name} · {metric}: {_target_value(check)} (target {check['target']})"
                                    for name, metric, check in missed]
    lines.append("")
    return lines


def report_markdown(results: dict, out: Path) -> str:
    lines = [f"# minildm course report — profile `{results['profile']}`", "", *course_summary(results)]
    if results.get("seed"):
        lines += [f"Every stage trained at seed {results['seed']} (the reference runs: seed 0); "
                  "the evaluations use the same prompts at every seed.", ""]
    for name, result in results["stages"].items():
        lines += [f"## {name}", ""]
        if "steps" in result:
            precision = {"bf16": ", bf16 autocast", "fp16": ", fp16 autocast", "no": ", fp32"}.get(
                result.get("mixed_precision"), "")
            lines.append(f"{result['steps']} steps, {result['train_wall_time_s']:.0f} s of training on "
                         f"{result['device']}{precision} ({result['wall_time_s']:.0f} s with measuring); weights "
                         f"and card in `{out / name}`.")
            if result.get("stopped_by_time_budget"):
                lines.append(f"Its time budget ({name}_train.max_train_seconds) stopped it before the profile's steps.")
        else:
            lines.append(f"measured on `{out / 'ldm'}` (nothing to train), {result['wall_time_s']:.0f} s.")
        if result["builds_on"]:
            lines.append("Builds on: " + ", ".join(f"{part} `{path}`" for part, path in result["builds_on"].items()) + ".")
        if result["targets"]:
            lines += ["", "| metric | what it measures | value | target | met |", "|---|---|---|---|---|"]
            for metric, check in result["targets"].items():
                words = TARGET_WORDS.get(name, {}).get(metric, "")
                lines.append(f"| {metric} | {words} | {_target_value(check)} | {check['target']} | "
                             f"{'yes' if check['met'] else 'no'} |")
        else:
            lines += ["", "No targets of its own."]
        also = [f"{key} {_figure(result['metrics'][key])}" for key in ALSO_MEASURED.get(name, ())
                if key in result.get("metrics", {})]
        if also:
            lines += ["", "Also measured: " + ", ".join(also) + "."]
        if "loss_curve" in result:
            lines += ["", f"![loss curve]({name}/{result['loss_curve']})"]
        lines.append("")
    comparison = results.get("latent_against_pixel")
    if comparison:
        lines += _latent_against_pixel_markdown(comparison)
    return "\n".join(lines) + "\n"


def _latent_against_pixel_markdown(comparison: dict) -> list[str]:
    pixel, latent = comparison["pixel"], comparison["ldm"]
    lines = ["## latent against pixel diffusion, at equal training time", "",
             "Each run's progress measurement on the same prompts (20 guided DDIM steps, read by the judge): "
             "the pixel baseline's last, and the LDM's last at no more seconds of training. On lanes the "
             "two shared the cores with different jobs (the LDM has both once the others end), so seconds "
             "here are not exactly equal compute: `minildm results` compares reference runs that each "
             "trained alone.", "",
             "| | pixel | latent |", "|---|---|---|",
             f"| steps | {pixel['steps']} | {latent['steps']} |",
             f"| seconds of training | {pixel['training_seconds']:.0f} | {latent['training_seconds']:.0f} |"]
    for key in ("alignment", "alignment_two_object", "fid"):
        if key in pixel and key in latent:
            lines.append(f"| {key} | {_figure(pixel[key])} | {_figure(latent[key])} |")
    lines.append("")
    if "alignment_latent_minus_pixel" in comparison:
        lines.append(f"Alignment, latent minus pixel: {comparison['alignment_latent_minus_pixel']:+.3f}.")
    if "fid_pixel_over_latent" in comparison:
        lines.append(f"Fid, pixel over latent: {comparison['fid_pixel_over_latent']:.2f} (above 1: the latent "
                     "model's images are nearer the data's).")
    return lines + [""]


def _target_value(check: dict) -> str:
    return "—" if check["value"] is None else f"{check['value']:.4f}"


def _figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
