"""``minildm course --lanes N`` — the course's work side by side, at most N jobs at a time.

Why it pays on a small CPU: the diffusion stages' networks are too small to keep two cores busy.
In the course runs of ``data/measurements`` (a 2-core Xeon), the experts' tree took 1.6× as long
on one thread as on two and the ADD student 1.6×, so two such trainings on one thread each get
through about 1.25× the work of one on both. The judge and CLIP took 2.0× and 1.9×: for them
lanes gain nothing. Over the whole course, 93.5 minutes on two lanes against 107 on one.

And the course is not a chain. What each stage needs (``minildm.stages.UPSTREAM``):

    judge ──► ae ──┐
                   ├──► ldm ──► experts (tree, baseline, multi-embedding) ──► experts measured
    clip ──────────┘     ├───► add
      └──► pixel         └───► paint

so the pixel baseline can train beside the autoencoder and the LDM, and after the LDM the
experts stage's three independent runs, the ADD student and paint-with-words are five jobs that
need nothing of each other. Here every stage is a job, except that the experts stage is split in
four: its three runs (:data:`minildm.stages.experts.PARTS`), then the stage itself, which finds
them trained and only assembles and measures them.

The scheduler starts jobs in :data:`PRIORITY` order as soon as what they need is finished, at most
``lanes`` at a time (the judge, :data:`ALONE`, with nothing beside it), each in a process of its
own (``python -m minildm.course_lanes JOB``; its output goes to ``DIR/lanes/JOB.log``). It
splits the cores evenly among the running jobs and, when one is left alone, gives it all of them
(:mod:`minildm.thread_share`). A job runs the same code, with the same random draws, as
``minildm course`` does one stage at a time; only the thread counts differ, and a count that
changes while a job trains changes the last bits of its sums (:mod:`minildm.thread_share`).
Interrupted, the next call skips the finished jobs and resumes the others from their
checkpoints, as the one-lane course does.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from minildm import prefetch, thread_share
from minildm.checkpoints import load_json, save_json
from minildm.config import Profile, get_profile, with_overrides
from minildm.course import DONE, STAGE_OF_PART, course_command, course_profile, run_stage, upstream_runs
from minildm.errors import UserError
from minildm.stages import BASED_STAGES, BUILT, TRAIN_STAGES, UPSTREAM

EXPERT_PARTS = ("experts:tree", "experts:baseline", "experts:multi")  # see minildm.stages.experts.PARTS
# Which job starts first when several could: the longest chain (to the LDM and the experts) first,
# so that nothing waits on it at the end; the short measuring jobs last, to fill the gaps.
PRIORITY = ("judge", "ae", "clip", "pixel", "ldm", *EXPERT_PARTS, "add", "experts", "paint")
# Jobs that run with nothing beside them. The judge's network keeps two cores busy (on one thread
# it took 2.0× as long as on two), so sharing the cores gains nothing for it, and the longest chain
# (judge → ae → ldm → experts) waits on it: alone, it is done in half the time.
ALONE = ("judge",)
POLL_SECONDS = 1.0


def default_lanes() -> int:
    """``minildm course``'s lanes when none are asked for: two where there are two cores to share
    (measured on a 2-core CPU: 93.5 minutes against 107 on one lane), else one. More than two
    gains little: after the LDM at most five jobs could run, and the earlier stages form two chains."""
    return 2 if torch.get_num_threads() >= 2 else 1


def job_needs() -> dict[str, tuple[str, ...]]:
    """job -> the jobs that must finish before it starts, from the stages' own ``UPSTREAM``."""
    needs = {}
    for name in BUILT:
        before = tuple(STAGE_OF_PART[part] for part in UPSTREAM.get(name, ()))
        if name in BASED_STAGES or name not in TRAIN_STAGES:  # experts, add; paint measures the LDM
            before += ("ldm",)
        needs[name] = before
    for part in EXPERT_PARTS:
        needs[part] = needs["experts"]
    needs["experts"] = EXPERT_PARTS
    return needs


