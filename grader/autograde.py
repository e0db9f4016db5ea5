"""grader.autograde: grade a whole class, in parallel, resumably, into nbgrader's gradebook.

    autograde("kv_cache", Path("submissions"), Path("grading-output"), workers=2, sandbox="bwrap")
    autograde("kv_cache", Path("submissions"), Path("grading-output"), backend="ray", ray_address="auto")

The path of one submission: discover (`submissions.py`) -> a worker process
(`grade_one.py`: prepare, sandboxed execute, score) -> a result JSON per learner -> the
gradebook, written by this driver only -> feedback HTML (`feedback.py`). A result whose
fingerprint (submission bytes, lab source, grader version) is unchanged is not regraded.

Before a class is graded, the lab's reference solution is graded the same way, here (the
*preflight*): if it does not get full marks, the grader or this machine is at fault, and the
batch stops before it writes anything. A grade that is not known yet (an inconclusive timing)
is not recorded as a zero: `retry_inconclusive` regrades those submissions.

Backends run the worker processes: `local` starts them on this machine, at most `workers` at
a time; `ray` makes each submission a Ray task (`grader.ray_backend`), on this machine or a
cluster, with the CPUs and GPUs the lab's profile asks for. Either way only this driver writes
results, the gradebook and feedback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import notebook
from .catalogue import REPO_ROOT
from .timed import TimedTask
from .sandbox import Limits, die_with_parent
from .submissions import Submission, discover

GRADER_VERSION = "3"  # bump when grading changes meaning, so every submission is regraded


@dataclass
class Outcome:
    student: str
    status: str  # graded | rejected | grader-error | skipped (unchanged since the last run)
    points: float
    max_points: float
    result_path: Path
    inconclusive: list[str] = field(default_factory=list)  # tasks whose grade is not known yet (not awarded)
    error: str = ""  # why, for a grader-error or a rejected submission


class PreflightFailed(RuntimeError):
    """The lab's reference solution did not get full marks here: grading the class would not be right."""


def source_path(lab: str) -> Path:
    path = REPO_ROOT / "solutions" / lab / f"{lab}.ipynb"
    if not path.is_file():
        from .release import source_labs

        raise ValueError(f"unknown lab {lab!r} (no source notebook at {path}); labs: {', '.join(source_labs())}")
    return path


