"""``minildm course`` — the headless course: every built stage in order, then one report.

For each stage: train it with the profile (``DIR/<stage>/``), measure it with its ``evaluate``,
check its targets, and draw its loss curve over the reference's. The report is
``DIR/report.md`` (for people) and ``DIR/report.json`` (for programs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from minildm.config import Profile
from minildm.stages import BASED_STAGES, BUILT, TRAIN_STAGES, stage_module


def check_targets(metrics: dict, targets: dict) -> dict:
    """{metric: {"value", "target", "met"}} for every target of a stage."""
    out = {}
    for name, (op, bound) in targets.items():
        value = metrics.get(name)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": bool(met)}
    return out


def run_course(profile: Profile, out: Path, progress: bool = True) -> Path:
    from minildm import plots
    from minildm.checkpoints import load_checkpoint

    out = Path(out)
    results = {"profile": profile.name, "stages": {}}
    lines = [f"# minildm course report — profile `{profile.name}`", ""]
    for name in BUILT:
        if name not in TRAIN_STAGES:  # an evaluation of a trained model (paint-with-words)
            lines += _evaluate_only(name, profile, out, results)
            continue
        stage = stage_module(name)
        run_dir = out / name
        start = time.time()
        based = {"base": str(out / "ldm")} if name in BASED_STAGES else {}  # the course's own LDM
        card = stage.train(profile, str(run_dir), command=f"minildm course --profile {profile.name}",
                           progress=progress, resume=(run_dir / "checkpoint").exists(), **based)
        metrics = card["metrics"]
        checks = check_targets(metrics, getattr(stage, "TARGETS", {}))
        try:
            _, reference = load_checkpoint(stage.REFERENCE)
        except Exception:  # noqa: BLE001 - the report simply has no reference curve then
            reference = None
        fig = plots.loss_curves(card, reference, title=f"{name}: training loss")
        fig.savefig(run_dir / "loss_curve.png", dpi=120)
        results["stages"][name] = {"wall_time_s": round(time.time() - start, 1), "steps": card["steps"],
                                   "metrics": metrics, "targets": checks}
        lines += [f"## {name}", "",
                  f"{card['steps']} steps in {card['wall_time_s']:.0f} s on {card['device']}; "
                  f"weights and card in `{run_dir}`.", "",
                  "| metric | value | target | met |", "|---|---|---|---|"]
        for metric, check in checks.items():
            lines.append(f"| {metric} | {check['value']:.4f} | {check['target']} | {'yes' if check['met'] else 'no'} |")
        if profile.name == "smoke":
            lines += ["", "(smoke profile: a few steps to prove the code runs; targets are for the cpu profile)"]
        lines += ["", f"![loss curve]({name}/loss_curve.png)", ""]
    (out / "report.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _evaluate_only(name: str, profile: Profile, out: Path, results: dict) -> list[str]:
    """A stage that trains nothing: measured on the course's own LDM."""
    from minildm.checkpoints import save_json

    stage = stage_module(name, BUILT)
    start = time.time()
    model, _ = stage.load(out / "ldm")
    metrics = stage.evaluate(model, stage.default_eval_n(profile))
    (out / name).mkdir(parents=True, exist_ok=True)
    save_json(out / name / "metrics.json", metrics)
    checks = check_targets(metrics, getattr(stage, "TARGETS", {}))
    results["stages"][name] = {"wall_time_s": round(time.time() - start, 1), "metrics": metrics, "targets": checks}
    lines = [f"## {name}", "", f"measured on `{out / 'ldm'}` (nothing to train)", "",
             "| metric | value | target | met |", "|---|---|---|---|"]
    for metric, check in checks.items():
        lines.append(f"| {metric} | {check['value']:.4f} | {check['target']} | {'yes' if check['met'] else 'no'} |")
    return lines + [""]
