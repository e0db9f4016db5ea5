"""grader.submissions: find the submissions of a lab in either layout an instructor has.

* nbgrader's: `DIR/<student>/<lab>/<lab>.ipynb` (with an optional `timestamp.txt`), where DIR
  is a course's `submitted/` folder (given directly or as its parent);
* flat: `DIR/<student>.ipynb`, e.g. downloaded from an LMS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")


@dataclass(frozen=True)
class Submission:
    student: str
    path: Path  # the notebook; may not exist when the learner's folder has no notebook
    timestamp: str | None = None


def discover(lab: str, directory: Path) -> list[Submission]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"submissions folder {directory} does not exist")
    if (directory / "submitted").is_dir():
        directory = directory / "submitted"
    found: dict[str, Submission] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            lab_dir = entry / lab
            if not lab_dir.is_dir():
                continue
            notebooks = sorted(lab_dir.glob("*.ipynb"))
            path = lab_dir / f"{lab}.ipynb" if (lab_dir / f"{lab}.ipynb").exists() else (
                notebooks[0] if notebooks else lab_dir / f"{lab}.ipynb")
            stamp = lab_dir / "timestamp.txt"
            found[entry.name] = Submission(entry.name, path, stamp.read_text().strip() if stamp.is_file() else None)
        elif entry.suffix == ".ipynb":
            found[entry.stem] = Submission(entry.stem, entry)
    bad = [s for s in found if not STUDENT_ID.match(s)]
    if bad:
        raise ValueError(f"student IDs must be letters, digits and _.@+- (they become file names): {bad[:5]}")
    if not found:
        raise ValueError(f"no submissions of lab {lab!r} in {directory}: expected <student>/{lab}/{lab}.ipynb "
                         f"(nbgrader's submitted/ layout) or <student>.ipynb files")
    return list(found.values())
