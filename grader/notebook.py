"""grader.notebook: reading nbgrader notebooks and running chosen cells in a namespace.

Cells are addressed by their nbgrader `grade_id`, the stable name a source notebook gives
every cell; the same IDs survive into the release and into every submission.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat

SOLUTION_BEGIN, SOLUTION_END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"


def read(path: str | Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def grade_id(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def task_of(cell_id: str | None) -> str | None:
    """'k1-solution' -> 'K1': a task's cells have grade_ids that start with the task ID."""
    import re

    match = re.match(r"([a-z]+\d+)-", cell_id or "")
    return match.group(1).upper() if match else None


def cell(nb, cell_id: str):
    for c in nb.cells:
        if grade_id(c) == cell_id:
            return c
    raise KeyError(f"no cell with grade_id {cell_id!r}; cells: {[grade_id(c) for c in nb.cells]}")


def answer_cells(nb, cell_ids: tuple[str, ...]) -> list[tuple[str, str]]:
    """(grade_id, or '' for a cell the learner added, source) of the named code cells, in notebook order, each
    followed by the cells the learner added right after it: what a worker runs again to rebuild the answers."""
    out, keep = [], False
    for c in nb.cells:
        gid = grade_id(c)
        if gid:
            keep = gid in cell_ids
            if keep and c.cell_type == "code":
                out.append((gid, c.source))
        elif keep and c.cell_type == "code":
            out.append(("", c.source))
    return out


def exec_cells(nb, cell_ids: list[str], namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the named code cells, in the given order, in one namespace (like a kernel would)."""
    namespace = {} if namespace is None else namespace
    namespace.setdefault("__name__", "__notebook__")
    for cell_id in cell_ids:
        c = cell(nb, cell_id)
        # dont_inherit: this module's `from __future__ import annotations` must not leak into the cells, as a
        # kernel would not have it (a @dataclass in a cell breaks under it)
        exec(compile(c.source, f"<cell {cell_id}>", "exec", dont_inherit=True), namespace)
    return namespace


def strip_solutions(source: str, stub: str = "raise NotImplementedError()") -> str:
    """What a learner receives for a solution cell: each solution region replaced by a stub, indented in place."""
    out, inside = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == SOLUTION_BEGIN:
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f"{indent}{stub}")
        elif stripped == SOLUTION_END:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)
