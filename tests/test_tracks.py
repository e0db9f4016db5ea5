"""Timed tracks: the tracks file, starting a track, time left, self-check status, due dates and lateness."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from grader import tracks
from grader.catalogue import LABS, REPO_ROOT
from grader.tracks import TrackError

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 13, 0, tzinfo=UTC)


def test_tracks_file_defines_quick_deep_and_production_in_catalogue_order():
    all_tracks = tracks.load_tracks()
    assert list(all_tracks) == ["quick", "deep", "production"]
    quick = all_tracks["quick"]
    assert [t.lab for t in quick.labs] == [lab.name for lab in LABS if "quick" in lab.tracks]
    assert quick.budget == dt.timedelta(hours=3) and sum(t.minutes for t in quick.labs) <= 180
    assert [t.lab for t in all_tracks["deep"].labs][:4] == [t.lab for t in quick.labs]
    assert all_tracks["production"].budget == dt.timedelta(days=30)
    # every lab's budget agrees with what its notebook tells the learner
    for entry in quick.labs:
        source = REPO_ROOT / "solutions" / entry.lab / f"{entry.lab}.ipynb"
        if source.is_file():
            assert f"**Time budget:** {entry.minutes} minutes" in source.read_text(), entry.lab


@pytest.mark.parametrize("text, minutes", [("45m", 45), ("1h25m", 85), ("3h", 180), ("2d", 2880)])
def test_durations(text, minutes):
    assert tracks.parse_duration(text) == dt.timedelta(minutes=minutes)


@pytest.mark.parametrize("text", ["", "soon", "3 hours", "1m2h"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(TrackError, match="write days, hours and minutes like 45m"):
        tracks.parse_duration(text)


def test_a_broken_tracks_file_names_the_problem(tmp_path):
    bad = tmp_path / "tracks.json"
    bad.write_text(json.dumps({"tracks": {"quick": {"title": "q", "budget": "1h", "labs": [
        {"lab": "kv_cashe", "minutes": 30, "due": "30m"}]}}}))
    with pytest.raises(TrackError, match="lists 'kv_cashe', which is not a lab of the catalogue"):
        tracks.load_tracks(bad)
    bad.write_text(json.dumps({"tracks": {"quick": {"title": "q", "budget": "1h", "labs": [
        {"lab": "roi", "minutes": 30, "due": "2h"}]}}}))
    with pytest.raises(TrackError, match="beyond its budget"):
        tracks.load_tracks(bad)


def test_unknown_track_lists_the_known_ones(tmp_path):
    with pytest.raises(TrackError, match="unknown track 'fast'; the tracks are: quick, deep, production"):
        tracks.start("fast", folder=tmp_path)


def test_start_keeps_an_earlier_start_unless_restarted_and_never_loses_it(tmp_path):
    tracks.start("quick", T0, tmp_path)
    with pytest.raises(TrackError, match="already started .* pass --restart"):
        tracks.start("deep", folder=tmp_path)
    tracks.start("deep", T0 + dt.timedelta(days=1), tmp_path, restart=True)
    track, begun = tracks.current(tmp_path)
    assert track.name == "deep" and begun == T0 + dt.timedelta(days=1)
    (old,) = tmp_path.glob("track-*.json")
    assert json.loads(old.read_text())["track"] == "quick"


def test_time_left_line_for_the_notebook(tmp_path):
    assert "No track started" in tracks.time_left("kv_cache", tmp_path, now=T0)
    tracks.start("quick", T0, tmp_path)
    line = tracks.time_left("kv_cache", tmp_path, now=T0 + dt.timedelta(minutes=50))
    assert "2 h 10 min left of 3 h 00 min" in line and "kv_cache: budget 45 min" in line and "(in 35 min)" in line
    late = tracks.time_left("gpu_basics", tmp_path, now=T0 + dt.timedelta(minutes=50))
    assert "(15 min overdue)" in late
    assert "not part of this track" in tracks.time_left("serving", tmp_path, now=T0)


def test_self_checks_are_recorded_for_status_and_in_the_lab_folder(tmp_path, monkeypatch):
    home, lab_folder = tmp_path / "home", tmp_path / "kv_cache"
    lab_folder.mkdir()
    (lab_folder / "kv_cache.ipynb").write_text("{}")
    monkeypatch.setenv("INFERLAB_HOME", str(home))
    monkeypatch.delenv("INFERLAB_AUTOGRADE", raising=False)
    monkeypatch.chdir(lab_folder)
    tracks.start("quick", T0)
    tracks.show_time_left("kv_cache")
    from grader.checks import self_check
    from grader.labs.kv_cache import public as kv_cache

    self_check("KV3", kv_cache.check_kv3, lambda *a: 0, None)  # wrong: 0 bytes
    head, rows = tracks.status_rows(now=T0 + dt.timedelta(minutes=10))
    assert head.startswith("Track quick") and "2 h 50 min left" in head
    row = next(r for r in rows if r[0] == "kv_cache")
    assert row[1] == "45 min" and "0/1 passed" in row[4] and "KV3:failed" in row[4]
    assert next(r for r in rows if r[0] == "gpu_basics")[4] in ("not opened", "not in this course yet")
    progress = json.loads((lab_folder / tracks.PROGRESS_FILE).read_text())
    assert progress["lab"] == "kv_cache" and progress["opened"] and progress["checks"]["KV3"]["status"] == "failed"


def test_under_the_autograder_nothing_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFERLAB_HOME", str(tmp_path))
    monkeypatch.setenv("INFERLAB_AUTOGRADE", "1")
    tracks.show_time_left("kv_cache")
    assert "no clock here" in capsys.readouterr().out and not any(tmp_path.iterdir())


def test_due_date_lateness_and_time_on_task(tmp_path):
    course = tmp_path / "course"
    course.mkdir()
    assert tracks.due_date(course, "kv_cache") is None
    tracks.start("quick", T0, course, course=True)
    due = tracks.due_date(course, "kv_cache")
    assert due == T0 + dt.timedelta(hours=1, minutes=25)
    sub = course / "submitted" / "ada" / "kv_cache" / "kv_cache.ipynb"
    sub.parent.mkdir(parents=True)
    sub.write_text("{}")
    (sub.parent / tracks.PROGRESS_FILE).write_text(json.dumps({"lab": "kv_cache", "opened": "2026-11-23T13:40:00+00:00"}))
    timing = tracks.timing_of(sub, "2026-11-23 14:35:00.000000 UTC", due)
    assert timing["late_by_s"] == 600 and timing["time_on_task_s"] == 55 * 60
    on_time = tracks.timing_of(sub, "2026-11-23 14:00:00 UTC", due)
    assert on_time["late_by_s"] == 0
    (sub.parent / tracks.PROGRESS_FILE).write_text("{ not json")
    assert "time_on_task_s" not in tracks.timing_of(sub, "2026-11-23 14:00:00 UTC", due)


def test_gradebook_due_date_lets_nbgrader_compute_lateness(tmp_path):
    from nbgrader.api import Gradebook

    from grader import gradebook, notebook

    source = notebook.read(REPO_ROOT / "solutions/kv_cache/kv_cache.ipynb")
    due = T0 + dt.timedelta(hours=1, minutes=25)
    result = {"student": "ada", "status": "graded", "tasks": [], "timestamp": "2026-11-23 14:35:00.000000 UTC"}
    gradebook.record(tmp_path / "gradebook.db", "kv_cache", source, [result], due=due)
    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gb:
        assert gb.find_submission("kv_cache", "ada").total_seconds_late == 600


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-c", "from grader.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_start_status_and_bad_input(tmp_path):
    import os

    env = {**os.environ, "INFERLAB_HOME": str(tmp_path / "home")}
    env.pop("INFERLAB_AUTOGRADE", None)
    bad = cli("track", "start", "fast", env=env)
    assert bad.returncode != 0 and "the tracks are: quick, deep, production" in bad.stderr
    ok = cli("track", "start", "quick", env=env)
    assert ok.returncode == 0 and f"wrote {tmp_path / 'home' / 'track.json'}" in ok.stdout
    assert "roi" in ok.stdout
    status = cli("track", "status", env=env)
    assert status.returncode == 0 and "kv_cache" in status.stdout and "left of 3 h 00 min" in status.stdout
    not_course = cli("track", "start", "quick", "--course", str(tmp_path), env=env)
    assert not_course.returncode != 0 and "is not an nbgrader course" in not_course.stderr
    bad_time = cli("track", "start", "quick", "--restart", "--at", "tomorrow", env=env)
    assert bad_time.returncode != 0 and "is not a date and time" in bad_time.stderr
    assert "Examples:" in cli("track", "--help").stdout
    none = cli("track", "status", env={**env, "INFERLAB_HOME": str(tmp_path / "nobody")})
    assert none.returncode != 0 and "no track started yet" in none.stderr


def test_a_scratch_copy_never_overwrites_the_followed_notebooks_status(tmp_path, monkeypatch):
    """The track follows the copy of a lab's notebook opened first; checks run in another copy are kept apart."""
    home, lab_folder = tmp_path / "home", tmp_path / "kv_cache"
    lab_folder.mkdir()
    (lab_folder / "kv_cache.ipynb").write_text("{}")
    (lab_folder / "kv_cache-Copy1.ipynb").write_text("{}")
    monkeypatch.setenv("INFERLAB_HOME", str(home))
    monkeypatch.delenv("INFERLAB_AUTOGRADE", raising=False)
    monkeypatch.chdir(lab_folder)
    tracks.start("quick", T0)
    monkeypatch.setenv("JPY_SESSION_NAME", str(lab_folder / "kv_cache.ipynb"))
    tracks.show_time_left("kv_cache")
    tracks.record_check("kv_cache", "KV1", "passed")
    monkeypatch.setenv("JPY_SESSION_NAME", str(lab_folder / "kv_cache-Copy1.ipynb"))  # a scratch copy
    tracks.show_time_left("kv_cache")
    tracks.record_check("kv_cache", "KV1", "failed")
    _, rows = tracks.status_rows(now=T0 + dt.timedelta(minutes=10))
    row = next(r for r in rows if r[0] == "kv_cache")
    assert "1/1 passed" in row[4] and "KV1:passed" in row[4] and "1 other copy not counted" in row[4], row
    progress = json.loads((lab_folder / tracks.PROGRESS_FILE).read_text())  # the handed-in copy's own file
    assert progress["checks"]["KV1"]["status"] == "passed"


def test_status_has_column_headers(tmp_path):
    import os

    env = {**os.environ, "INFERLAB_HOME": str(tmp_path)}
    assert cli("track", "start", "quick", env=env).returncode == 0
    out = cli("track", "status", env=env).stdout.splitlines()
    assert out[1].split() == ["lab", "budget", "due", "time", "left", "before", "due", "self-checks"], out[:3]


def test_the_learners_readme_lists_the_quick_and_deep_tracks_as_tracks_json_does():
    """labs/README.md is what a learner's folder starts with: its tables must match the tracks' labs and budgets."""
    from grader.catalogue import REPO_ROOT

    text = (REPO_ROOT / "labs" / "README.md").read_text()
    for entry in tracks.get_track("deep").labs:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{entry.lab}` |")), None)
        assert row is not None and row.rstrip(" |").endswith(f"{entry.minutes} min"), (entry.lab, row)
    assert "inferlab track start quick" in text and "inferlab autograde kv_cache --submissions" in text
