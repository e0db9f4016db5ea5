"""A whole class: every submission graded in its sandbox, none lost, faults explained, and a re-run
that regrades nothing.

The roi lab's samples (grader/labs/roi/samples.py: reference, stub, wrong, partial, mix) handed in by the class
in nbgrader's layout, plus six faulty hand-ins (three notebooks cut off mid-upload, two learners
with no notebook, one who handed in their kv_cache notebook). `make test` grades a class of 16
(INFERLAB_CLASS_SIZE); `make bench-class` grades the class of 200 with the same test, which is too
long for CI at eleven labs (about 14 minutes on 2 cores). The kv_cache lab's faults (a killed worker,
a full disk) are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from grader import gradebook, notebook, samples
from grader.autograde import autograde
from grader.catalogue import REPO_ROOT
from grader.sandbox import Limits

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")]

LAB = "roi"
CLASS_SIZE = int(os.environ.get("INFERLAB_CLASS_SIZE", "16"))  # 200 in `make bench-class`
SAMPLES = samples.definitions(LAB)
CUT_OFF, NO_NOTEBOOK, OTHER_LAB = ("cut-003", "cut-077", "cut-151"), ("none-042", "none-133"), ("other-099",)


def learner(i: int) -> str:
    return f"learner-{i:03d}"


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("class200")
    flat = samples.build(LAB, root / "flat")
    subs = root / "submitted"
    kinds = {}
    faulty = set(CUT_OFF) | set(NO_NOTEBOOK) | set(OTHER_LAB)
    for i in range(CLASS_SIZE - len(faulty)):
        kind = list(flat)[i % len(flat)]
        folder = subs / learner(i) / LAB
        folder.mkdir(parents=True)
        shutil.copy(flat[kind], folder / f"{LAB}.ipynb")
        (folder / "timestamp.txt").write_text(f"2026-11-23 15:{i % 60:02d}:00.000000 UTC")
        kinds[learner(i)] = kind
    for name in faulty:
        (subs / name / LAB).mkdir(parents=True)
    for name in CUT_OFF:
        text = flat["reference"].read_text()
        (subs / name / LAB / f"{LAB}.ipynb").write_text(text[: len(text) // 2])
    for name in OTHER_LAB:
        shutil.copy(REPO_ROOT / "labs/kv_cache/kv_cache.ipynb", subs / name / LAB / f"{LAB}.ipynb")
    out = root / "out"
    start = time.perf_counter()
    outcomes = autograde(LAB, root, out, workers=2, sandbox="bwrap", limits=Limits(wall_s=120), progress=False)
    first_s = time.perf_counter() - start
    mtimes = {p.stem: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    start = time.perf_counter()
    again = autograde(LAB, root, out, workers=2, sandbox="bwrap", limits=Limits(wall_s=120), progress=False)
    second_s = time.perf_counter() - start
    return {"out": out, "kinds": kinds, "outcomes": {o.student: o for o in outcomes}, "first_s": first_s,
            "again": {o.student: o for o in again}, "second_s": second_s, "mtimes": mtimes,
            "results": {o.student: json.loads(o.result_path.read_text()) for o in outcomes}}


def test_every_learner_has_a_result(graded):
    assert len(graded["outcomes"]) == CLASS_SIZE
    assert {o.status for o in graded["outcomes"].values()} <= {"graded", "rejected"}, \
        {s: r.get("error") for s, r in graded["results"].items() if r["status"] == "grader-error"}


def test_each_graded_learner_gets_what_their_work_deserves(graded):
    wrong = {}
    for student, kind in graded["kinds"].items():
        result = graded["results"][student]
        got = {notebook.task_of(t["cell"]): t["points"] for t in result["tasks"]}
        if result["status"] != "graded" or got != SAMPLES[kind]["expected"]:
            wrong[student] = (kind, result["status"], got, result.get("error", "")[:200])
    assert not wrong, wrong


def test_messages_name_each_samples_mistake_and_nothing_is_flagged(graded):
    from grader.report import flags_of

    by_kind = {}
    for student, kind in graded["kinds"].items():
        by_kind.setdefault(kind, graded["results"][student])
    messages = {c["task"]: c["message"] for c in by_kind["mix"]["checks"] if c["status"] != "passed"}
    assert "instead of raising ValueError" in messages["ROI1"] and "one sequence at a time" in messages["ROI3"]
    wrong = {c["task"]: c for c in by_kind["wrong"]["checks"]}
    assert "3600x too large" in wrong["ROI1"]["message"]
    assert wrong["ROI2"]["measured"].get("follows_your_cost_per_query")
    for kind, result in by_kind.items():
        assert bool(flags_of(result)) == SAMPLES[kind]["flags"], (kind, flags_of(result))


def test_faulty_hand_ins_are_rejected_with_their_reason(graded):
    results = graded["results"]
    for name in CUT_OFF:
        assert results[name]["status"] == "rejected" and "is not a valid Jupyter notebook" in results[name]["error"]
    for name in NO_NOTEBOOK:
        assert results[name]["status"] == "rejected" and "no notebook was submitted" in results[name]["error"]
    for name in OTHER_LAB:
        assert "is the notebook of lab 'kv_cache', not 'roi'" in results[name]["error"]


def test_no_grade_is_lost_in_the_gradebook(graded):
    scores = gradebook.scores(graded["out"] / "gradebook.db", LAB)
    for student, kind in graded["kinds"].items():
        assert scores[student] == sum(SAMPLES[kind]["expected"].values()), student


def test_rerun_regrades_nothing_and_is_quick(graded):
    assert {o.status for o in graded["again"].values()} == {"skipped"}
    assert {p.stem: p.stat().st_mtime_ns for p in (graded["out"] / "results").glob("*.json")} == graded["mtimes"]
    assert graded["second_s"] < 60, f"a re-run of {CLASS_SIZE} unchanged submissions took {graded['second_s']:.0f} s"
    per_minute = CLASS_SIZE / graded["first_s"] * 60
    print(f"\n{CLASS_SIZE} roi submissions: {graded['first_s']:.0f} s ({per_minute:.1f} per minute), re-run {graded['second_s']:.1f} s")
