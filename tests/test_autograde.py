"""Autograde end to end on the kv_cache samples: each gets what a careful human grader would give.

One batch of every sample, graded in bubblewrap sandboxes with 2 workers, then checked from
every side: points per task, nbgrader's gradebook, feedback pages, the report, grades.csv,
anti-cheat flags, and a resumed re-run that regrades nothing.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grader import gradebook, notebook, samples
from grader.autograde import autograde
from grader.report import flags_of, write_report
from grader.sandbox import Limits

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

LAB = "kv_cache"
SAMPLES = samples.definitions(LAB)
LIMITS = Limits(wall_s=240)  # the reference needs about 100 s on one core; 'loop' uses all of it


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("autograde")
    subs = root / "submitted"
    paths = samples.build(LAB, root / "flat")
    for name, path in paths.items():  # nbgrader's layout: submitted/<student>/<lab>/<lab>.ipynb
        (subs / name / LAB).mkdir(parents=True)
        shutil.copy(path, subs / name / LAB / f"{LAB}.ipynb")
    (subs / "notjson" / LAB).mkdir(parents=True)
    (subs / "notjson" / LAB / f"{LAB}.ipynb").write_text("{ this is not a notebook")
    (subs / "empty" / LAB).mkdir(parents=True)
    (subs / "empty" / LAB / f"{LAB}.ipynb").write_text(json.dumps(
        {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    start = time.perf_counter()
    outcomes = autograde(LAB, root, root / "out", workers=2, backend="bwrap", limits=LIMITS, progress=False)
    seconds = time.perf_counter() - start
    results = {o.student: json.loads(o.result_path.read_text()) for o in outcomes}
    return root, results, seconds


def task_points(result):
    return {notebook.task_of(t["cell"]): t["points"] for t in result["tasks"]}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_gets_what_a_careful_grader_gives(graded, name):
    _, results, _ = graded
    result = results[name]
    assert result["status"] == "graded", result.get("error")
    assert task_points(result) == SAMPLES[name]["expected"], json.dumps(result["tasks"], indent=1)


def test_specific_outcomes_are_explained(graded):
    _, results, _ = graded
    assert results["loop"]["timed_out"] and "time limit" in results["loop"]["error"]
    assert results["crash"]["kernel_died"] and "kernel died" in results["crash"]["error"]
    slow_k4 = next(c for c in results["slow"]["checks"] if c["task"] == "K4")
    assert slow_k4["status"] == "failed" and slow_k4["measured"]["speedup_vs_naive"] < slow_k4["measured"]["threshold"]
    patched_k4 = next(c for c in results["timer-patch"]["checks"] if c["task"] == "K4")
    assert "tampering" in patched_k4["measured"]
    wrong_k2 = next(c for c in results["wrong"]["checks"] if c["task"] == "K2")
    assert "differs from naive_generate" in wrong_k2["message"]


def test_snoop_found_nothing_to_copy(graded):
    root, results, _ = graded
    executed = notebook.read(results["snoop"]["executed"])
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "snooped: []" in text


def test_bad_notebooks_are_rejected_with_a_reason(graded):
    _, results, _ = graded
    assert results["notjson"]["status"] == "rejected" and "not a valid Jupyter notebook" in results["notjson"]["error"]
    assert results["empty"]["status"] == "rejected" and "answer cells" in results["empty"]["error"]


def test_gradebook_holds_the_scores(graded):
    root, results, _ = graded
    scores = gradebook.scores(root / "out" / "gradebook.db", LAB)
    for name, spec in SAMPLES.items():
        assert scores[name] == pytest.approx(sum(spec["expected"].values()))


def test_feedback_pages(graded):
    root, results, _ = graded
    page = (root / "out" / "feedback" / "wrong" / LAB / f"{LAB}.html").read_text()
    assert "Score: 5 / 10" in page and "differs from naive_generate" in page
    page = (root / "out" / "feedback" / "slow" / LAB / f"{LAB}.html").read_text()
    assert "bar " in page  # measured performance next to the threshold


def test_flags_match_the_samples(graded):
    _, results, _ = graded
    for name, spec in SAMPLES.items():
        assert bool(flags_of(results[name])) == spec["flags"], (name, flags_of(results[name]))


def test_report_and_grades_csv(graded, tmp_path):
    root, results, _ = graded
    page, grades = write_report(root / "out", tmp_path)
    text = page.read_text()
    for heading in ("<h2>Scores</h2>", "<h2>Tasks</h2>", "<h2>Performance</h2>", "<h2>Failure reasons",
                    "<h2>Flagged"):
        assert heading in text
    assert text.count("data:image/png;base64") >= 3
    rows = list(csv.DictReader(grades.open()))
    assert {"Student", "ID", "SIS User ID", "SIS Login ID", "Section", LAB} <= set(rows[0])
    assert {r["Student"]: float(r[LAB]) for r in rows}["reference"] == 10


def test_rerun_skips_unchanged_submissions(graded):
    root, _, _ = graded
    start = time.perf_counter()
    outcomes = autograde(LAB, root, root / "out", workers=2, backend="bwrap", limits=LIMITS, progress=False)
    assert all(o.status == "skipped" for o in outcomes)
    assert time.perf_counter() - start < 60


def test_nbgrader_export_reads_our_gradebook(graded, tmp_path):
    root, _, _ = graded
    db = root / "out" / "gradebook.db"
    exe = str(Path(sys.executable).with_name("nbgrader"))
    res = subprocess.run([exe, "export", f"--CourseDirectory.db_url=sqlite:///{db}", f"--CourseDirectory.root={tmp_path}",
                          f"--to={tmp_path / 'grades.csv'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {r["student_id"]: r for r in csv.DictReader((tmp_path / "grades.csv").open())}
    assert float(rows["reference"]["raw_score"]) == 10 and float(rows["wrong"]["raw_score"]) == 5
