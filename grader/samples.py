"""grader.samples: build a lab's sample submissions (grader/labs/<lab>/samples.py) as notebooks.

They are generated from the lab's one source, the solution notebook, so they never drift
from it: a fully solved notebook is the source (any hidden-test region removed); each variant
then replaces some answer cells with known-bad code.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat

from . import notebook
from .catalogue import REPO_ROOT

def definitions(lab: str, kind: str = "samples") -> dict:
    """A lab's sample submissions (`grader/labs/<lab>/samples.py`) or attack submissions (`attacks.py`)."""
    from . import labs

    return labs.load(lab).definitions(kind)


def solved(lab: str):
    """What a learner who solved everything submits: the source, minus any hidden-test region."""
    nb = notebook.read(REPO_ROOT / "solutions" / lab / f"{lab}.ipynb")
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("grade") and notebook.HIDDEN_BEGIN in c.source:
            c.source = c.source.split(notebook.HIDDEN_BEGIN)[0].rstrip()
    return nb


def build(lab: str, out: Path, names: list[str] | None = None, kind: str = "samples") -> dict[str, Path]:
    """Write `<out>/<name>.ipynb` for each sample (flat layout); returns the paths.

    A definition's `cells` replace answer cells; with `keep_solution` they are appended to the
    solved cell instead (`prepend`: put before it); `add_after` inserts cells the learner added.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, spec in definitions(lab, kind).items():
        if names and name not in names:
            continue
        if spec.get("from_release"):
            nb = notebook.read(REPO_ROOT / "labs" / lab / f"{lab}.ipynb")
        else:
            nb = copy.deepcopy(solved(lab))
        for cell_id, new_source in spec.get("cells", {}).items():
            c = notebook.cell(nb, cell_id)
            if spec.get("keep_solution"):
                parts = [new_source.strip(), c.source.strip()] if spec.get("prepend") else [c.source.strip(),
                                                                                           new_source.strip()]
                c.source = "\n\n".join(parts) + "\n"
            else:
                c.source = new_source.strip() + "\n"
        for cell_id, added in spec.get("add_after", {}).items():
            nb.cells.insert(nb.cells.index(notebook.cell(nb, cell_id)) + 1, nbformat.v4.new_code_cell(added))
        for cell_id, (old, new) in spec.get("replace", {}).items():
            c = notebook.cell(nb, cell_id)
            if old not in c.source:
                raise ValueError(f"sample {name}: {old!r} not found in cell {cell_id}")
            c.source = c.source.replace(old, new)
        paths[name] = out / f"{name}.ipynb"
        nbformat.write(nb, str(paths[name]))
    return paths
