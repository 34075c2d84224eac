"""``minildm`` — the command line: the stable interface for learners, CI and benchmarks.

::

    minildm train STAGE --profile P --out RUN_DIR [--data SPEC] [--resume] [--steps N] [--device D]
                  [--set SECTION.FIELD=VALUE ...] [--base RUN | --teacher RUN]
                  [--judge RUN] [--autoencoder RUN] [--encoder RUN]   (the earlier runs it builds on)
    minildm sample [--model RUN_OR_CKPT] --prompt TEXT [--steps N] [--guidance S] [--seed N] [--n N] --out FILE.png
    minildm eval STAGE --model RUN_OR_CKPT [--n N] [--seed N] --json
    minildm bench [--json]
    minildm results [--n N] [--json] [--save FILE.json]   (the papers' claims, measured now)
    minildm course --profile P --out DIR [--lanes N] [--seed N] [--set SECTION.FIELD=VALUE ...]

A mistake of the user's (unknown stage, missing checkpoint, bad --data, unwritable --out, …)
prints one line ``minildm: error: …`` and exits with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from minildm.config import EVAL_SEED, PROFILE_NAMES
from minildm.errors import UserError
from minildm.paint_recipe import DEFAULT_RECIPE, PAINT_GUIDANCE, RECIPES
from minildm.stages import BASED_STAGES, EVAL_STAGES, TRAIN_STAGES, UPSTREAM

MAX_UPSCALE = 32  # sample --upscale: a 32-pixel image becomes at most 1024 pixels wide
DEFAULT_PAINT_WEIGHT = 0.5  # the reference LDM's best w' with the full+carry recipe (minildm eval paint)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus the exit status 2)."""

    def error(self, message):
        raise UserError(f"{message} (see: {self.prog} --help)")


def writable_dir(path: str, what: str = "--out") -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a unique name: several processes may probe at once
            pass
    except OSError as error:
        raise UserError(f"{what} {path}: cannot write there ({error.strerror or error})") from None
    return out


def print_figures(figures: dict, as_json: bool) -> None:
    """One JSON object (``--json``), or one ``name value`` line per figure."""
    if as_json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:36s} {value}")


def _command_line() -> str:
    return "minildm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_train(args) -> int:
    from minildm.config import get_profile, with_overrides
    from minildm.stages import stage_module

    stage = stage_module(args.stage)
    profile = with_overrides(get_profile(args.profile), args.set)
    writable_dir(args.out)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: give a positive number of steps")
    if args.teacher is not None:
        if args.stage != "add":
            raise UserError(f"--teacher applies to the add stage (the LDM run to distil), not to {args.stage}")
        if args.base is not None:
            raise UserError("--teacher and --base name the same thing for add; give one of them")
        args.base = args.teacher
    base = {}
    if args.base is not None:
        if args.stage not in BASED_STAGES:
            raise UserError(f"--base applies to the stages that start from a trained model ({' '.join(BASED_STAGES)}), "
                            f"not to {args.stage}")
        base = {"base": args.base}
    for part in ("judge", "autoencoder", "encoder"):
        if getattr(args, part) is not None:
            if part not in UPSTREAM.get(args.stage, ()):
                users = " ".join(s for s, parts in UPSTREAM.items() if part in parts)
                raise UserError(f"--{part} applies to the stages that build on a trained {part} ({users}), "
                                f"not to {args.stage}")
            base[part] = getattr(args, part)
    card = stage.train(profile, args.out, resume=args.resume, steps=args.steps, device=args.device,
                       data=args.data, command=_command_line(), progress=not args.quiet, **base)
    if card is not None:
        print(f"trained {args.stage} for {card['steps']} steps in {card['wall_time_s']:.0f} s; "
              f"weights and card in {args.out}")
        headline = {k: v for k, v in card.get("metrics", {}).items() if isinstance(v, (int, float))}
        print(json.dumps(headline, indent=2))
    return 0


