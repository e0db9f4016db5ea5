"""grader.verify_stage: a submission's hidden tests, run again in a clean process the learner's code cannot fool.

The notebook's own run happens in one kernel, where the learner's code runs before the hidden
tests and could replace `grade`, a check or `print` and print a passing result line. So, after
the notebook, the autograder starts a fresh sandboxed worker (`grader.perf_worker`, role
`verify`), which snapshots the grader, the runtime and the libraries they rely on before any
learner code runs. Then it replays the notebook in order: each answer cell (and any cell the
learner added after it), and each hidden test, with the seed that the notebook run drew. It
records the check results itself. Before and after each hidden test, the worker compares
every attribute with the snapshot.

A hidden test keeps its points only if it passed in the notebook *and* here. A test that
passed in the notebook but not here loses its points, with the reason. One that found the
grader tampered with is also flagged for the instructor. Verification never adds points: a
test that failed or never ran in the notebook stays at zero.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from . import notebook
from .checks import CheckResult
from .perf_stage import Worker, WorkerFailed
from .sandbox import Limits

MAX_SECONDS = 150.0


def replay_plan(executed, defining: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The lab's defining cells (locked, restored from the source: trusted, run before the
    snapshot), then (kind, grade_id, source) in notebook order: answer cells and the cells the
    learner added after them ('exec'), and hidden tests ('hidden'). Self-checks and
    demonstrations are left out."""
    trusted, plan, keep = [], [], False
    for c in executed.cells:
        if c.cell_type != "code":
            continue
        gid = notebook.grade_id(c)
        meta = c.metadata.get("nbgrader", {})
        if gid in defining:
            trusted.append(c.source)
            keep = True
        elif gid:
            keep = bool(meta.get("solution"))
            if meta.get("grade") and "grade(" in c.source:
                plan.append(("hidden", gid, c.source))
            elif keep:
                plan.append(("exec", gid, c.source))
        elif keep:
            plan.append(("exec", "", c.source))
    return trusted, plan


def verify(lab: str, executed, backend: str, limits: Limits, defining: tuple[str, ...] = ("setup",),
           workdir: Path | None = None, max_seconds: float = MAX_SECONDS, until: str | None = None) -> dict[str, dict]:
    """Replay the submission in a clean worker (up to the hidden test `until`, if given); per hidden
    test grade_id: passed, message, tampered."""
    start = time.monotonic()
    verdicts: dict[str, dict] = {}
    trusted, plan = replay_plan(executed, defining)
    if until is not None:
        plan = plan[:next((i + 1 for i, (kind, gid, _) in enumerate(plan) if kind == "hidden" and gid == until),
                          len(plan))]
    stopped = ""
    with tempfile.TemporaryDirectory(prefix="inferlab-verify-", dir=workdir) as tmp:
        worker = None
        try:
            worker = Worker(lab, "verify", trusted, backend, limits, Path(tmp) / "verify", start + max_seconds)
            worker.receive()
            for kind, gid, source in plan:
                if kind == "exec":
                    worker.send({"exec": source})
                    worker.receive()  # an answer cell that raises is the learner's business, as in the notebook
                    continue
                worker.send({"hidden": source})
                reply = worker.receive()
                results = [CheckResult(**r) for r in reply["results"]]
                if reply["tampered"]:
                    names = ", ".join(reply["tampered"][:5])
                    verdicts[gid] = {"passed": False, "tampered": names, "message": (
                        f"in a clean re-run, your code was found to replace parts of the grader or the runtime "
                        f"({names}); results from such code are not accepted")}
                elif reply["raised"] or not results or not all(r.passed for r in results):
                    first = next((r for r in results if not r.passed), None)
                    why = first.line() if first else reply["raised"] or "the hidden test reported no result"
                    verdicts[gid] = {"passed": False, "tampered": "", "message": f"in a clean re-run: {why}"[:500]}
                else:
                    verdicts[gid] = {"passed": True, "tampered": "", "message": ""}
        except TimeoutError:
            stopped = f"the clean re-run did not finish within {max_seconds:.0f} s"
        except WorkerFailed as err:
            stopped = f"the clean re-run stopped: {err}"
        finally:
            if worker is not None:
                worker.close()
    for kind, gid, _ in plan:
        if kind == "hidden" and gid not in verdicts:
            verdicts[gid] = {"passed": False, "tampered": "", "message": stopped or "not reached in the clean re-run"}
    return verdicts


def apply(lab: str, result: dict, executed, backend: str, limits: Limits, workdir: Path | None = None) -> dict:
    """Fold the clean re-run into a graded result: a hidden test keeps its points only if it passed in both."""
    import importlib

    if not any(t["passed"] for t in result["tasks"]):
        return result  # nothing to confirm: verification never adds points
    module = importlib.import_module(f"grader.labs.{lab}")
    # Replay only as far as the last hidden test that passed in the notebook: the rest scores zero anyway,
    # and replaying it could only repeat a hang or a crash.
    last = max(i for i, t in enumerate(result["tasks"]) if t["passed"])
    verdicts = verify(lab, executed, backend, limits, getattr(module, "DEFINING_CELLS", ("setup",)), workdir,
                      until=result["tasks"][last]["cell"])
    for task in result["tasks"]:
        verdict = verdicts.get(task["cell"])
        if not task["passed"] or verdict is None:
            continue
        if not verdict["passed"]:
            task.update(points=0.0, passed=False,
                        message=f"passed in the notebook but not when re-run: {verdict['message']}"[:500])
        if verdict["tampered"]:
            task["tampering"] = verdict["tampered"]
    result["points"] = sum(t["points"] for t in result["tasks"])
    result["verified"] = {gid: v["passed"] for gid, v in verdicts.items()}
    return result