def run_lanes(profile: Profile, out: Path, lanes: int, log=print) -> dict:
    """Run (or resume) every job of the course in ``out``, at most ``lanes`` at once; returns the
    timeline: ``{"lanes", "cores", "elapsed_s", "jobs": {job: {"start_s", "end_s"}}}``, the
    seconds counted on the course's clock (summed over the calls that made it). Each job rebuilds
    the profile as the course trains it (:func:`minildm.course.course_profile`) from its name and
    its training seed."""
    seed = profile.ldm_train.seed
    rebuilt = with_overrides(get_profile(profile.name), list(profile.overrides))
    if course_profile(rebuilt, seed) != course_profile(profile, seed):
        raise ValueError(f"--lanes runs each job in a process of its own, which rebuilds profile "
                         f"{profile.name!r} from its name, seed and --set assignments; this one was changed "
                         "in memory")
    needs, folder, cores = job_needs(), out / "lanes", torch.get_num_threads()
    folder.mkdir(parents=True, exist_ok=True)
    timeline_file = folder / "timeline.json"
    timeline = load_json(timeline_file) if timeline_file.exists() else {"elapsed_s": 0.0, "jobs": {}}
    call_start, before = time.time(), timeline["elapsed_s"]

    def clock() -> float:
        return round(before + time.time() - call_start, 1)

    def save() -> None:
        timeline["elapsed_s"] = clock()
        save_json(timeline_file, timeline)

    finished, running, threads = set(), {}, {}  # threads: the share last written for each running job
    for number, job in enumerate(PRIORITY, 1):
        if _finished(job, out):
            finished.add(job)
            log(f"course [{number}/{len(PRIORITY)}] {job}: finished in an earlier call, skipped", flush=True)
    previous_handler = _stop_jobs_on_sigterm()
    try:
        while len(finished) < len(PRIORITY):
            for job in startable(finished, running, lanes, needs):
                running[job] = _launch(job, profile, out, folder, lanes)
                timeline["jobs"][job] = {"start_s": clock()}
                log(f"{_prefix(job)} started ({len(running)} of {lanes} lanes busy); its log: "
                    f"{folder / (_slug(job) + '.log')}", flush=True)
            if not running:  # cannot happen while job_needs() describes a graph without cycles
                raise RuntimeError(f"no job can start; waiting: {sorted(set(PRIORITY) - finished)}")
            _share_cores(running, threads, cores, folder)
            time.sleep(POLL_SECONDS)
            for job, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[job], threads[job]
                if process.returncode != 0:
                    raise UserError(f"course job {job} failed (exit status {process.returncode}); "
                                    f"its log: {folder / (_slug(job) + '.log')}")
                finished.add(job)
                timeline["jobs"][job]["end_s"] = clock()
                save()
                log(f"{_prefix(job)} {_outcome(job, out, timeline['jobs'][job])}; course {clock():.0f} s so far",
                    flush=True)
    finally:
        for process in running.values():  # interrupted or failed: stop the others at their checkpoints
            process.terminate()
        for process in running.values():
            process.wait()
        save()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return {"lanes": lanes, "cores": cores, **timeline}


def _stop_jobs_on_sigterm():
    """``kill`` (SIGTERM) ends the course as Ctrl-C does, through the ``finally`` that stops the
    running jobs at their checkpoints; by default it would end this process alone and leave them
    training. Returns the handler it replaced (None where it cannot set one: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def startable(finished: set, running, lanes: int, needs: dict) -> list[str]:
    """The jobs to start now, in :data:`PRIORITY` order: those whose needs are finished, while
    lanes are free — and none beside a job of :data:`ALONE`, which starts only on an idle machine."""
    started = []
    for job in PRIORITY:
        busy = [*running, *started]
        if len(busy) >= lanes or any(other in ALONE for other in busy):
            break
        if job in finished or job in busy or not set(needs[job]) <= finished or (job in ALONE and busy):
            continue
        started.append(job)
    return started


def _finished(job: str, out: Path) -> bool:
    stage, _, part = job.partition(":")
    if part:
        from minildm.stages.experts import part_done

        return part_done(out / stage, part)
    return (out / stage / DONE).exists()


def _launch(job: str, profile: Profile, out: Path, folder: Path, lanes: int) -> subprocess.Popen:
    """Start ``job`` in a process of its own. On a GPU machine it draws batches ahead with its
    lane's share of the cores (:func:`minildm.prefetch.training_processes`): the judge, which runs
    alone, with all of them."""
    share = folder / f"{_slug(job)}.threads"
    share.unlink(missing_ok=True)  # from an interrupted call; _share_cores writes it before the job's first step
    with open(folder / f"{_slug(job)}.log", "ab") as log_file:
        settings = [f"--set={assignment}" for assignment in profile.overrides]
        return subprocess.Popen([sys.executable, "-m", "minildm.course_lanes", job, "--profile", profile.name,
                                 "--out", str(out), "--seed", str(profile.ldm_train.seed), *settings],
                                stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, thread_share.ENV: str(share),
                                     prefetch.LANES_ENV: str(1 if job in ALONE else lanes)})


def _share_cores(running: dict, threads: dict, cores: int, folder: Path) -> None:
    """An even split of ``cores`` threads among the running jobs (the first ones get any remainder),
    written for each job whose share changed (``threads`` holds the shares written so far)."""
    share, extra = divmod(cores, len(running))
    for k, job in enumerate(running):
        count = max(1, share + (1 if k < extra else 0))
        if threads.get(job) != count:
            thread_share.write(folder / f"{_slug(job)}.threads", count)
            threads[job] = count


def _outcome(job: str, out: Path, times: dict) -> str:
    if ":" in job:
        return f"trained in {times['end_s'] - times['start_s']:.0f} s"
    result = load_json(out / job / DONE)
    met = [check["met"] for check in result["targets"].values()]
    return f"done in {result['wall_time_s']:.0f} s, targets met {sum(met)}/{len(met)}"


def _prefix(job: str) -> str:
    return f"course [{PRIORITY.index(job) + 1}/{len(PRIORITY)}] {job}:"


def _slug(job: str) -> str:
    return job.replace(":", "-")


def run_job(job: str, profile: Profile, out: Path) -> None:
    """One job, in this process: a whole stage (trained and measured, as the one-lane course does
    it) or one of the experts stage's three runs."""
    from minildm.stages import stage_module

    thread_share.follow()
    stage, _, part = job.partition(":")
    if part:
        stage_module(stage).train(profile, str(out / stage), command=course_command(profile),
                                  progress=False, part=part, **upstream_runs(stage, out))
    else:
        run_stage(stage, profile, out, progress=False, log=print, prefix=f"{job}:")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm.course_lanes",
                                     description="one job of `minildm course --lanes` (the course starts these)")
    parser.add_argument("job", choices=PRIORITY)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        profile = with_overrides(get_profile(args.profile), args.set)
        run_job(args.job, course_profile(profile, args.seed), Path(args.out))
    except UserError as error:
        print(f"minildm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
