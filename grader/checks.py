"""grader.checks: what a check returns, and the notebook's `self_check`.

A lab's checks (`grader/labs/<lab>/public.py`) are plain functions, one per task: each takes
the learner's code and the inputs to try, raises `CheckFailed` with an actionable message
when the code is wrong, and returns the numbers it measured. The same logic runs in two places:

* `self_check(...)` in the learner's notebook, on fixed public inputs. It never raises,
  so running the whole notebook never stops at a check: it prints what passed, what
  failed with the message, and which tasks are not attempted yet.
* the lab's hidden checks (`grading.py`), in the grader's own process on inputs drawn at
  grading time, against the learner's code running in a sandbox (`grader.check_stage`).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PASSED, FAILED, NOT_ATTEMPTED, ERROR, INCONCLUSIVE = "passed", "failed", "not attempted", "error", "inconclusive"
# What an inconclusive task tells the learner: its grade is not known yet, and how it will be.
RETRY_HINT = "not graded yet: your instructor regrades it (inferlab autograde LAB --retry-inconclusive)"
SKIPPED = "skipped"  # a self-check under the autograder, which checks that task in its own process


class CheckFailed(AssertionError):
    """The learner's code ran but is wrong; `message` says what to do next, `measured` keeps the numbers."""

    def __init__(self, message: str, **measured: Any):
        super().__init__(message)
        self.message = message
        self.measured = measured


class TooNoisy(CheckFailed):
    """A timing whose interval straddles the bar: neither a pass nor a fail, so the check says so (inconclusive)."""


@dataclass
class CheckResult:
    task: str  # the task ID, e.g. "K1": the same ID as in the stub's NotImplementedError and the report
    status: str  # passed | failed | not attempted | error
    message: str = ""  # the first actionable failure message; empty when passed
    measured: dict[str, Any] = field(default_factory=dict)  # numbers for feedback and reports
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=float)

    def line(self) -> str:
        head = {PASSED: "passed", FAILED: "FAILED", NOT_ATTEMPTED: "not attempted", ERROR: "ERROR",
                INCONCLUSIVE: "INCONCLUSIVE", SKIPPED: "skipped"}.get(self.status, self.status)
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in self.measured.items())
        text = f"[{self.task}] {head}"
        if self.message:
            text += f": {self.message}"
        if numbers:
            text += f" ({numbers})"
        return text


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_check(task: str, check: Callable[..., dict[str, Any] | None], *args: Any, **kwargs: Any) -> CheckResult:
    """Run one check and classify the outcome; never raises for anything the learner's code does."""
    start = time.perf_counter()
    try:
        measured = check(*args, **kwargs) or {}
        result = CheckResult(task, PASSED, measured=dict(measured))
    except NotImplementedError as err:
        said = str(err)
        result = CheckResult(task, NOT_ATTEMPTED, (
            f"{said}; once it is done, run its cell, then this check again" if "Task " in said else
            f"task {task} is not implemented yet: replace its `raise NotImplementedError` with your code, "
            "run that cell, then run this check again"))
    except TooNoisy as err:
        result = CheckResult(task, INCONCLUSIVE, err.message, dict(err.measured))
    except CheckFailed as err:
        result = CheckResult(task, FAILED, err.message, dict(err.measured))
    except Exception as err:  # the learner's code crashed inside the check
        result = CheckResult(task, ERROR, f"your code raised {type(err).__name__}: {err}" + _where(err))
    result.seconds = time.perf_counter() - start
    return result


def _where(err: BaseException) -> str:
    """' (at cell line N: code)' for the innermost frame that is not grader or library code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/grader/" not in f.filename and "site-packages" not in f.filename
              and "/inferlab/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at line {f.lineno}: {f.line.strip()})" if f.line else f" (at line {f.lineno})"


def self_check(task: str, check: Callable[..., dict[str, Any] | None], *args: Any, **kwargs: Any) -> CheckResult:
    """For notebooks: run a check on public inputs, print one line, never stop the notebook.

    Under the autograder, a lab on the platform (whose checks live in `grader.labs.<lab>.public`) is
    checked in the grader's own process, so its self-checks are skipped: nothing grades them."""
    import os

    if os.environ.get("INFERLAB_AUTOGRADE") and (getattr(check, "__module__", "") or "").endswith(".public"):
        result = CheckResult(task, SKIPPED, "not run under the autograder, which checks this task in its own "
                                            "process on inputs drawn at grading time")
        print(result.line())
        return result
    result = run_check(task, check, *args, **kwargs)
    print(result.line())
    _remember(task, check, result)
    return result


def _remember(task: str, check: Callable[..., Any], result: CheckResult) -> None:
    """Note the outcome for `inferlab track status` (not under the autograder, where nobody reads it)."""
    import os

    module = getattr(check, "__module__", "") or ""
    if os.environ.get("INFERLAB_AUTOGRADE") or not module.startswith("grader.labs."):
        return
    from .tracks import record_check

    record_check(module.split(".")[2], task, result.status)  # grader.labs.<lab>[.public]
