"""grader.tracks: timed tracks (quick, deep, production) from `labs/tracks.json`.

A learner starts a track (`inferlab track start quick`): the start is recorded in their
inferlab folder (`~/.inferlab`, or `$INFERLAB_HOME`). From then on each notebook's first
cell shows the time left, self-checks record how each task stands, and `inferlab track
status` lists the labs with their due times and self-check results.

In a classroom the instructor starts the track for the course (`inferlab track start quick
--course DIR`, written to DIR/inferlab-track.json): autograde then gives each lab its due date
(track start + the lab's due offset) in nbgrader's gradebook, where formgrader and nbgrader's
late-submission handling see it, and records how late each submission was.

Time on task comes from the notebook's own folder: the first time a lab's notebook runs its
time-left cell, `inferlab-progress.json` is written next to it, and nbgrader's submit carries
it along; autograde reads it back (opened at -> submitted at). It is the learner's file, so it
informs the instructor's report and never the grade.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalogue import LABS, REPO_ROOT

TRACKS_FILE = REPO_ROOT / "labs" / "tracks.json"
STATE_FILE, PROGRESS_FILE, COURSE_FILE = "track.json", "inferlab-progress.json", "inferlab-track.json"
DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?$")


class TrackError(ValueError):
    """Bad input about tracks: the message names the problem and the fix."""


def parse_duration(text: str) -> dt.timedelta:
    """'3h', '1h25m', '14d' -> a timedelta."""
    match = DURATION.match(str(text).strip())
    if not match or not any(match.groups()):
        raise TrackError(f"{text!r} is not a duration: write days, hours and minutes like 45m, 1h25m or 3d")
    days, hours, minutes = (int(g or 0) for g in match.groups())
    return dt.timedelta(days=days, hours=hours, minutes=minutes)


def format_duration(delta: dt.timedelta) -> str:
    """A duration for people: '2 h 05 min', '3 d 4 h', '12 min'."""
    minutes = int(abs(delta).total_seconds() // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {mins:02d} min"
    return f"{mins} min"


@dataclass(frozen=True)
class TrackLab:
    lab: str
    minutes: int  # the time budget for the lab's work
    due: dt.timedelta  # after the track's start


@dataclass(frozen=True)
class Track:
    name: str
    title: str
    budget: dt.timedelta
    labs: tuple[TrackLab, ...]

    def lab(self, name: str) -> TrackLab | None:
        return next((t for t in self.labs if t.lab == name), None)


def load_tracks(path: Path = TRACKS_FILE) -> dict[str, Track]:
    """Every track, validated: known labs, positive budgets, due offsets in order and within the track."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrackError(f"cannot read the tracks file {path} ({err}): restore it from the repository") from None
    known = {lab.name for lab in LABS}
    tracks = {}
    for name, spec in data["tracks"].items():
        labs = []
        for entry in spec["labs"]:
            if entry["lab"] not in known:
                raise TrackError(f"{path}: track {name!r} lists {entry['lab']!r}, which is not a lab of the "
                                 f"catalogue ({', '.join(sorted(known))})")
            if int(entry["minutes"]) <= 0:
                raise TrackError(f"{path}: {name}/{entry['lab']} has a time budget of {entry['minutes']} minutes")
            labs.append(TrackLab(entry["lab"], int(entry["minutes"]), parse_duration(entry["due"])))
        track = Track(name, spec["title"], parse_duration(spec["budget"]), tuple(labs))
        dues = [t.due for t in labs]
        if dues != sorted(dues) or dues[-1] > track.budget:
            raise TrackError(f"{path}: track {name!r} has due offsets out of order or beyond its budget {spec['budget']}")
        tracks[name] = track
    return tracks


def get_track(name: str) -> Track:
    tracks = load_tracks()
    if name not in tracks:
        raise TrackError(f"unknown track {name!r}; the tracks are: {', '.join(tracks)}")
    return tracks[name]


# ---------------------------------------------------------------- where starts and progress are kept

def state_dir() -> Path:
    """The learner's inferlab folder: $INFERLAB_HOME, else ~/.inferlab."""
    return Path(os.environ.get("INFERLAB_HOME") or Path.home() / ".inferlab")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 time; without a zone it is this machine's local time."""
    try:
        when = dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        raise TrackError(f"{text!r} is not a date and time: write it like 2026-11-23T09:00 (local) "
                         "or 2026-11-23T09:00+01:00") from None
    return when.astimezone(dt.timezone.utc) if when.tzinfo else when.astimezone().astimezone(dt.timezone.utc)


