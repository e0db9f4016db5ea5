"""The learner release: in sync with its source, and leaking nothing of the answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grader import notebook, release
from grader.catalogue import REPO_ROOT

LABS = release.source_labs()


def test_every_lab_has_a_committed_release_in_sync():
    res = subprocess.run([str(Path(sys.executable).with_name("inferlab")), "release", "--check"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert LABS, "no lab sources found"


def test_check_reports_drift(tmp_path):
    shutil.copy(REPO_ROOT / "nbgrader_config.py", tmp_path)
    shutil.copytree(REPO_ROOT / "solutions" / "kv_cache", tmp_path / "solutions" / "kv_cache")
    shutil.copytree(REPO_ROOT / "labs" / "kv_cache", tmp_path / "labs" / "kv_cache")
    assert release.check("kv_cache", root=tmp_path) == []
    src = tmp_path / "solutions" / "kv_cache" / "kv_cache.ipynb"
    nb = json.loads(src.read_text())
    nb["cells"][0]["source"] = ["# A changed title\n"]
    src.write_text(json.dumps(nb))
    assert release.check("kv_cache", root=tmp_path) == ["labs/kv_cache/kv_cache.ipynb (differs)"]
    (tmp_path / "labs" / "kv_cache" / "answers.py").write_text("x = 1\n")
    assert "labs/kv_cache/answers.py (not in the source)" in release.check("kv_cache", root=tmp_path)


@pytest.mark.parametrize("lab", LABS)
def test_release_leaks_no_solution_hidden_test_or_seed(lab):
    source = notebook.read(REPO_ROOT / "solutions" / lab / f"{lab}.ipynb")
    released_text = (REPO_ROOT / "labs" / lab / f"{lab}.ipynb").read_text()
    released = notebook.read(REPO_ROOT / "labs" / lab / f"{lab}.ipynb")
    released_code = "\n".join(c.source for c in released.cells if c.cell_type == "code")
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "GRADING_SEED", "grade("):
        assert marker not in released_text, f"{marker!r} leaked into labs/{lab}"
    # Every line of code inside a solution region (bar trivial ones, and lines that public cells also
    # have) is absent from the released code (the instructions may quote a call the learner should make).
    public = {line.strip() for c in source.cells if c.cell_type == "code"
              for line in notebook.strip_solutions(c.source).splitlines()}
    checked = 0
    for cell in source.cells:
        inside = False
        for line in cell.source.splitlines():
            if line.strip() == notebook.SOLUTION_BEGIN:
                inside = True
            elif line.strip() == notebook.SOLUTION_END:
                inside = False
            elif inside and len(line.strip()) > 12 and line.strip() not in public:
                assert line.strip() not in released_code, f"solution line leaked: {line.strip()!r}"
                checked += 1
    assert checked >= 10, "the leak check compared too few solution lines to mean anything"
    # Only notebooks are released: no reference modules, samples or seeds files.
    assert {p.name for p in (REPO_ROOT / "labs" / lab).iterdir()} == {f"{lab}.ipynb"}
    # Every stub names its task (or, in a cell no task grades, its exercise), and hidden test cells are present
    # but empty.
    for cell in released.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            task = notebook.task_of(notebook.grade_id(cell))
            named = f"Task {task} " if task else f"The {notebook.grade_id(cell)} exercise (not graded)"
            assert f'raise NotImplementedError("{named}' in cell.source, cell.source
        if meta.get("grade"):
            assert "grade(" not in cell.source and meta.get("points", 0) > 0


def test_given_cells_follow_the_lab_they_come_from(tmp_path):
    """A cell generated from another lab's answers (continuous_batching's copy of kv_cache's KV1 and KV2)
    is reported stale when that source changes, and the release rewrites it from there."""
    lab = "continuous_batching"
    shutil.copy(REPO_ROOT / "nbgrader_config.py", tmp_path)
    for name in ("kv_cache", lab):
        shutil.copytree(REPO_ROOT / "solutions" / name, tmp_path / "solutions" / name)
    shutil.copytree(REPO_ROOT / "labs" / lab, tmp_path / "labs" / lab)
    target = tmp_path / "solutions" / lab / f"{lab}.ipynb"
    assert release.stale_given_cells(notebook.read(target), tmp_path) == []
    kv = tmp_path / "solutions" / "kv_cache" / "kv_cache.ipynb"
    nb = json.loads(kv.read_text())
    k1 = next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == "kv1-solution")
    k1["source"] = ["# An improved comment\n"] + k1["source"]
    kv.write_text(json.dumps(nb))
    problems = release.check(lab, root=tmp_path)
    assert f"labs/{lab}/{lab}.ipynb (differs)" in problems
    assert any("cell 'given' (stale" in p and "kv_cache's kv1-solution, kv2-solution" in p for p in problems), problems
    assert release.refresh_given(target, tmp_path) == ["given"]
    given = notebook.cell(notebook.read(target), "given").source
    assert "# An improved comment" in given and notebook.SOLUTION_BEGIN not in given
    assert release.stale_given_cells(notebook.read(target), tmp_path) == []
