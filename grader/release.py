"""grader.release: generate the learner release `labs/<lab>/` from the nbgrader source `solutions/<lab>/`.

nbgrader's `generate_assignment` does the real work (clears solution regions and hidden
tests, locks cells, records checksums). We then make each stub name its task, so a
learner who runs a cell too early reads `NotImplementedError: Task K1 ...` instead of a
bare error, and copy the result into `labs/`. `check()` regenerates into a temporary
folder and reports every file of `labs/<lab>/` that differs: the release must never
drift from its source.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from .catalogue import REPO_ROOT
from .notebook import grade_id, task_of

STUB = "raise NotImplementedError()"


def source_labs(root: Path = REPO_ROOT) -> list[str]:
    """Labs that have an nbgrader source notebook `solutions/<lab>/<lab>.ipynb`."""
    return sorted(p.parent.name for p in (root / "solutions").glob("*/*.ipynb") if p.stem == p.parent.name)


def name_stub_tasks(path: Path) -> None:
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        task = task_of(grade_id(cell))
        if cell.cell_type == "code" and task and STUB in cell.source:
            cell.source = cell.source.replace(
                STUB, f'raise NotImplementedError("Task {task} is not implemented yet: replace this line with your code")')
    nbformat.write(nb, str(path))


def generate(lab: str, dest: Path, root: Path = REPO_ROOT) -> Path:
    """Build the release of one lab into `dest/<lab>/` (which must not exist yet)."""
    if lab not in source_labs(root):
        raise ValueError(f"no nbgrader source for lab {lab!r} (expected solutions/{lab}/{lab}.ipynb); "
                         f"labs with a source: {', '.join(source_labs(root)) or 'none'}")
    with tempfile.TemporaryDirectory(prefix="inferlab-release-") as tmp:
        course = Path(tmp)
        shutil.copy(root / "nbgrader_config.py", course / "nbgrader_config.py")
        shutil.copytree(root / "solutions" / lab, course / "solutions" / lab)
        cmd = [sys.executable, "-m", "nbgrader", "generate_assignment", lab, "--no-db", "--force",
               "--log-level=WARN", f"--CourseDirectory.root={course}"]
        res = subprocess.run(cmd, cwd=course, capture_output=True, text=True,
                             env={**os.environ, "JUPYTER_CONFIG_DIR": str(course / ".jupyter")})
        if res.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment {lab} failed:\n{res.stdout}\n{res.stderr}")
        for nb_path in (course / "labs" / lab).glob("*.ipynb"):
            name_stub_tasks(nb_path)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(course / "labs" / lab, dest / lab)
    return dest / lab


def release(lab: str, root: Path = REPO_ROOT, out: Path | None = None) -> Path:
    """Regenerate `labs/<lab>/` (or `out/<lab>/`) from the source; returns the folder written."""
    out = out or root / "labs"
    with tempfile.TemporaryDirectory(prefix="inferlab-release-") as tmp:
        built = generate(lab, Path(tmp), root)
        target = out / lab
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(built, target)
    return target


def check(lab: str, root: Path = REPO_ROOT) -> list[str]:
    """Paths under labs/<lab>/ that differ from a fresh release (missing, extra or changed); empty when in sync."""
    with tempfile.TemporaryDirectory(prefix="inferlab-release-") as tmp:
        built = generate(lab, Path(tmp), root)
        committed = root / "labs" / lab
        if not committed.exists():
            return [f"labs/{lab}/ (missing)"]
        problems: list[str] = []
        _diff(filecmp.dircmp(built, committed), Path("labs") / lab, problems)
        return problems


def _diff(cmp: filecmp.dircmp, prefix: Path, problems: list[str]) -> None:
    problems += [f"{prefix / n} (missing)" for n in cmp.left_only]
    problems += [f"{prefix / n} (not in the source)" for n in cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    problems += [f"{prefix / n} (differs)" for n in mismatch + errors]
    for name, sub in cmp.subdirs.items():
        _diff(sub, prefix / name, problems)