def start(name: str, at: dt.datetime | None = None, folder: Path | None = None, restart: bool = False,
          course: bool = False) -> Path:
    """Record the start of track `name`; returns the file written.

    A track already started is kept unless `restart`; the old record is then renamed, never lost."""
    track = get_track(name)
    path = Path(folder) / COURSE_FILE if course else (Path(folder) if folder else state_dir()) / STATE_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if not restart:
            raise TrackError(f"track {old['track']!r} was already started at {old['started']} ({path}); "
                             "pass --restart to start again (the old record is kept next to it)")
        stamp = old["started"].replace(":", "").replace("-", "")[:15]
        path.rename(path.with_name(f"{path.stem}-{stamp}{path.suffix}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"track": track.name, "started": (at or now_utc()).astimezone(dt.timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def started(path: Path) -> tuple[Track, dt.datetime] | None:
    """The track started in a record file, or None when there is none."""
    if not Path(path).is_file():
        return None
    record = json.loads(Path(path).read_text())
    return get_track(record["track"]), parse_time(record["started"])


def current(folder: Path | None = None) -> tuple[Track, dt.datetime] | None:
    return started((Path(folder) if folder else state_dir()) / STATE_FILE)


def notebook_path(lab: str) -> str:
    """The notebook this kernel runs: Jupyter names it to the kernel (`JPY_SESSION_NAME`); otherwise the lab's
    notebook in the working directory, which is the notebook's folder under Jupyter."""
    named = os.environ.get("JPY_SESSION_NAME", "")
    if named.endswith(".ipynb"):
        return str(Path(named).expanduser().resolve())
    return str((Path.cwd() / f"{lab}.ipynb").resolve())


def record_check(lab: str, task: str, status: str, folder: Path | None = None, at: dt.datetime | None = None) -> None:
    """Remember a self-check's outcome (for `track status`, and for the lab folder's progress file).

    The track follows one copy of each lab's notebook: the first one opened (or checked) since the track
    started. A self-check run in any other copy (a scratch copy, an older attempt) is kept apart, under
    `other_copies`, so it never overwrites the status of the copy that will be handed in."""
    when = (at or now_utc()).isoformat(timespec="seconds")
    this = notebook_path(lab)
    for path in ((Path(folder) if folder else state_dir()) / "progress.json", Path.cwd() / PROGRESS_FILE):
        own = path.parent / f"{lab}.ipynb"
        if path.name == PROGRESS_FILE and not (own.is_file() and Path(this) == own.resolve()):
            continue  # only the lab's own notebook, in its own folder, which nbgrader's submit carries along
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
            entry = data if path.name == PROGRESS_FILE else data.setdefault(lab, {})
            if path.name != PROGRESS_FILE:
                entry.setdefault("notebook", this)
                if entry["notebook"] != this:
                    entry = entry.setdefault("other_copies", {}).setdefault(this, {})
            entry.setdefault("checks", {})[task] = {"status": status, "at": when}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
        except (OSError, ValueError):
            pass  # a read-only or damaged file must never stop a learner's notebook


def opened(lab: str, folder: Path | None = None, at: dt.datetime | None = None) -> dict[str, Any]:
    """Record, once, when the learner first opened `lab` (in their state and in the lab's folder), and which
    copy of its notebook the track follows."""
    when = (at or now_utc()).isoformat(timespec="seconds")
    this = notebook_path(lab)
    here = Path.cwd() / PROGRESS_FILE
    result = {}
    for path in ((Path(folder) if folder else state_dir()) / "progress.json", here):
        own = path.parent / f"{lab}.ipynb"
        if path == here and not (own.is_file() and Path(this) == own.resolve()):
            continue
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
            entry = data if path == here else data.setdefault(lab, {})
            if path == here:
                entry.setdefault("lab", lab)
            else:
                entry.setdefault("notebook", this)
            entry.setdefault("opened", when)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
            result = entry
        except (OSError, ValueError):
            pass
    return result


def progress(folder: Path | None = None) -> dict[str, Any]:
    path = (Path(folder) if folder else state_dir()) / "progress.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------- what learners see

def time_left(lab: str, folder: Path | None = None, now: dt.datetime | None = None) -> str:
    """The line at the top of a lab's notebook: the track's and the lab's time left."""
    now = now or now_utc()
    on = current(folder)
    if on is None:
        return (f"No track started. To time yourself, run `inferlab track start quick` in a terminal "
                f"(tracks: {', '.join(load_tracks())}); then run this cell again.")
    track, begun = on
    left = begun + track.budget - now
    line = f"Track {track.name}, started {begun.astimezone():%a %H:%M}: "
    line += (f"{format_duration(left)} left of {format_duration(track.budget)}." if left.total_seconds() >= 0 else
             f"its {format_duration(track.budget)} ran out {format_duration(left)} ago.")
    entry = track.lab(lab)
    if entry is None:
        return line + f" {lab} is not part of this track."
    due = begun + entry.due
    left_lab = due - now
    line += f" {lab}: budget {entry.minutes} min, due {due.astimezone():%a %H:%M} "
    line += (f"(in {format_duration(left_lab)})." if left_lab.total_seconds() >= 0 else
             f"({format_duration(left_lab)} overdue).")
    return line


def show_time_left(lab: str) -> None:
    """For a notebook's first cell: print the time left and note that the lab was opened."""
    if os.environ.get("INFERLAB_AUTOGRADE"):
        print("Graded by the autograder: no clock here.")
        return
    try:
        opened(lab)
        print(time_left(lab))
    except TrackError as err:  # a broken tracks file or record must not stop the notebook
        print(f"Track timing is unavailable: {err}")


STATUS_COLUMNS = ("lab", "budget", "due", "time left before due", "self-checks")


def status_rows(folder: Path | None = None, now: dt.datetime | None = None) -> tuple[str, list[list[str]]]:
    """`inferlab track status`: a heading and one row per lab of the started track (`STATUS_COLUMNS`)."""
    from .release import source_labs

    on = current(folder)
    if on is None:
        raise TrackError(f"no track started yet: run `inferlab track start TRACK` (tracks: {', '.join(load_tracks())})")
    track, begun = on
    now = now or now_utc()
    done = progress(folder)
    available = set(source_labs())
    rows = []
    for entry in track.labs:
        due = begun + entry.due
        left = due - now
        followed = done.get(entry.lab, {})
        checks = followed.get("checks", {})
        passed = sum(c["status"] == "passed" for c in checks.values())
        checked = (f"{passed}/{len(checks)} passed" + "".join(f" {t}:{c['status']}" for t, c in sorted(checks.items()))
                   if checks else ("not opened" if entry.lab not in done else "no self-check run yet"))
        if followed.get("notebook") and followed.get("other_copies"):
            checked += (f" (in {Path(followed['notebook']).name}; {len(followed['other_copies'])} other "
                        f"cop{'y' if len(followed['other_copies']) == 1 else 'ies'} not counted)")
        rows.append([entry.lab, f"{entry.minutes} min", f"{due.astimezone():%a %d %b %H:%M}",
                     format_duration(left) + ("" if left.total_seconds() >= 0 else " overdue"),
                     checked if entry.lab in available else "not in this course yet"])
    left = begun + track.budget - now
    head = (f"Track {track.name} ({track.title}), started {begun.astimezone():%a %d %b %H:%M}: "
            + (f"{format_duration(left)} left of {format_duration(track.budget)}" if left.total_seconds() >= 0
               else f"over by {format_duration(left)}"))
    return head, rows


# ---------------------------------------------------------------- what autograde records

def due_date(course: Path | None, lab: str) -> dt.datetime | None:
    """The lab's due date in a course whose instructor started a track (None otherwise)."""
    on = started(Path(course) / COURSE_FILE) if course else None
    if on is None:
        return None
    track, begun = on
    entry = track.lab(lab)
    return begun + entry.due if entry else None


def timing_of(submission: Path, timestamp: str | None, due: dt.datetime | None) -> dict[str, Any]:
    """Time on task and lateness of one submission, from its progress file and nbgrader's timestamp."""
    out: dict[str, Any] = {}
    submitted = None
    if timestamp:
        from nbgrader.utils import parse_utc

        submitted = parse_utc(timestamp).replace(tzinfo=dt.timezone.utc)
    if due is not None:
        out["due"] = due.isoformat(timespec="seconds")
        if submitted is not None:
            out["late_by_s"] = max(0.0, (submitted - due).total_seconds())
    path = Path(submission).parent / PROGRESS_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
        if submitted is not None and record.get("opened"):
            out["time_on_task_s"] = max(0.0, (submitted - parse_time(record["opened"])).total_seconds())
    except (OSError, ValueError, TrackError):
        pass  # the learner's own file: unreadable means unknown, never an error in grading
    return out
