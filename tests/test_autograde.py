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
from grader.demo import run_demo, table
from grader.report import flags_of, write_report
from grader.sandbox import Limits

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

LAB = "kv_cache"
SAMPLES = samples.definitions(LAB)
LIMITS = Limits(wall_s=150)  # the reference needs about 60 s on one core; 'loop' uses all of it


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The sample class, graded the way `make demo` grades it (flat layout, 2 workers, bubblewrap)."""
    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    rows, page, grades = run_demo(root, LAB, workers=2, timeout_s=LIMITS.wall_s, sandbox="bwrap", progress=False)
    seconds = time.perf_counter() - start
    results = {p.stem: json.loads(p.read_text()) for p in (root / "grading" / LAB / "results").glob("*.json")}
    return root / "grading" / LAB, results, seconds, rows


@pytest.fixture(scope="module")
def nbgrader_layout(tmp_path_factory):
    """nbgrader's submitted/<student>/<lab>/<lab>.ipynb, with an untouched release and two unusable files."""
    root = tmp_path_factory.mktemp("submitted")
    subs = root / "submitted"
    stub = samples.build(LAB, root / "flat", ["stub"])["stub"]
    (subs / "stub" / LAB).mkdir(parents=True)
    shutil.copy(stub, subs / "stub" / LAB / f"{LAB}.ipynb")
    (subs / "notjson" / LAB).mkdir(parents=True)
    (subs / "notjson" / LAB / f"{LAB}.ipynb").write_text("{ this is not a notebook")
    (subs / "empty" / LAB).mkdir(parents=True)
    (subs / "empty" / LAB / f"{LAB}.ipynb").write_text(json.dumps(
        {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    outcomes = autograde(LAB, root, root / "out", workers=2, sandbox="bwrap", limits=LIMITS, progress=False)
    return root, {o.student: json.loads(o.result_path.read_text()) for o in outcomes}


def task_points(result):
    return {notebook.task_of(t["cell"]): t["points"] for t in result["tasks"]}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_gets_what_a_careful_grader_gives(graded, name):
    _, results, _, _ = graded
    result = results[name]
    assert result["status"] == "graded", result.get("error")
    assert task_points(result) == SAMPLES[name]["expected"], json.dumps(result["tasks"], indent=1)


def test_specific_outcomes_are_explained(graded):
    _, results, _, _ = graded
    assert results["loop"]["timed_out"] and "time limit" in results["loop"]["error"]
    assert results["crash"]["kernel_died"] and "kernel died" in results["crash"]["error"]
    slow_k4 = next(c for c in results["slow"]["checks"] if c["task"] == "K4")
    assert slow_k4["status"] == "failed" and slow_k4["measured"]["speedup_vs_naive"] < slow_k4["measured"]["threshold"]
    patched_k4 = next(c for c in results["timer-patch"]["checks"] if c["task"] == "K4")
    assert "tampering" in patched_k4["measured"]
    wrong_k2 = next(c for c in results["wrong"]["checks"] if c["task"] == "K2")
    assert "differs from naive_generate" in wrong_k2["message"]


def test_snoop_found_nothing_to_copy(graded):
    out, results, _, _ = graded
    executed = notebook.read(results["snoop"]["executed"])
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "snooped: []" in text


def test_bad_notebooks_are_rejected_with_a_reason(nbgrader_layout):
    _, results = nbgrader_layout
    assert results["stub"]["status"] == "graded" and results["stub"]["points"] == 0
    assert results["notjson"]["status"] == "rejected" and "not a valid Jupyter notebook" in results["notjson"]["error"]
    assert results["empty"]["status"] == "rejected" and "answer cells" in results["empty"]["error"]


def test_gradebook_holds_the_scores(graded):
    out, results, _, _ = graded
    scores = gradebook.scores(out / "gradebook.db", LAB)
    for name, spec in SAMPLES.items():
        assert scores[name] == pytest.approx(sum(spec["expected"].values()))


def test_feedback_pages(graded):
    out, results, _, _ = graded
    page = (out / "feedback" / "wrong" / LAB / f"{LAB}.html").read_text()
    assert "Score: 5 / 10" in page and "differs from naive_generate" in page
    page = (out / "feedback" / "slow" / LAB / f"{LAB}.html").read_text()
    assert "bar " in page  # measured performance next to the threshold


def test_flags_match_the_samples(graded):
    _, results, _, _ = graded
    for name, spec in SAMPLES.items():
        assert bool(flags_of(results[name])) == spec["flags"], (name, flags_of(results[name]))


def test_report_and_grades_csv(graded, tmp_path):
    out, results, _, _ = graded
    page, grades = write_report(out, tmp_path)
    text = page.read_text()
    for heading in ("<h2>Scores</h2>", "<h2>Tasks</h2>", "<h2>Performance</h2>", "<h2>Failure reasons",
                    "<h2>Flagged"):
        assert heading in text
    assert text.count("data:image/png;base64") >= 3
    rows = list(csv.DictReader(grades.open()))
    assert {"Student", "ID", "SIS User ID", "SIS Login ID", "Section", LAB} <= set(rows[0])
    assert {r["Student"]: float(r[LAB]) for r in rows}["reference"] == 10


def test_rerun_skips_unchanged_submissions(nbgrader_layout):
    root, _ = nbgrader_layout
    start = time.perf_counter()
    outcomes = autograde(LAB, root, root / "out", workers=2, sandbox="bwrap", limits=LIMITS, progress=False)
    assert outcomes and all(o.status == "skipped" for o in outcomes)
    assert time.perf_counter() - start < 60


def test_nbgrader_export_reads_our_gradebook(graded, tmp_path):
    out, _, _, _ = graded
    exe = str(Path(sys.executable).with_name("nbgrader"))
    res = subprocess.run([exe, "export", f"--CourseDirectory.db_url=sqlite:///{out / 'gradebook.db'}",
                          f"--CourseDirectory.root={tmp_path}", f"--to={tmp_path / 'grades.csv'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {r["student_id"]: r for r in csv.DictReader((tmp_path / "grades.csv").open())}
    assert float(rows["reference"]["raw_score"]) == 10 and float(rows["wrong"]["raw_score"]) == 5


def test_timed_task_ran_outside_the_notebook(graded):
    """K4's verdict comes from the separate-process stage: the reference timed in the same run."""
    out, results, _, _ = graded
    k4 = next(c for c in results["reference"]["checks"] if c["task"] == "K4")
    assert k4["status"] == "passed" and k4["measured"]["reference_speedup_vs_naive"] > k4["measured"]["threshold"]
    executed = notebook.read(results["slow"]["executed"])
    shown = "".join(o.get("text", "") for o in notebook.cell(executed, "k4-hidden").outputs)
    assert "[grader] K4 timed in separate processes" in shown and "FAILED" in shown


def test_demo_table_and_command(graded):
    """`inferlab demo --lab kv_cache` on the graded class: regrades nothing, prints the table, exits 0."""
    out, _, _, rows = graded
    assert all(r.agrees for r in rows), table(rows)
    demo_root = out.parent.parent
    exe = str(Path(sys.executable).with_name("inferlab"))
    res = subprocess.run([exe, "demo", "--lab", LAB, "--out", str(demo_root), "--timeout", str(LIMITS.wall_s)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in SAMPLES:
        assert f"\n{name} " in res.stdout
    assert "NO" not in res.stdout.split() and f"wrote {demo_root / 'report.html'}" in res.stdout
    assert (demo_root / "grades.csv").is_file()


def test_cli_with_relative_paths(nbgrader_layout):
    """`--out` and `--submissions` relative to the working directory (as `make demo` passes them)."""
    root, _ = nbgrader_layout
    (root / "one" / "stub" / LAB).mkdir(parents=True)
    shutil.copy(root / "submitted" / "stub" / LAB / f"{LAB}.ipynb", root / "one" / "stub" / LAB / f"{LAB}.ipynb")
    exe = str(Path(sys.executable).with_name("inferlab"))
    res = subprocess.run([exe, "autograde", LAB, "--submissions", "one", "--out", "relative-out", "--timeout", "120"],
                         cwd=root, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((root / "relative-out" / LAB / "results" / "stub.json").read_text())
    assert result["status"] == "graded" and len(result["tasks"]) == 4 and not result["error"], result
