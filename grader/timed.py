"""grader.timed: how a lab declares a timed task (kept apart from grader.perf, which imports torch, so that
the grading worker of a lab without one never loads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimedTask:
    """A lab's task whose points depend on speed."""

    task: str  # the task ID, e.g. "K4"
    gate: str  # grade_id of the task's graded cell, whose check must pass first (correctness on this seed's inputs)
    cells: tuple[str, ...]  # grade_ids of the cells that define the timed code, in notebook order
    rounds: tuple[int, int] = (5, 15)  # min, max timed rounds after one warm-up round
    rel_ci: float = 0.1  # stop once the 95% interval of every median ratio is within +-10%
    max_seconds: float = 150.0  # for the whole stage, start-up included
    slack_s: float = 5.0  # no new round starts later than this before the deadline: at least one round's time
