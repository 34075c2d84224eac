"""The course's table of claims: each paper's headline claim, what we measure for it, our number
measured live from the reference checkpoints, and the paper's number beside it.

Our numbers come from the stages' own ``evaluate`` — exactly what ``minildm eval STAGE`` prints —
run on the reference checkpoints now (:func:`measure`); nothing here is typed in. The paper's
numbers are quotations, with the table or figure they come from (``../shared/reference/*.md``
lists them), and "—" where the paper gives no number for the claim.

A caution that the notebook repeats: the papers measure FID on 5k–30k COCO images with Inception
features and CLIP scores with CLIP ViT-g; we measure the judge's alignment (the share of prompts
whose every clause a trained reader finds in the image) and a Fréchet distance in the judge's
feature space on a few hundred images. Compare *directions and ratios*, not absolute values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minildm.stages import EVAL_STAGES, stage_module

MEASURED_STAGES = ("ldm", "pixel", "experts", "paint", "add")


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    measure: str  # what we measure for it, in words
    value: Callable[[dict], float | None]  # our number, from {stage: evaluate(...) figures}
    target: tuple[str, float] | None  # the course's target (the stage's TARGETS or the issue's), if any
    paper_value: str  # the paper's number and its source, or "—"


def _target(stage: str, metric: str) -> tuple[str, float]:
    """The stage's own target for ``metric`` (its ``TARGETS``), so the table and the course agree."""
    return stage_module(stage, EVAL_STAGES).TARGETS[metric]


def _ratio(a, b):
    return None if a is None or not b else a / b


def _loss_change_percent(experts: dict, interval: str = "all"):
    """The experts' held-out diffusion loss minus the single model's on ``interval``, in % of the
    single model's (``interval_loss`` of the experts' evaluate; None for figures measured before it
    existed). A percentage, not a ratio: the differences are a few tenths of a percent."""
    loss = experts.get("interval_loss", {}).get("loss", {}).get(interval)
    return None if loss is None else 100 * (loss["experts"] - loss["baseline"]) / loss["baseline"]


def _style_ratio(embeddings: dict | None):
    """Background distance with the reference's image condition over the caption's alone (None
    when the experts run has no multi-embedding model)."""
    if not embeddings:
        return None
    return _ratio(embeddings["background_distance_reference"], embeddings["background_distance_text"])


CLAIMS = (
    Claim("LDM", "latent diffusion samples much faster than pixel diffusion",
          "images/s, latent over pixel (same UNet widths, 50 guided DDIM steps, decoder included)",
          lambda f: _ratio(f["ldm"]["images_per_second"], f["pixel"]["images_per_second"]), (">=", 5.0),  # issue 5's bound
          "≥ 2.7× sampling throughput (Tab. 6, inpainting, equal #params)"),
    Claim("LDM", "at equal training compute, latent diffusion reaches better quality",
          "pixel fid over latent fid, both trained the same 20 minutes (judge features, same prompts)",
          lambda f: _ratio(f["pixel"]["fid"], f["ldm"]["fid"]), (">=", 1.0),
          "FID better by ≥ 1.6× (Tab. 6); a gap of 38 FID, LDM-1 vs LDM-8 after 2M steps (Fig. 6)"),
    Claim("LDM", "… and better text alignment",
          "judge alignment, latent minus pixel, at equal training time",
          lambda f: f["ldm"]["alignment"] - f["pixel"]["alignment"], (">=", 0.0), "—"),
    Claim("LDM", "cross-attention makes text a condition: objects, colours, counts, relations",
          "judge alignment on two-object prompts (the hardest binding)",
          lambda f: f["ldm"]["alignment_two_object"], _target("ldm", "alignment_two_object"),
          "— (qualitative, Figs. 5 and 13)"),
    Claim("eDiff-I", "text matters early in sampling …",
          "share of samples that follow prompt B when the prompt switches A→B in the first 30% of 50 steps spaced "
          "in σ as EDM's sampler (Karras et al. 2022, ρ = 7; eDiff-I is built on EDM)",
          lambda f: f["experts"]["follow_b_early_karras"], _target("experts", "follow_b_early_karras"),
          "switching in the first 40% changes the output completely (Fig. 4)"),
    Claim("eDiff-I", "… and is ignored late",
          "the same share when the switch comes in the last 30% of those steps, most of them at low noise",
          lambda f: f["experts"]["follow_b_late_karras"], _target("experts", "follow_b_late_karras"),
          "switching in the last 7% leaves the output unchanged (Fig. 4)"),
    Claim("eDiff-I", "… with the steps uniform in t",
          "the same share for a switch in the last 30% of 50 DDIM steps uniform in t, the spacing the course "
          "samples with: they begin at t = 281, where more noise is left",
          lambda f: f["experts"]["follow_b_late"], ("<=", 0.1),
          "switching in the last 7% leaves the output unchanged (Fig. 4)"),
    Claim("eDiff-I", "… at the paper's granularity",
          "the same share for a switch in the last 10% of the uniform steps (our switch point nearest the paper's 7%)",
          lambda f: max(v for k, v in f["experts"]["prompt_switch"].items() if float(k) >= 0.9), ("<=", 0.1),
          "switching in the last 7% leaves the output unchanged (Fig. 4)"),
    Claim("eDiff-I", "experts by noise interval beat one model at the same inference cost",
          "judge alignment, experts minus the single model fine-tuned for the same total steps",
          lambda f: f["experts"]["alignment_gain"], _target("experts", "alignment_gain"),
          "better FID–CLIP trade-off at every guidance scale (Fig. 7)"),
    Claim("eDiff-I", "… because each expert denoises its noise levels better than one network can",
          "held-out diffusion loss (the training objective, the same renders, t and noise for both) over every t, "
          "experts minus the single model in % of the single model's: below 0, the experts denoise better "
          "(each interval: notebook 04)",
          lambda f: _loss_change_percent(f["experts"]), None,
          "— (its premise, Sec. 3: one network with only a time input has limited capacity to both lay out "
          "the image from the text at high noise and add detail at low noise)"),
    Claim("eDiff-I", "a reference image's embedding carries its style into a new caption",
          "background brightness distance to a dark or light reference, the new caption sampled with the reference's "
          "image condition over the caption alone (the multi-embedding model; a ratio below 1 moves toward it)",
          lambda f: _style_ratio(f["experts"].get("embeddings")), ("<=", 0.8),
          "— (qualitative: samples \"faithful to both the input style and the input caption\")"),
    Claim("eDiff-I", "paint-with-words places objects without training",
          "share of two-object prompts with both objects read in their painted cells (best recipe and w′, guidance 7.5)",
          lambda f: f["paint"]["placement"], _target("paint", "placement"), "— (qualitative, Figs. 13–15)"),
    Claim("eDiff-I", "… while the image still matches the prompt",
          "judge alignment, unpainted minus painted",
          lambda f: f["paint"]["alignment_drop"], _target("paint", "alignment_drop"), "—"),
    Claim("ADD", "one student step reaches the teacher's quality",
          "judge alignment, student 1 step over teacher 50 guided steps",
          lambda f: f["add"]["alignment_ratio_1step"], _target("add", "alignment_ratio_1step"),
          "CLIP 0.326 (ADD-M, 1 step) against 0.318 (DPM-Solver, 25 steps): 1.03 (Tab. 2)"),
    Claim("ADD", "… at a similar fidelity",
          "fid, student 1 step over teacher 50 guided steps",
          lambda f: f["add"]["fid_ratio_1step"], _target("add", "fid_ratio_1step"),
          "FID 19.7 against 20.1: 0.98 (Tab. 2)"),
    Claim("ADD", "more steps refine the sample",
          "judge alignment, student 4 steps minus 1 step",
          lambda f: f["add"]["alignment_4step_minus_1step"], _target("add", "alignment_4step_minus_1step"),
          "ADD-XL 4 steps beats SDXL 50 steps in most comparisons (user study, Fig. 5)"),
    Claim("ADD", "far better than sampling the teacher in one step",
          "judge alignment, student 1 step minus the teacher forced to 1 DDIM step",
          lambda f: f["add"]["alignment_1step_minus_teacher_ddim_1step"],
          _target("add", "alignment_1step_minus_teacher_ddim_1step"),
          "FID 19.7 against 37.2 for 1-step progressive distillation (Tab. 2)"),
    Claim("ADD", "and much faster",
          "seconds to a decoded batch, teacher 50 guided steps over student 1 step",
          lambda f: f["add"]["speedup_1step"], _target("add", "speedup_1step"),
          "0.88 s (25 DPM steps) against 0.09 s: 9.8× (Tab. 2, A100)"),
)