def fingerprint(sub: Submission, source: Path) -> str:
    h = hashlib.sha256()
    for part in (sub.path.read_bytes() if sub.path.is_file() else b"<missing>", source.read_bytes(),
                 GRADER_VERSION.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


BACKENDS = ("local", "ray")


def autograde(lab: str, submissions_dir: Path, out: Path, workers: int | None = 2, sandbox: str = "bwrap",
              limits: Limits = Limits(), seed: int | None = None, progress: bool = True,
              force: bool = False, results_dir: Path | None = None, backend: str = "local",
              ray_address: str | None = None, due=None, preflight: bool = True,
              retry_inconclusive: bool = False, timing: bool = True) -> list[Outcome]:
    """Grade every submission of `lab` under `submissions_dir`; write results, gradebook and feedback to `out`.

    Under `out`: `autograded/<student>/<lab>/<lab>.ipynb` and `feedback/<student>/<lab>/<lab>.html`
    (nbgrader's own layout, so `out` may be an nbgrader course root: formgrader then lists the
    submissions as autograded and `nbgrader release_feedback` hands the pages out),
    `gradebook.db`, and one result JSON per student
    in `results_dir` (default `out/results`).

    `due` (a datetime): the lab's due date, recorded in the gradebook; each result then says how
    late it was. Time on task comes from the progress file next to each submission (grader.tracks).

    `workers`: submissions graded at once (local: default 2; ray: default as many as the
    cluster's resources allow). `sandbox`: how learner code is isolated (`grader.sandbox`).

    `preflight`: first grade the lab's reference solution the same way (`run_preflight`); raise
    `PreflightFailed`, having written nothing, unless it gets full marks. `retry_inconclusive`:
    also regrade the submissions that have an inconclusive task (a plain re-run skips them).
    `timing=False`: do not time the lab's timed task; it is left inconclusive, to be timed by a later
    run with `retry_inconclusive`.
    """
    from .feedback import write_feedback
    from .gradebook import record

    # Absolute paths: the sandboxed kernel starts in its own working directory, where relative ones break.
    out, submissions_dir = Path(out).resolve(), Path(submissions_dir).resolve()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                         "(the sandbox is chosen separately: sandbox='bwrap', 'docker' or 'none')")
    if ray_address and backend != "ray":
        raise ValueError("a Ray address was given but the backend is local: add --backend ray")
    source = source_path(lab)
    subs = discover(lab, submissions_dir)
    if backend == "ray":
        from .ray_backend import submission_resources

        if not limits.threads:  # each task gets the CPUs it asks Ray for, and as many torch threads
            limits = dataclasses.replace(limits, threads=submission_resources(lab, limits)["num_cpus"])
    elif not limits.threads:  # share the cores: oversubscribed OpenMP threads slow everyone down many times over
        workers = workers or 2
        limits = dataclasses.replace(limits, threads=max(1, (os.cpu_count() or 1) // workers))
    results_dir = Path(results_dir).resolve() if results_dir else out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    jobs, outcomes = [], []
    for sub in subs:
        result_path = results_dir / f"{sub.student}.json"
        fp = fingerprint(sub, source)
        if not force and result_path.is_file():
            old = json.loads(result_path.read_text())
            retry = retry_inconclusive and old.get("inconclusive")
            if old.get("fingerprint") == fp and old.get("status") in ("graded", "rejected") and not retry:
                outcomes.append(Outcome(sub.student, "skipped", old["points"], old["max_points"], result_path,
                                        old.get("inconclusive", []), old.get("error", "")))
                continue
        jobs.append({"lab": lab, "student": sub.student, "submission": str(sub.path), "source": str(source),
                     "fingerprint": fp, "timestamp": sub.timestamp, "sandbox": sandbox,
                     "limits": dataclasses.asdict(limits), "seed": seed, "result": str(result_path),
                     "executed": str(out / "autograded" / sub.student / lab / f"{lab}.ipynb"),
                     "workdir": str(out), "timing": timing})
    ray_started = False
    if backend == "ray" and jobs:
        from .ray_backend import connect

        ray_started = connect(ray_address)  # once, for the preflight and the class
    try:
        graded_already: dict[str, Path] = {}  # fingerprint -> a result of this run (or a cached preflight) to copy
        if preflight and jobs:
            reference = run_preflight(lab, source, results_dir.parent / "preflight" / lab, sandbox, limits, backend,
                                      ray_address, out, progress)
            if reference.get("class_fingerprint"):
                graded_already[reference["class_fingerprint"]] = Path(reference["result"])
        # Identical notebooks are graded once: a hand-in equal to the reference the preflight just graded, or to
        # another hand-in of this batch, gets a copy of that grade (noted in its result as `graded_with`).
        to_run, copies = [], []
        for job in jobs:
            if job["fingerprint"] in graded_already or any(j["fingerprint"] == job["fingerprint"] for j in to_run):
                copies.append(job)
            else:
                to_run.append(job)
        if backend == "ray":
            from .ray_backend import run_jobs_ray

            outcomes += run_jobs_ray(to_run, lab, workers, limits, progress, ray_address)
        else:
            outcomes += run_jobs(to_run, workers or 2, limits, progress)
        for job in to_run:
            graded_already.setdefault(job["fingerprint"], Path(job["result"]))
        outcomes += [copy_grade(job, graded_already[job["fingerprint"]]) for job in copies]
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    results = [_with_timing(o.result_path, subs, due) for o in outcomes]
    record(out / "gradebook.db", lab, notebook.read(source), results, due=due)
    for o, r in zip(outcomes, results):
        page = str(write_feedback(out, lab, r))
        if r.get("feedback") != page:  # where the report links each learner's row to
            r["feedback"] = page
            tmp = o.result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(r, indent=1, default=str))
            tmp.replace(o.result_path)
    return sorted(outcomes, key=lambda o: o.student)


def copy_grade(job: dict, graded: Path) -> Outcome:
    """The grade of an identical notebook, graded in this run, as this job's result (and its executed notebook)."""
    import shutil

    result = json.loads(graded.read_text())
    original = result.get("graded_with") or result["student"]
    if result.get("executed") and Path(result["executed"]).is_file():
        Path(job["executed"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["executed"], job["executed"])
    for key in ("due", "late_by_s", "time_on_task_s"):
        result.pop(key, None)
    result.update(student=job["student"], submission=job["submission"], timestamp=job["timestamp"],
                  fingerprint=job["fingerprint"], executed=job["executed"], graded_with=original)
    path = Path(job["result"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)
    return Outcome(job["student"], result["status"], result["points"], result["max_points"], path,
                   result.get("inconclusive", []), result.get("error", ""))


def _with_timing(result_path: Path, subs: list[Submission], due) -> dict:
    """The result with this run's time on task and lateness (the due date may have changed since)."""
    from .tracks import timing_of

    result = json.loads(result_path.read_text())
    sub = next((s for s in subs if s.student == result["student"]), None)
    timing = timing_of(sub.path, sub.timestamp, due) if sub else {}
    if any(result.get(k) != v for k, v in timing.items()) or (due is None and "due" in result):
        for key in ("due", "late_by_s", "time_on_task_s"):
            result.pop(key, None)
        result.update(timing)
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(result_path)
    return result


# ---------------------------------------------------------------- the preflight: the reference, graded first

PREFLIGHT_STUDENT = "preflight-reference"


def preflight_key(lab: str, source: Path, sandbox: str, limits: Limits, backend: str,
                  ray_address: str | None) -> str:
    """What a preflight's verdict depends on: the lab's source, the grader's code and thresholds, the
    runtime's code, this machine, the sandbox and the limits. Equal keys: the cached verdict stands."""
    from .catalogue import REPO_ROOT

    h = hashlib.sha256()
    h.update(source.read_bytes())
    h.update(GRADER_VERSION.encode())
    here = Path(__file__).resolve().parent
    runtime = Path(importlib_origin("inferlab")).parent
    for folder, patterns in ((here, ("**/*.py", "thresholds/*.json")), (runtime, ("**/*.py",))):
        for pattern in patterns:
            for path in sorted(folder.glob(pattern)):
                h.update(str(path.relative_to(folder)).encode())
                h.update(path.read_bytes())
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "") if Path("/proc/cpuinfo").is_file() else ""
    machine = [socket.gethostname(), platform.machine(), cpu, str(len(os.sched_getaffinity(0))), sys.version,
               sandbox, backend, ray_address or "", json.dumps(dataclasses.asdict(limits), sort_keys=True),
               str(REPO_ROOT)]
    h.update("\n".join(machine).encode())
    return h.hexdigest()


def importlib_origin(package: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(package)
    return spec.origin if spec and spec.origin else ""


def preflight_problems(result: dict) -> list[str]:
    """What kept the reference from full marks, one line per thing ([] when it got them)."""
    if result.get("status") != "graded":
        return [f"{result.get('status')}: {str(result.get('error', ''))[:600]}"]
    problems = [f"{notebook.task_of(t['cell']) or t['cell']}: {t.get('message') or 'no points'}"[:600]
                for t in result.get("tasks", []) if t["points"] < t["max_points"]]
    if not problems and result.get("points", 0) < result.get("max_points", 0):
        problems.append(f"{result.get('points')} of {result.get('max_points')} points")
    return problems


def run_preflight(lab: str, source: Path, folder: Path, sandbox: str, limits: Limits, backend: str,
                  ray_address: str | None, out: Path, progress: bool = False) -> dict:
    """Grade the lab's reference solution as a submission, here, exactly as the class will be graded.

    Raises `PreflightFailed` unless it gets full marks. An inconclusive timing counts as not full, and
    is retried once. A passing verdict is cached in `folder` for this lab source, grader code, machine,
    sandbox and limits, so a re-run into the same output folder does not grade the reference again."""
    import nbformat

    from .samples import solved

    key = preflight_key(lab, source, sandbox, limits, backend, ray_address)
    cache = folder / "preflight.json"
    if cache.is_file():
        try:
            old = json.loads(cache.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key and old.get("passed") and Path(old["result"].get("result", "")).is_file():
            return old["result"]
    folder.mkdir(parents=True, exist_ok=True)
    submission = folder / "submitted" / f"{lab}.ipynb"
    submission.parent.mkdir(exist_ok=True)
    nbformat.write(solved(lab), str(submission))
    job = {"lab": lab, "student": PREFLIGHT_STUDENT, "submission": str(submission), "source": str(source),
           "fingerprint": fingerprint(Submission(PREFLIGHT_STUDENT, submission), source), "timestamp": None, "sandbox": sandbox,
           "limits": dataclasses.asdict(limits), "seed": None, "result": str(folder / "result.json"),
           "executed": str(folder / "autograded" / f"{lab}.ipynb"), "workdir": str(out)}
    for attempt in (1, 2):
        if backend == "ray":
            from .ray_backend import run_jobs_ray

            run_jobs_ray([job], lab, 1, limits, progress, ray_address, desc=f"preflight: {lab}'s reference")
        else:
            run_jobs([job], 1, limits, progress, desc=f"preflight: {lab}'s reference")
        result = json.loads(Path(job["result"]).read_text())
        # What a hand-in identical to the reference would be fingerprinted as, and where its grade lies.
        result.update(class_fingerprint=job["fingerprint"], result=job["result"])
        problems = preflight_problems(result)
        if not problems:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "passed": True, "result": result}, indent=1, default=str))
            tmp.replace(cache)
            return result
        only_inconclusive = result.get("status") == "graded" and result.get("inconclusive") and all(
            t.get("inconclusive") for t in result.get("tasks", []) if t["points"] < t["max_points"])
        if not only_inconclusive:
            break
    cache.unlink(missing_ok=True)
    raise PreflightFailed(
        f"preflight: the reference solution of {lab} did not get full marks here ({result.get('points', 0):g} of "
        f"{result.get('max_points', 0):g}), so the class's grades would not be right; nothing was graded or "
        "written to the gradebook. What failed:\n  " + "\n  ".join(problems)
        + f"\nThe reference's result: {job['result']}. Fix the cause and run the same command again "
        "(or grade anyway with --no-preflight).")


def hard_limit_s(limits: Limits) -> float:
    """How long one grading worker may run: the notebook's own limit, plus kernel start, scoring,
    writing, and a timed task's own stage (with its wait for a core of its own)."""
    from .perf_stage import CORE_WAIT_S

    return limits.wall_s + 180 + TimedTask.max_seconds + CORE_WAIT_S


def run_jobs(jobs: list[dict], workers: int, limits: Limits, progress: bool, desc: str | None = None) -> list[Outcome]:
    """Run each job in its own `python -m grader.grade_one` process, at most `workers` at a time."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    from tqdm import tqdm

    desc = desc or (f"grading {jobs[0]['lab']}" if jobs else "grading")
    bar = tqdm(total=len(jobs), desc=desc, unit="submission", disable=not progress or not jobs)
    pending, running, done = list(jobs), {}, []
    # On top of the notebook's own limit: kernel start, scoring, writing, and a timed task's own stage.
    hard_limit = hard_limit_s(limits)
    with tempfile.TemporaryDirectory(prefix="inferlab-jobs-") as tmp:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                job_file = Path(tmp) / f"{job['student']}.json"
                job_file.write_text(json.dumps(job))
                proc = subprocess.Popen([sys.executable, "-m", "grader.grade_one", str(job_file)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                        preexec_fn=die_with_parent)
                running[proc] = (job, time.monotonic())
            time.sleep(0.2)
            for proc, (job, started) in list(running.items()):
                overdue = time.monotonic() - started > hard_limit
                if proc.poll() is None and not overdue:
                    continue
                if overdue:
                    proc.kill()
                stderr = proc.communicate()[1].decode(errors="replace")[-2000:]
                del running[proc]
                done.append(_outcome(job, proc.returncode, stderr, overdue))
                bar.update(1)
    bar.close()
    return done


def _outcome(job: dict, returncode: int, stderr: str, overdue: bool, reason: str = "") -> Outcome:
    path = Path(job["result"])
    fresh = path.is_file() and json.loads(path.read_text()).get("fingerprint") == job["fingerprint"]
    if returncode != 0 or not fresh:
        reason = reason or ("the grading worker ran past its hard time limit and was killed" if overdue else
                            f"the grading worker exited with {_exit(returncode)} before writing a result")
        path.write_text(json.dumps({"lab": job["lab"], "student": job["student"], "submission": job["submission"],
                                    "fingerprint": job["fingerprint"], "status": "grader-error",
                                    "error": f"{reason}; regrade with the same command. {stderr}".strip(),
                                    "tasks": [], "checks": [], "points": 0.0, "max_points": 0.0}, indent=1))
    result = json.loads(path.read_text())
    return Outcome(job["student"], result["status"], result["points"], result["max_points"], path,
                   result.get("inconclusive", []), result.get("error", ""))


def _exit(returncode: int) -> str:
    """'code 3', or 'signal SIGKILL (killed from outside, or by the out-of-memory killer)'."""
    import signal

    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        extra = " (killed from outside, or by the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"signal {name}{extra}"
    return f"code {returncode}"