def cmd_eval(args) -> int:
    from minildm.config import get_profile
    from minildm.stages import stage_module

    stage = stage_module(args.stage, EVAL_STAGES)
    model, card = stage.load(args.model)
    profile = get_profile(card.get("profile", "cpu"))
    n = args.n if args.n is not None else getattr(stage, "default_eval_n", lambda p: p.eval_n)(profile)
    print_figures(stage.evaluate(model, n, seed=args.seed), args.json)
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    from PIL import Image

    from minildm.checkpoints import atomic_write_file
    from minildm.data.datasets import to_numpy
    from minildm.stages.ldm import sampling_pipeline

    if args.steps is not None and args.steps < 1 or args.n < 1 or args.upscale < 1:
        raise UserError("--steps, --n and --upscale must be positive")
    if args.upscale > MAX_UPSCALE:  # --upscale 1000 would build a 12 GB picture of a 32-pixel image
        raise UserError(f"--upscale {args.upscale}: at most {MAX_UPSCALE} (each pixel drawn as a "
                        f"{MAX_UPSCALE}×{MAX_UPSCALE} square)")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: give a .png file name")
    writable_dir(str(Path(args.out).resolve().parent))
    paint = _paint_regions(args)
    pipeline, card = sampling_pipeline(args.model)
    student = card["stage"] == "add"  # the ADD student: 1 step, no guidance, unless told otherwise
    args.steps = args.steps if args.steps is not None else (1 if student else 50)
    if args.steps > pipeline.schedule.steps:
        raise UserError(f"--steps {args.steps}: a sampler takes at most {pipeline.schedule.steps} steps, "
                        "one per timestep of the noise schedule")
    if args.guidance is None:
        args.guidance = 1.0 if student else PAINT_GUIDANCE if paint else 3.0
    images = pipeline([args.prompt] * args.n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      paint=paint, paint_weight=args.paint_weight, paint_recipe=args.paint_recipe)
    pictures = to_numpy(images)  # (n, H, W, 3) in [0, 1]
    strip = (np.concatenate(list(pictures), axis=1) * 255).round().astype(np.uint8)
    png = Image.fromarray(strip.repeat(args.upscale, 0).repeat(args.upscale, 1))
    atomic_write_file(args.out, lambda path: png.save(path, format="PNG"))
    sampler = "ADD" if student else "DDIM"
    print(f"{args.n} image(s) of {args.prompt!r} from the {card['stage']} model, {args.steps} {sampler} steps, "
          f"guidance {args.guidance}, seed {args.seed}: {args.out}")
    return 0


def _paint_regions(args) -> dict | None:
    """``--paint PHRASE=BOX|#rrggbb`` (with ``--paint-mask``) → {phrase: region}, or None."""
    import numpy as np
    from PIL import Image

    from minildm.paint import parse_paint_argument

    if args.paint_mask and not args.paint:
        raise UserError("--paint-mask needs --paint PHRASE=#rrggbb for each colour to use")
    mask_image = None
    if args.paint_mask:
        try:
            mask_image = np.asarray(Image.open(args.paint_mask).convert("RGB"))
        except OSError as error:
            raise UserError(f"--paint-mask {args.paint_mask}: cannot read it as an image ({error})") from None
    regions = dict(parse_paint_argument(text, mask_image) for text in args.paint)
    return regions or None


def cmd_bench(args) -> int:
    from minildm.bench import run_bench

    print_figures(run_bench(args.profile), args.json)
    return 0


