"""grader.grade_one: grade one submission in its own process (`python -m grader.grade_one JOB.json`).

The batch driver (`grader.autograde`) starts one of these per submission, so a crash,
a hang or an out-of-memory kill while grading one submission fails that submission only.
It writes the executed notebook and a result JSON; it never touches the gradebook.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import traceback
from pathlib import Path

import nbformat

from . import anticheat, check_stage, labs, notebook, perf_stage
from .execute import SubmissionError, execute, grader_fault, load_submission, prepare
from .sandbox import Limits


def grade_one(job: dict) -> dict:
    lab, student = job["lab"], job["student"]
    source = notebook.read(job["source"])
    result = {"lab": lab, "student": student, "submission": job["submission"], "fingerprint": job["fingerprint"],
              "timestamp": job.get("timestamp"), "status": "graded", "error": "", "tasks": [], "checks": [],
              "points": 0.0, "max_points": sum(float(c.metadata["nbgrader"].get("points", 0)) for c in source.cells
                                              if c.metadata.get("nbgrader", {}).get("grade"))}
    start = time.perf_counter()
    try:
        submitted = load_submission(Path(job["submission"]), lab, source)
    except SubmissionError as err:
        result.update(status="rejected", error=str(err))
        return result
    nb = prepare(source, submitted)
    run = execute(nb, job["sandbox"], Limits(**job["limits"]), Path(job["workdir"]))
    result.update(timed_out=run.timed_out, kernel_died=run.kernel_died, output_truncated=run.output_truncated,
                  error=run.error, kernel_log=run.kernel_log if run.error else "")
    fault = grader_fault(run)  # the grader's own environment failed (say, the sandbox cannot import it): no score
    if fault:
        result.update(status="grader-error", error=f"{fault}; regrade with the same command once it is fixed")
        return result
    # The lab's tasks, checked in this process against the answers running in a sandboxed one
    # (grader.check_stage): no verdict depends on a process that ran learner code.
    lab_package = labs.load(lab)
    task_seeds = draw_seeds([t.id for t in lab_package.spec.tasks], job.get("seed"))
    try:
        check_stage.apply(lab_package, result, run.notebook, job["sandbox"], Limits(**job["limits"]), task_seeds,
                          Path(job["workdir"]))
    except check_stage.GraderFault as err:
        result.update(status="grader-error", error=f"{err}; regrade with the same command", points=0.0)
        return result
    seeds = result["seeds"]
    spec = lab_package.spec.timed
    # A timed task is measured after the notebook, in separate processes (see grader.perf_stage).
    if spec is not None:
        seed = seeds.get(spec.gate, secrets.randbelow(2**31))
        perf_stage.apply(lab, result, run.notebook, source, job["sandbox"], Limits(**job["limits"]), seed,
                         Path(job["workdir"]), timing=job.get("timing", True))
    result["flags"] = anticheat.flags(result, submitted)  # once, here: the report reads results only
    executed_path = Path(job["executed"])
    executed_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(run.notebook, str(executed_path))
    result.update(seconds=round(time.perf_counter() - start, 2), executed=str(executed_path))
    return result


def draw_seeds(task_ids: list[str], seed: int | None) -> dict[str, int]:
    """One grading seed per task: drawn now, or derived from `seed` (to regrade exactly, or in tests)."""
    if seed is None:
        return {t: secrets.randbelow(2**31) for t in task_ids}
    return {t: (seed + i) % 2**31 for i, t in enumerate(task_ids)}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = grade_one(job)
    except Exception:  # a grader bug must still produce a result, with the traceback, for the instructor
        result = {"lab": job["lab"], "student": job["student"], "submission": job["submission"],
                  "fingerprint": job["fingerprint"], "status": "grader-error", "error": traceback.format_exc()[-2000:],
                  "tasks": [], "checks": [], "points": 0.0, "max_points": 0.0}
    out = Path(job["result"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out)  # atomic: a killed worker leaves no half-written result
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
