#!/usr/bin/env python3
"""inferlab-grade-shard: grade a class in shards (a Kubernetes indexed Job), then merge them.

`inferlab autograde` has no sharding option, so this does it around the command line:

Shard (one index of the Job):

    JOB_COMPLETION_INDEX=0 INFERLAB_SHARDS=4 \\
      inferlab-grade-shard kv_cache --submissions /srv/inferlab/course/submitted --out /srv/grading [autograde options]

grades every SHARDS-th submission of the class (sorted by student ID), starting at INDEX,
shown to `inferlab autograde` through a folder of symbolic links, into OUT/shard-INDEX (its
own results, executed notebooks, feedback and gradebook: SQLite must not be shared between
pods). Each result's `submission` is then pointed from the links, gone with the pod, back to
the class's own notebook, where `inferlab report` reads it again.

Merge (one pod, after the Job):

    inferlab-grade-shard --merge kv_cache --shards /srv/grading --course /srv/inferlab/course [autograde options]

copies every shard's results and executed notebooks into the nbgrader course, where
`inferlab autograde --course` keeps them (COURSE/autograde-results/LAB, COURSE/autograded),
then runs `inferlab autograde LAB --course COURSE`: it regrades nothing a shard graded (each
result is up to date), grades what a failed shard left, and writes COURSE/gradebook.db and
COURSE/feedback, which formgrader shows.

INDEX comes from JOB_COMPLETION_INDEX (Kubernetes sets it in an indexed Job), SHARDS from
INFERLAB_SHARDS (the Job's completions). Other options go to `inferlab autograde` unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

USAGE = ("usage: inferlab-grade-shard LAB --submissions DIR --out DIR [inferlab autograde options]\n"
         "       (with JOB_COMPLETION_INDEX and INFERLAB_SHARDS set; an indexed Job sets the first)\n"
         "   or: inferlab-grade-shard --merge LAB --shards DIR --course COURSE [inferlab autograde options]")


def fail(message: str, code: int = 64) -> None:
    print(f"inferlab-grade-shard: {message}", file=sys.stderr)
    raise SystemExit(code)


def env_int(name: str, fix: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        fail(f"{name}={value!r} is not a whole number: {fix}")
        raise  # unreachable: fail() exits


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def without(args: list[str], name: str) -> list[str]:
    """`args` less the option `name` and its value."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == name and i + 1 < len(args):
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def class_entries(lab: str, submissions: Path) -> list[Path]:
    """The class's submissions in either layout `inferlab autograde` reads, sorted by student ID."""
    if (submissions / "submitted").is_dir():
        submissions = submissions / "submitted"
    found = []
    for entry in sorted(submissions.iterdir()):
        if entry.name.startswith("."):
            continue
        if (entry.is_dir() and (entry / lab).is_dir()) or (entry.is_file() and entry.suffix == ".ipynb"):
            found.append(entry)
    return found


def student_of(entry: Path) -> str:
    return entry.stem if entry.is_file() else entry.name


def run(command: list[str]) -> int:
    proc = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # a deleted pod stops the grading too
    return proc.wait()


def grade_shard(lab: str, rest: list[str]) -> int:
    index = env_int("JOB_COMPLETION_INDEX", "run this as an indexed Job (completionMode: Indexed), or set it")
    shards = env_int("INFERLAB_SHARDS", "set it to the Job's completions")
    if shards < 1 or not 0 <= index < shards:
        fail(f"JOB_COMPLETION_INDEX={index} does not fit INFERLAB_SHARDS={shards}: "
             "INFERLAB_SHARDS must equal the Job's completions, and the index lie in 0..completions-1")
    submissions, out = option(rest, "--submissions"), option(rest, "--out")
    if submissions is None or out is None:
        fail(f"--submissions and --out are required\n{USAGE}")
    source = Path(submissions)
    if not source.is_dir():
        fail(f"the submissions folder {source} does not exist: mount the course's submitted/ folder there")
    entries = class_entries(lab, source)
    if not entries:
        fail(f"no submissions of lab {lab!r} in {source}: expected <student>/{lab}/{lab}.ipynb "
             "(nbgrader's submitted/ layout) or <student>.ipynb files")
    mine = entries[index::shards]
    if not mine:
        print(f"shard {index} of {shards}: nothing to grade (the class has {len(entries)} submissions, "
              f"fewer than the {shards} shards)")
        return 0
    view = Path(tempfile.mkdtemp(prefix=f"inferlab-shard-{index}-"))
    for entry in mine:
        (view / entry.name).symlink_to(entry.resolve())
    target = Path(out) / f"shard-{index}"
    args = [*without(without(rest, "--submissions"), "--out"), "--submissions", str(view), "--out", str(target)]
    print(f"shard {index} of {shards}: grading {len(mine)} of {len(entries)} submissions into {target} "
          f"({', '.join(student_of(e) for e in mine[:5])}{', ...' if len(mine) > 5 else ''})", flush=True)
    code = run(["inferlab", "autograde", lab, *args])
    real_paths(target / lab / "results", view, mine)
    return code


def real_paths(results: Path, view: Path, mine: list[Path]) -> None:
    """Point each result's `submission` from the shard's links back to the class's own notebook."""
    for entry in mine:
        path = results / f"{student_of(entry)}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        link, submission = str(view / entry.name), result.get("submission", "")
        if submission == link or submission.startswith(link + "/"):
            result["submission"] = str(entry.resolve()) + submission[len(link):]
            path.write_text(json.dumps(result, indent=1))


def merge(lab: str, rest: list[str]) -> int:
    shards_dir, course = option(rest, "--shards"), option(rest, "--course")
    if shards_dir is None or course is None:
        fail(f"--merge needs --shards and --course\n{USAGE}")
    course_root = Path(course)
    if not (course_root / "nbgrader_config.py").is_file():
        fail(f"{course_root} is not the nbgrader course (no nbgrader_config.py): pass the course root with --course")
    results = sorted(Path(shards_dir).glob(f"shard-*/{lab}/results/*.json"))
    if not results:
        fail(f"no shard results under {shards_dir}/shard-*/{lab}/results: run the grading Job first, "
             "with the same --out as this --shards")
    into = course_root / "autograde-results" / lab
    into.mkdir(parents=True, exist_ok=True)
    for path in results:
        result = json.loads(path.read_text())
        student = result.get("student") or path.stem
        executed = Path(result.get("executed") or "/nonexistent")
        if executed.is_file():
            kept = course_root / "autograded" / student / lab / f"{lab}.ipynb"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(executed, kept)
            result["executed"] = str(kept.resolve())
        (into / f"{student}.json").write_text(json.dumps(result, indent=1))
    print(f"merged {len(results)} results of lab {lab} from {shards_dir} into {course_root}", flush=True)
    return run(["inferlab", "autograde", lab, *without(rest, "--shards")])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--merge"]:
        if len(argv) < 2 or argv[1].startswith("-"):
            fail(USAGE)
        return merge(argv[1], argv[2:])
    if not argv or argv[0].startswith("-"):
        fail(USAGE)
    return grade_shard(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
