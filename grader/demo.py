"""grader.demo: what `make demo` runs: grade a lab's bundled sample class and write the instructor report.

The samples (grader/labs/<lab>/samples.py) are the known kinds of learner work, each with the grade a
careful human grader would give; the demo grades them exactly as `inferlab autograde` grades a
class (the reference first, as the preflight), writes the report and grades.csv, and prints
expected against awarded points. A submission left with an inconclusive timing is regraded once
before the table is printed; one still inconclusive then is shown as such, not as a grade.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import notebook, samples
from .autograde import autograde
from .report import flags_of, write_report
from .sandbox import Limits


def agrees(awarded: dict[str, float], expected: dict[str, float], inconclusive: list[str], flagged: bool,
           expected_flagged: bool) -> bool:
    """Awarded points equal the expected ones on every task with a verdict, and the flags match."""
    known = lambda points: {t: p for t, p in points.items() if t not in inconclusive}  # noqa: E731
    return known(awarded) == known(expected) and flagged == expected_flagged


@dataclass
class Row:
    sample: str
    expected: dict[str, float]
    awarded: dict[str, float]
    status: str
    flags: list[str]
    expected_flagged: bool
    seconds: float
    inconclusive: list[str] = field(default_factory=list)  # tasks not graded yet, even after one regrade

    @property
    def agrees(self) -> bool:
        return agrees(self.awarded, self.expected, self.inconclusive, bool(self.flags), self.expected_flagged)


def grade_class(lab: str, submissions: Path, out: Path, **kw) -> list:
    """autograde, then once more for the submissions left with an inconclusive timing (a busy moment
    passes; a machine that stays too busy leaves them inconclusive, and the table says so)."""
    outcomes = autograde(lab, submissions, out, **kw)
    if any(o.inconclusive for o in outcomes):
        again = {o.student: o for o in autograde(lab, submissions, out, **kw, retry_inconclusive=True)}
        outcomes = [again.get(o.student, o) for o in outcomes]
    return outcomes


def run_demo(out: Path, lab: str = "kv_cache", workers: int = 2, timeout_s: float = 150.0,
             sandbox: str | None = None, progress: bool = True, preflight: bool = True) -> tuple[list[Row], Path, Path]:
    """Grade the bundled samples of `lab` into `out`; returns one row per sample and the report paths.

    A re-run regrades nothing that is unchanged (autograde's resume).
    """
    import json

    sandbox = sandbox or ("bwrap" if shutil.which("bwrap") else "none")
    definitions = samples.definitions(lab)
    samples.build(lab, out / "submissions")
    grading = out / "grading" / lab
    outcomes = grade_class(lab, out / "submissions", grading, workers=workers, sandbox=sandbox,
                           limits=Limits(wall_s=timeout_s), progress=progress, preflight=preflight)
    page, grades = write_report(grading, out)
    rows = []
    for o in outcomes:
        result = json.loads(o.result_path.read_text())
        spec = definitions[o.student]
        awarded = {notebook.task_of(t["cell"]): t["points"] for t in result.get("tasks", [])}
        rows.append(Row(o.student, {k: float(v) for k, v in spec["expected"].items()}, awarded, result["status"],
                        flags_of(result), spec["flags"], float(result.get("seconds", 0.0)),
                        list(result.get("inconclusive", []))))
    return rows, page, grades


def table(rows: list[Row]) -> str:
    tasks = sorted({t for r in rows for t in r.expected})
    head = ["sample", *tasks, "points", "expected", "flagged", "seconds", "as expected"]
    body = [[r.sample, *("?" if t in r.inconclusive else f"{r.awarded.get(t, 0):g}" for t in tasks),
             f"{sum(r.awarded.values()):g}", f"{sum(r.expected.values()):g}", "yes" if r.flags else "no",
             f"{r.seconds:.0f}", ("NO" if not r.agrees else f"inconclusive ({', '.join(r.inconclusive)})"
                                  if r.inconclusive else "yes")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---------------------------------------------------------------- a whole track's sample class

@dataclass
class Hand:
    """One learner's hand-in of one lab in the track demo."""
    learner: str
    lab: str
    sample: str
    expected: dict[str, float]
    awarded: dict[str, float]
    status: str
    flags: list[str]
    expected_flagged: bool
    late_by_s: float | None
    time_on_task_s: float | None
    inconclusive: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return agrees(self.awarded, self.expected, self.inconclusive, bool(self.flags), self.expected_flagged)


def class_definition(track: str) -> dict:
    """samples/<track>_class.py: the simulated class (start time, and per learner per lab what they did)."""
    import importlib.util
    import sys

    from .catalogue import REPO_ROOT

    path = REPO_ROOT / "samples" / f"{track}_class.py"
    if not path.is_file():
        raise FileNotFoundError(f"track {track!r} has no sample class at {path}")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location(f"samples_{track}_class", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"start": module.START, "learners": module.LEARNERS}


def write_course(out: Path, track: str, definition: dict | None = None) -> tuple[Path, dict[str, dict[str, str]]]:
    """An nbgrader course under out/course with the class's hand-ins, timestamps and progress files;
    returns the course and, per lab, which sample each learner handed in."""
    import datetime as dt
    import json

    from . import tracks

    definition = definition or class_definition(track)
    course = out / "course"
    course.mkdir(parents=True, exist_ok=True)
    (course / "nbgrader_config.py").write_text('c = get_config()  # noqa: F821\nc.CourseDirectory.course_id = '
                                               f'"inferlab-demo-{track}"\n')
    start = tracks.parse_time(definition["start"])
    record = course / tracks.COURSE_FILE
    if tracks.started(record) != (tracks.get_track(track), start):
        tracks.start(track, start, course, restart=record.exists(), course=True)
    handed: dict[str, dict[str, str]] = {}
    built: dict[str, dict[str, Path]] = {}
    for learner, labs in definition["learners"].items():
        for lab, spec in labs.items():
            if lab not in built:
                built[lab] = samples.build(lab, out / "samples" / lab)
            folder = course / "submitted" / learner / lab
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{lab}.ipynb"
            if not target.is_file() or target.read_bytes() != built[lab][spec["sample"]].read_bytes():
                shutil.copy(built[lab][spec["sample"]], target)  # unchanged files keep autograde's resume
            opened = start + dt.timedelta(minutes=spec["opened"])
            submitted = opened + dt.timedelta(minutes=spec["minutes"])
            (folder / "timestamp.txt").write_text(submitted.strftime("%Y-%m-%d %H:%M:%S.%f UTC"))
            (folder / tracks.PROGRESS_FILE).write_text(json.dumps({"lab": lab, "opened": opened.isoformat()}) + "\n")
            handed.setdefault(lab, {})[learner] = spec["sample"]
    return course, handed


def run_track_demo(out: Path, track: str = "quick", workers: int = 2, timeout_s: float = 150.0,
                   sandbox: str | None = None, progress: bool = True,
                   definition: dict | None = None, preflight: bool = True) -> tuple[list[Hand], Path, Path]:
    """Grade a track's bundled sample class, lab by lab, as `inferlab autograde --course` grades a class;
    write each lab's report and the track's report. A re-run regrades nothing that is unchanged."""
    import json

    from . import tracks
    from .report import write_track_report

    sandbox = sandbox or ("bwrap" if shutil.which("bwrap") else "none")
    out = Path(out).resolve()
    course, handed = write_course(out, track, definition)
    hands = []
    for entry in tracks.get_track(track).labs:
        if entry.lab not in handed:
            continue
        definitions = samples.definitions(entry.lab)
        results_dir = course / "autograde-results" / entry.lab
        outcomes = grade_class(entry.lab, course / "submitted", course, workers=workers, sandbox=sandbox,
                               limits=Limits(wall_s=timeout_s), progress=progress, results_dir=results_dir,
                               due=tracks.due_date(course, entry.lab), preflight=preflight)
        write_report(results_dir, out / "reports" / entry.lab)
        for o in outcomes:
            result = json.loads(o.result_path.read_text())
            spec = definitions[handed[entry.lab][o.student]]
            awarded = {notebook.task_of(t["cell"]): t["points"] for t in result.get("tasks", [])}
            hands.append(Hand(o.student, entry.lab, handed[entry.lab][o.student],
                              {k: float(v) for k, v in spec["expected"].items()}, awarded, result["status"],
                              flags_of(result), spec["flags"], result.get("late_by_s"), result.get("time_on_task_s"),
                              list(result.get("inconclusive", []))))
    grading_root = out / "grading"
    grading_root.mkdir(exist_ok=True)
    for lab in handed:  # the track report reads <root>/<lab>/results
        link = grading_root / lab / "results"
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            link.symlink_to(course / "autograde-results" / lab)
    page, grades = write_track_report(grading_root, track, out)
    return hands, page, grades


def track_table(hands: list[Hand]) -> str:
    """Learners down, labs across: awarded/expected points, with late and flagged marks."""
    labs = list(dict.fromkeys(h.lab for h in hands))
    learners = sorted({h.learner for h in hands})
    by = {(h.learner, h.lab): h for h in hands}

    def cell(h: Hand | None) -> str:
        if h is None:
            return "-"
        text = f"{sum(h.awarded.values()):g}/{sum(h.expected.values()):g} {h.sample}"
        if h.flags:
            text += " flagged"
        if h.late_by_s:
            text += f" late {h.late_by_s / 60:.0f}m"
        if h.inconclusive:
            text += f" ({', '.join(h.inconclusive)} inconclusive)"
        return text + ("" if h.agrees else " NOT AS EXPECTED")

    head = ["learner", *labs]
    body = [[name, *(cell(by.get((name, lab))) for lab in labs)] for name in learners]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
