"""grader.anticheat: flag submissions whose code tries to get around the grader.

Two sources of flags: what the learner's code *says* (a scan of their answer cells for
reaching outside their task: the file system for tests or solutions, the clock, the
grader's internals, the network, other processes) and what the checks *saw* at run time
(a replaced clock). A flag is not a verdict: the report lists them for an instructor.
"""

from __future__ import annotations

import re

from . import notebook

PATTERNS: list[tuple[str, str]] = [
    (r"solutions[/\\]|\bgradebook\b|\.ipynb\b|GRADING_SEED|hidden test", "reads tests, solutions or the gradebook"),
    (r"\b(perf_counter|perf_counter_ns|monotonic|process_time)\s*=|time\.time\s*=|setattr\(\s*time\b|"
     r"_perf_counter|monkeypatch", "replaces a timing function"),
    (r"\bgrader\.(checks|perf|execute|autograde|gradebook)|from grader\b|import grader\b",
     "touches the grader's internals"),
    (r"\bsocket\b|urllib|requests\.|http\.client", "opens network connections"),
    (r"os\.kill|\bsignal\.|subprocess|os\.fork|os\.system|ctypes", "controls processes or memory directly"),
    (r"os\.environ|getenv", "reads environment variables"),
    (r"\bbuiltins\b|__builtins__|sys\.modules|_getframe|\bf_locals\b|\bgc\.get_objects|__closure__",
     "reaches into the interpreter (built-ins, loaded modules, stack frames)"),
    (r"(?m)^\s*(class|def)\s+(checks|self_check|grade)\b|^\s*(checks|self_check|grade)\s*=",
     "redefines the notebook's checks"),
]


def learner_code(nb) -> str:
    """The code a learner wrote: answer cells and cells they added (everything else is restored from the source)."""
    parts = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        meta = c.metadata.get("nbgrader", {})
        if meta.get("solution") or not notebook.grade_id(c):
            parts.append(c.source)
    return "\n".join(parts)


def scan(nb) -> list[str]:
    code = learner_code(nb)
    return [reason for pattern, reason in PATTERNS if re.search(pattern, code)]


def runtime_flags(result: dict) -> list[str]:
    flags = []
    for check in result.get("checks", []):
        if check.get("measured", {}).get("tampering"):
            flags.append(f"{check['task']}: timing functions replaced at run time ({check['measured']['tampering']})")
        if check.get("measured", {}).get("differs_when_timed"):  # right when checked, wrong when timed
            flags.append(f"{check['task']}: returned other tokens while timed than when checked")
    if result.get("tampered"):
        flags.append("the grader or runtime replaced at run time in the answers' process "
                     f"({', '.join(result['tampered'][:5])})")
    for task in result.get("tasks", []):
        if task.get("message", "").startswith("passed in the notebook but not when re-run") and not task.get("tampering"):
            flags.append(f"{task['cell']}: passed in the notebook, not in a clean re-run of the same code")
        if task.get("tampering"):
            flags.append(f"{task['cell']}: the grader or runtime replaced at run time ({task['tampering']})")
    return flags


def flags(result: dict, submitted) -> list[str]:
    """Every flag of a graded submission, computed once when it is graded and kept in its result: what the
    checks saw at run time, then what the learner's code says."""
    return runtime_flags(result) + [f"code {reason}" for reason in scan(submitted)]
