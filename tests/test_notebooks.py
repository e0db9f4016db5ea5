"""Notebooks run top to bottom in a real Jupyter kernel: the solution passes everything, the release never stops."""

from __future__ import annotations

import time

import pytest

from grader import notebook
from grader.catalogue import REPO_ROOT
from grader.checks import NOT_ATTEMPTED
from grader.release import source_labs

nbclient = pytest.importorskip("nbclient", reason="notebook tests need the lab extra (pip install -e '.[lab]')")

SOLUTION_BUDGET_S = 180  # a solution notebook must run top to bottom on a CPU within 3 minutes


def execute(path, tmp_path):
    nb = notebook.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def outputs(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")


@pytest.mark.parametrize("lab", source_labs())
def test_solution_notebook_passes_every_check_in_budget(lab, tmp_path):
    nb, seconds = execute(REPO_ROOT / "solutions" / lab / f"{lab}.ipynb", tmp_path)
    text = outputs(nb)
    self_checks = [line for line in text.splitlines() if line.startswith("[")]
    assert self_checks and all("] passed" in line for line in self_checks), "\n".join(self_checks)
    assert seconds <= SOLUTION_BUDGET_S, f"{lab} solution took {seconds:.0f} s (budget {SOLUTION_BUDGET_S} s)"


@pytest.mark.parametrize("lab", source_labs())
def test_released_notebook_runs_to_the_end_reporting_not_attempted(lab, tmp_path):
    nb, _ = execute(REPO_ROOT / "labs" / lab / f"{lab}.ipynb", tmp_path)  # raises if any cell errors
    lines = [line for line in outputs(nb).splitlines() if line.startswith("[")]
    assert lines and all(f"] {NOT_ATTEMPTED}" in line for line in lines), "\n".join(lines)
    assert all("Task " in line for line in lines)