def cmd_results(args) -> int:
    from minildm import results
    from minildm.checkpoints import atomic_write_file, save_json
    from minildm.config import get_profile

    if args.n is not None and args.n < 6:
        raise UserError(f"--n {args.n}: the diffusion evaluations need at least 6 images (one per category)")
    profile = get_profile(args.profile)
    if args.save:  # before the measuring (minutes), not after it
        writable_dir(str(Path(args.save).resolve().parent), "--save")
    n = args.n if args.n is not None else results.table_n(profile)
    figures = results.measure(profile, n, log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = results.claims_table(figures)
    if args.save:
        atomic_write_file(Path(args.save), lambda path: save_json(
            path, {"profile": profile.name, "n": n, "rows": rows, "figures": figures}))
    print(json.dumps(rows) if args.json else results.markdown(rows))
    return 0


def cmd_course(args) -> int:
    from minildm.config import get_profile, with_overrides
    from minildm.course import run_course
    from minildm.course_lanes import default_lanes

    profile = with_overrides(get_profile(args.profile), args.set)
    out = writable_dir(args.out)
    report = run_course(profile, out, progress=not args.quiet, lanes=args.lanes or default_lanes(), seed=args.seed)
    print(f"course report: {report}")
    return 0


def _whole_number(text: str, low: int, high: int | None = None) -> int:
    """``text`` as a whole number from ``low`` (to ``high``), else argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or high is not None and value > high:
        bounds = f"of at least {low}" if high is None else f"from {low} to {high}"
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {bounds}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    return _whole_number(text, 1)


def seed(text: str) -> int:
    """argparse type: a seed, a whole number from 0 to 2**32 - 1 (numpy's generators refuse
    negative seeds, and the evaluations draw their scenes from numpy)."""
    return _whole_number(text, 0, 2**32 - 1)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minildm", description="minildm: latent diffusion, eDiff-I and ADD, built from scratch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = sub.add_parser("train", help="train one stage")
    train.add_argument("stage", help=f"one of: {' '.join(TRAIN_STAGES)}")
    train.add_argument("--profile", choices=PROFILE_NAMES, default=None,
                       help="smoke | cpu | gpu (default: $MINILDM_PROFILE, else gpu with CUDA, else cpu)")
    train.add_argument("--out", required=True, help="run directory (weights, card, checkpoints)")
    train.add_argument("--data", default=None, help="shapes (default), an image folder with metadata.jsonl, or hub:OWNER/NAME")
    train.add_argument("--base", default=None,
                       help="experts, add: the LDM run to start from (default: the reference ldm)")
    train.add_argument("--teacher", default=None,
                       help="add: the LDM run to distil (default: the reference ldm); the same as --base")
    train.add_argument("--judge", default=None, help="ae: the judge run for the perceptual loss (default: the reference)")
    train.add_argument("--autoencoder", default=None, help="ldm: the autoencoder run (default: the reference)")
    train.add_argument("--encoder", default=None, help="ldm, pixel: the text encoder (clip) run (default: the reference)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    train.add_argument("--steps", type=int, default=None, help="total optimisation steps (default: the profile's)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: the best available)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one value of the profile, e.g. ae.disc_start=1000000 (repeatable)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("eval", help="measure a trained stage; prints its metrics")
    evaluate.add_argument("stage", help=f"one of: {' '.join(EVAL_STAGES)}")
    evaluate.add_argument("--model", default=None, help="run directory or checkpoint (default: the reference)")
    evaluate.add_argument("--n", type=int, default=None, help="number of evaluation images (default: the profile's)")
    evaluate.add_argument("--seed", type=seed, default=EVAL_SEED,
                          help="seed of the evaluation's random draws: sampling noise and rendered scenes (the "
                               "diffusion stages' prompts stay the fixed evaluation set; default: %(default)s, "
                               "the seed of every card and the claims table); another seed shows how much a "
                               "figure moves")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=cmd_eval)

    sample = sub.add_parser("sample", help="generate an image from a prompt")
    sample.add_argument("--model", default=None, help="run directory or checkpoint of ldm, pixel, experts or add (default: the reference ldm)")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 DDIM; an add student: 1)")
    sample.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance scale; 1: none (default 3; painted: {PAINT_GUIDANCE:g}; "
                             "an add student: 1)")
    sample.add_argument("--paint", action="append", default=[], metavar="PHRASE=REGION",
                        help="paint-with-words: PHRASE=x0,y0,x1,y1 (a box, 0-1, y down) or PHRASE=#rrggbb "
                             "(a colour of --paint-mask); repeatable")
    sample.add_argument("--paint-mask", default=None, help="a PNG whose colours mark the painted regions")
    sample.add_argument("--paint-weight", type=float, default=DEFAULT_PAINT_WEIGHT,
                        help=f"paint-with-words weight w' (default {DEFAULT_PAINT_WEIGHT})")
    sample.add_argument("--paint-recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                        help="which tokens are painted: paper (eDiff-I's formula alone), bos (+ the rest of the "
                             "canvas on <bos>), bos+eos (+ <eos> on the regions), full (+ phrases pushed down "
                             "outside their regions), full+carry (+ the words between two painted phrases painted "
                             f"as the phrase before them); default {DEFAULT_RECIPE} (see notebook 05)")
    sample.add_argument("--seed", type=seed, default=0)
    sample.add_argument("--n", type=int, default=1, help="images side by side (default 1)")
    sample.add_argument("--upscale", type=int, default=8,
                        help=f"nearest-neighbour enlargement of the PNG (default 8, at most {MAX_UPSCALE})")
    sample.add_argument("--out", required=True, help="a .png file")
    sample.set_defaults(run=cmd_sample)

    bench = sub.add_parser("bench", help="speed figures, as ratios measured in one run")
    bench.add_argument("--profile", choices=PROFILE_NAMES, default="cpu", help="whose model sizes to time (default: cpu)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(run=cmd_bench)

    claims = sub.add_parser("results", help="the table of the papers' claims, measured now on the reference checkpoints")
    claims.add_argument("--profile", choices=PROFILE_NAMES, default=None)
    claims.add_argument("--n", type=int, default=None, help="prompts per evaluation (default: 12 smoke, 160 otherwise)")
    claims.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    claims.add_argument("--save", default=None, metavar="FILE.json", help="also write the rows and every figure behind them")
    claims.set_defaults(run=cmd_results)

    course = sub.add_parser("course", help="every built stage in order, then a report")
    course.add_argument("--profile", choices=PROFILE_NAMES, default=None)
    course.add_argument("--out", required=True, help="directory for the runs and the report")
    course.add_argument("--lanes", type=positive_int, default=None,
                        help="run up to this many independent jobs side by side, sharing the cores "
                             "(default: 2 where torch has 2 or more threads, else 1)")
    course.add_argument("--seed", type=seed, default=0,
                        help="every stage's training seed (default 0, the reference runs' draw): another seed "
                             "is another draw of the whole course, measured on the same prompts")
    course.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one value of the profile for the whole course, as train's --set does, "
                             "e.g. extras.multi_embedding_steps=900 (repeatable); the report names them, and "
                             "the targets stay the profile's")
    course.add_argument("--quiet", action="store_true")
    course.set_defaults(run=cmd_course)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args = build_parser().parse_args(argv)
        status = args.run(args)
    except UserError as error:
        print(f"minildm: error: {error}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("minildm: interrupted; a run directory keeps its last complete checkpoint "
              "(continue with --resume)", file=sys.stderr)
        status = 130
    if "minildm.train" in sys.modules:  # a run that trained may be a torchrun rank: end it here
        from minildm.train import leave_process_group
        leave_process_group(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
