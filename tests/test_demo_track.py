"""The track demo's machinery on a small class: a course with timestamps and progress files, due dates
from the track, time on task and lateness in results, gradebook, lab reports and the track report.

`make demo` runs the same code on the whole quick-track class (samples/quick_class.py); this test
uses two learners and the quick track's lightest lab so that it stays short.
"""

from __future__ import annotations

import csv
import shutil

import pytest
from nbgrader.api import Gradebook

from grader.demo import class_definition, run_track_demo, track_table

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")]

CLASS = {"start": "2026-11-23T13:00:00+00:00", "learners": {
    "ada": {"roi": {"sample": "reference", "opened": 140, "minutes": 30}},  # submits 15:50, due 16:00
    "ben": {"roi": {"sample": "partial", "opened": 170, "minutes": 25}},    # submits 16:15: 15 min late
}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("track-demo")
    hands, page, grades = run_track_demo(out, "quick", workers=2, sandbox="bwrap", progress=False, definition=CLASS)
    return out, {h.learner: h for h in hands}, page, grades


def test_each_hand_in_graded_as_its_sample_says(demo):
    _, hands, _, _ = demo
    assert set(hands) == {"ada", "ben"}
    assert all(h.agrees for h in hands.values()), track_table(list(hands.values()))
    assert sum(hands["ada"].awarded.values()) == 10 and sum(hands["ben"].awarded.values()) == 4


def test_time_on_task_and_lateness_come_from_the_course(demo):
    out, hands, _, _ = demo
    assert hands["ada"].time_on_task_s == 30 * 60 and hands["ada"].late_by_s == 0
    assert hands["ben"].time_on_task_s == 25 * 60 and hands["ben"].late_by_s == 15 * 60
    with Gradebook(f"sqlite:///{out / 'course' / 'gradebook.db'}") as gb:
        assert str(gb.find_assignment("roi").duedate) == "2026-11-23 16:00:00"
        assert gb.find_submission("roi", "ben").total_seconds_late == 15 * 60
        assert gb.find_submission("roi", "ada").total_seconds_late == 0


def test_track_report_and_grades(demo):
    out, _, page, grades = demo
    html = page.read_text()
    assert "track quick" in html and "Time on task against each lab's budget" in html and "4/10 late" in html
    rows = list(csv.DictReader(grades.open()))
    assert {r["Student"]: r["roi"] for r in rows} == {"ada": "10", "ben": "4"}
    lab_page = (out / "reports" / "roi" / "report.html").read_text()
    assert "Time on task and lateness" in lab_page and "budget 30 min" in lab_page and "1 submitted late" in lab_page


def test_rerun_regrades_nothing(demo):
    out, _, _, _ = demo
    hands, _, _ = run_track_demo(out, "quick", workers=2, sandbox="bwrap", progress=False, definition=CLASS)
    assert all(h.agrees for h in hands)


def test_the_bundled_quick_class_uses_existing_samples_of_every_quick_lab():
    from grader import samples
    from grader.tracks import get_track

    definition = class_definition("quick")
    labs = [e.lab for e in get_track("quick").labs]
    seen = set()
    for learner, hand_ins in definition["learners"].items():
        for lab, spec in hand_ins.items():
            assert lab in labs, (learner, lab)
            assert spec["sample"] in samples.definitions(lab), (learner, lab, spec["sample"])
            assert spec["opened"] >= 0 and spec["minutes"] > 0
            seen.add(lab)
    assert seen == set(labs)