def table_n(profile) -> int:
    """Prompts per evaluation for the table: one size for every stage, because a Fréchet distance
    depends on the number of images and the table divides the pixel model's by the latent one's.
    160 (about six minutes on a 2-core CPU); 12 on the smoke profile, to prove the code runs."""
    return 12 if profile.name == "smoke" else 160


def default_n(stage: str, profile) -> int:
    """The evaluation size the stage's ``minildm eval`` uses for ``profile``."""
    module = stage_module(stage, EVAL_STAGES)
    return getattr(module, "default_eval_n", lambda p: p.eval_n)(profile)


def evaluate_reference(stage: str, n: int) -> dict:
    """``minildm eval STAGE --n N`` on the reference checkpoint: the stage's ``evaluate``."""
    from minildm.pipeline import DiffusionPipeline

    module = stage_module(stage, EVAL_STAGES)
    model, _ = module.load(None)
    if isinstance(model, DiffusionPipeline):  # a first call pays one-time costs: keep them out of images/s
        model(["a red circle", "a blue square"], steps=2)
    return module.evaluate(model, n)


def measure(profile, n: int | None = None, stages=MEASURED_STAGES, log=print) -> dict[str, dict]:
    """Every stage the claims need, evaluated now on its reference checkpoint with ``n`` images
    (default: the profile's per-stage evaluation size, as ``minildm eval`` uses)."""
    import time

    figures = {}
    for stage in stages:
        started = time.perf_counter()
        size = n if n is not None else default_n(stage, profile)
        figures[stage] = evaluate_reference(stage, size)
        log(f"measured {stage} on {size} prompts in {time.perf_counter() - started:.0f} s")
    return figures


def _met(value, target) -> bool | None:
    if value is None or target is None:
        return None
    op, bound = target
    return value >= bound if op == ">=" else value <= bound


def claims_table(figures: dict[str, dict]) -> list[dict]:
    """One row per claim: paper, claim, what we measure, ours, target, met, the paper's number."""
    rows = []
    for claim in CLAIMS:
        value = claim.value(figures)
        rows.append({"paper": claim.paper, "claim": claim.claim, "measure": claim.measure,
                     "ours": None if value is None else float(value),
                     "target": None if claim.target is None else f"{claim.target[0]} {claim.target[1]:g}",
                     "met": _met(value, claim.target), "paper_value": claim.paper_value})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table as Markdown (notebook 07 shows it; the README quotes a measured copy)."""
    lines = ["| paper | claim | we measure | ours | target | met | the paper |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = "—" if r["ours"] is None else f"{r['ours']:.3g}"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['paper']} | {r['claim']} | {r['measure']} | {ours} | {r['target'] or ''} | {met} | "
                     f"{r['paper_value']} |")
    return "\n".join(lines)
