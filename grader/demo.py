"""grader.demo: what `make demo` runs: grade a lab's bundled sample class and write the instructor report.

The samples (samples/<lab>.py) are the known kinds of learner work, each with the grade a
careful human grader would give; the demo grades them exactly as `inferlab autograde` grades a
class, writes the report and grades.csv, and prints expected against awarded points.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from . import notebook, samples
from .autograde import autograde
from .report import flags_of, write_report
from .sandbox import Limits


@dataclass
class Row:
    sample: str
    expected: dict[str, float]
    awarded: dict[str, float]
    status: str
    flags: list[str]
    expected_flagged: bool
    seconds: float

    @property
    def agrees(self) -> bool:
        return self.awarded == self.expected and bool(self.flags) == self.expected_flagged


def run_demo(out: Path, lab: str = "kv_cache", workers: int = 2, timeout_s: float = 150.0,
             sandbox: str | None = None, progress: bool = True) -> tuple[list[Row], Path, Path]:
    """Grade the bundled samples of `lab` into `out`; returns one row per sample and the report paths.

    A re-run regrades nothing that is unchanged (autograde's resume).
    """
    import json

    sandbox = sandbox or ("bwrap" if shutil.which("bwrap") else "none")
    definitions = samples.definitions(lab)
    samples.build(lab, out / "submissions")
    grading = out / "grading" / lab
    outcomes = autograde(lab, out / "submissions", grading, workers=workers, sandbox=sandbox,
                         limits=Limits(wall_s=timeout_s), progress=progress)
    page, grades = write_report(grading, out)
    rows = []
    for o in outcomes:
        result = json.loads(o.result_path.read_text())
        spec = definitions[o.student]
        awarded = {notebook.task_of(t["cell"]): t["points"] for t in result.get("tasks", [])}
        rows.append(Row(o.student, {k: float(v) for k, v in spec["expected"].items()}, awarded, result["status"],
                        flags_of(result), spec["flags"], float(result.get("seconds", 0.0))))
    return rows, page, grades


def table(rows: list[Row]) -> str:
    tasks = sorted({t for r in rows for t in r.expected})
    head = ["sample", *tasks, "points", "expected", "flagged", "seconds", "as expected"]
    body = [[r.sample, *(f"{r.awarded.get(t, 0):g}" for t in tasks), f"{sum(r.awarded.values()):g}",
             f"{sum(r.expected.values()):g}", "yes" if r.flags else "no", f"{r.seconds:.0f}",
             "yes" if r.agrees else "NO"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
