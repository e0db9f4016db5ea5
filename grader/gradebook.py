"""grader.gradebook: write scores into nbgrader's gradebook, so formgrader and `nbgrader export` work.

Only the batch driver calls this, after every worker has finished: one writer, no races.

Only grades the grader stands by are written. A `grader-error` result (the grader or its
environment failed) writes nothing: the learner's previous grade, if any, stays. A task whose
timing was inconclusive gets no score and nbgrader's `needs_manual_grade` flag, so formgrader
lists the submission as needing grading instead of showing a zero; regrading it clears the flag.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from nbgrader.api import Gradebook, MissingEntry
from nbgrader.utils import parse_utc
from sqlalchemy.exc import SAWarning

from . import notebook


def record(db_path: Path, lab: str, source, results: list[dict], due=None) -> None:
    """Write the lab's cells and every result's scores; `due` (a datetime) becomes the assignment's due
    date, from which nbgrader's formgrader and its late-submission handling compute lateness."""
    # nbgrader migrates a new database by running `alembic`, which lives next to this Python.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    with warnings.catch_warnings(), Gradebook(f"sqlite:///{db_path}") as gb:
        # nbgrader's own session use trips SQLAlchemy's autoflush warnings; they say nothing about our data.
        warnings.simplefilter("ignore", SAWarning)
        if due is not None:  # nbgrader keeps naive UTC times
            import datetime as dt

            gb.update_or_create_assignment(lab, duedate=due.astimezone(dt.timezone.utc).replace(tzinfo=None))
        else:
            gb.update_or_create_assignment(lab)
        gb.update_or_create_notebook(lab, lab)
        for c in source.cells:
            meta = c.metadata.get("nbgrader", {})
            gid = notebook.grade_id(c)
            if not gid:
                continue
            if meta.get("grade"):
                gb.update_or_create_grade_cell(gid, lab, lab, max_score=float(meta.get("points", 0)),
                                               cell_type=c.cell_type)
            if meta.get("solution"):
                gb.update_or_create_solution_cell(gid, lab, lab)
            gb.update_or_create_source_cell(gid, lab, lab, cell_type=c.cell_type, locked=bool(meta.get("locked")),
                                            source=c.source, checksum=meta.get("checksum"))
        for r in results:
            if r["status"] not in ("graded", "rejected"):
                continue  # a grader-error is no grade at all
            gb.update_or_create_student(r["student"])
            try:
                submission = gb.find_submission(lab, r["student"])
            except MissingEntry:
                submission = gb.add_submission(lab, r["student"])
            if r.get("timestamp"):  # formgrader counts a submission as autograded only if the times match
                submission.timestamp = parse_utc(r["timestamp"])
            by_cell = {t["cell"]: t["points"] for t in r.get("tasks", [])}
            unknown = {t["cell"] for t in r.get("tasks", []) if t.get("inconclusive")}
            for c in source.cells:
                meta = c.metadata.get("nbgrader", {})
                if meta.get("grade"):
                    gid = notebook.grade_id(c)
                    grade = gb.find_grade(gid, lab, lab, r["student"])
                    # nbgrader's own rule (SaveAutoGrades): no automatic score, or a human's, needs a look
                    grade.auto_score = None if gid in unknown else float(by_cell.get(gid, 0.0))
                    grade.needs_manual_grade = grade.auto_score is None or grade.manual_score is not None
        gb.db.commit()


def scores(db_path: Path, lab: str) -> dict[str, float]:
    """Total score per student, read back through nbgrader's own API."""
    with Gradebook(f"sqlite:///{db_path}") as gb:
        return {s.student.id: s.score for s in gb.find_assignment(lab).submissions}


def needing_grades(db_path: Path, lab: str) -> dict[str, list[str]]:
    """Per student, the grade cells flagged as needing a grade (an inconclusive timing, or a human's score)."""
    with Gradebook(f"sqlite:///{db_path}") as gb:
        return {s.student.id: sorted(g.name for nb in s.notebooks for g in nb.grades if g.needs_manual_grade)
                for s in gb.find_assignment(lab).submissions}
