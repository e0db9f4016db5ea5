"""grader.autograde: grade a whole class, in parallel, resumably, into nbgrader's gradebook.

    autograde("kv_cache", Path("submissions"), Path("grading-output"), workers=2, backend="bwrap")

The path of one submission: discover (`submissions.py`) -> a worker process
(`grade_one.py`: prepare, sandboxed execute, score) -> a result JSON per learner -> the
gradebook, written by this driver only -> feedback HTML (`feedback.py`). A result whose
fingerprint (submission bytes, lab source, grader version) is unchanged is not regraded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import notebook
from .catalogue import REPO_ROOT
from .perf import TimedTask
from .sandbox import Limits
from .submissions import Submission, discover

GRADER_VERSION = "1"  # bump when grading changes meaning, so every submission is regraded


@dataclass
class Outcome:
    student: str
    status: str  # graded | rejected | grader-error | skipped (unchanged since the last run)
    points: float
    max_points: float
    result_path: Path


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


def autograde(lab: str, submissions_dir: Path, out: Path, workers: int = 2, backend: str = "bwrap",
              limits: Limits = Limits(), seed: int | None = None, progress: bool = True,
              force: bool = False, results_dir: Path | None = None) -> list[Outcome]:
    """Grade every submission of `lab` under `submissions_dir`; write results, gradebook and feedback to `out`.

    Under `out`: `autograded/<student>/<lab>/<lab>.ipynb` and `feedback/<student>/<lab>/<lab>.html`
    (nbgrader's own layout, so `out` may be an nbgrader course root: formgrader then lists the
    submissions as autograded and `nbgrader release_feedback` hands the pages out),
    `gradebook.db`, and one result JSON per student
    in `results_dir` (default `out/results`).
    """
    from .feedback import write_feedback
    from .gradebook import record

    # Absolute paths: the sandboxed kernel starts in its own working directory, where relative ones break.
    out, submissions_dir = Path(out).resolve(), Path(submissions_dir).resolve()
    source = source_path(lab)
    subs = discover(lab, submissions_dir)
    if not limits.threads:  # share the cores: oversubscribed OpenMP threads slow everyone down many times over
        limits = dataclasses.replace(limits, threads=max(1, (os.cpu_count() or 1) // workers))
    results_dir = Path(results_dir).resolve() if results_dir else out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    jobs, outcomes = [], []
    for sub in subs:
        result_path = results_dir / f"{sub.student}.json"
        fp = fingerprint(sub, source)
        if not force and result_path.is_file():
            old = json.loads(result_path.read_text())
            if old.get("fingerprint") == fp and old.get("status") in ("graded", "rejected"):
                outcomes.append(Outcome(sub.student, "skipped", old["points"], old["max_points"], result_path))
                continue
        jobs.append({"lab": lab, "student": sub.student, "submission": str(sub.path), "source": str(source),
                     "fingerprint": fp, "timestamp": sub.timestamp, "backend": backend,
                     "limits": dataclasses.asdict(limits), "seed": seed, "result": str(result_path),
                     "executed": str(out / "autograded" / sub.student / lab / f"{lab}.ipynb"),
                     "workdir": str(out)})
    outcomes += run_jobs(jobs, workers, limits, progress)
    results = [json.loads(o.result_path.read_text()) for o in outcomes]
    record(out / "gradebook.db", lab, notebook.read(source), results)
    for r in results:
        write_feedback(out, lab, r)
    return sorted(outcomes, key=lambda o: o.student)


def run_jobs(jobs: list[dict], workers: int, limits: Limits, progress: bool) -> list[Outcome]:
    """Run each job in its own `python -m grader.grade_one` process, at most `workers` at a time."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="grading", unit="submission", disable=not progress or not jobs)
    pending, running, done = list(jobs), {}, []
    # On top of the notebook's own limit: kernel start, scoring, writing, and a timed task's own stage.
    hard_limit = limits.wall_s + 180 + TimedTask.max_seconds
    with tempfile.TemporaryDirectory(prefix="inferlab-jobs-") as tmp:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                job_file = Path(tmp) / f"{job['student']}.json"
                job_file.write_text(json.dumps(job))
                proc = subprocess.Popen([sys.executable, "-m", "grader.grade_one", str(job_file)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
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


def _outcome(job: dict, returncode: int, stderr: str, overdue: bool) -> Outcome:
    path = Path(job["result"])
    fresh = path.is_file() and json.loads(path.read_text()).get("fingerprint") == job["fingerprint"]
    if returncode != 0 or not fresh:
        reason = ("the grading worker ran past its hard time limit and was killed" if overdue else
                  f"the grading worker exited with code {returncode} before writing a result")
        path.write_text(json.dumps({"lab": job["lab"], "student": job["student"], "submission": job["submission"],
                                    "fingerprint": job["fingerprint"], "status": "grader-error",
                                    "error": f"{reason}; regrade with the same command. {stderr}".strip(),
                                    "tasks": [], "checks": [], "points": 0.0, "max_points": 0.0}, indent=1))
    result = json.loads(path.read_text())
    return Outcome(job["student"], result["status"], result["points"], result["max_points"], path)
