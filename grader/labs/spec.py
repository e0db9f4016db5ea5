"""grader.labs.spec: what a lab declares about itself, validated when it is loaded.

A lab is one package, `grader/labs/<lab>/`:

    __init__.py   SPEC = LabSpec(...): name, task prefix, tasks and points, cells (this file)
    public.py     what the notebook imports as `checks`: self-checks on public inputs. No oracle:
                  expected values that would answer a task are stored (public_expected.json),
                  never computed here
    probes.py     runs in the learner's sandboxed process: adapters from plain data to the
                  learner's code (grader.answer_worker), and the timed task's contenders
    grading.py    the checker's side, never in a sandbox nor in a learner's image: hidden inputs,
                  expected values, verdicts, the timed task's verdict and calibration
    samples.py    sample submissions with the grade a careful human grader would give
    attacks.py    attacks on the grader, with the grade their honest part deserves
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..timed import TimedTask


class LabSpecError(ValueError):
    """A lab's declaration contradicts itself or its notebook."""


@dataclass(frozen=True)
class Task:
    id: str  # "KV1": the lab's prefix and a number, the same string everywhere (stub, self-check, gradebook, report)
    title: str
    points: float
    cells: tuple[str, ...]  # grade_ids of the answer cells the task's check runs (in notebook order)
    requires: tuple[str, ...] = ()  # tasks that must pass first: this one builds on their work

    @property
    def graded_cell(self) -> str:
        """The grade cell that carries the task's points in nbgrader's gradebook."""
        return f"{self.id.lower()}-hidden"


@dataclass(frozen=True)
class LabSpec:
    name: str  # folder, notebook, thresholds and report rows all use this name
    prefix: str  # task IDs start with it: two or more capital letters, unique among labs
    tasks: tuple[Task, ...]
    defining_cells: tuple[str, ...]  # locked cells the answers rely on (imports, the model): trusted, run first
    reference_cells: tuple[str, ...]  # the solution notebook's cells that define the reference answers
    timed: TimedTask | None = None
    public_seed: int = 0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise LabSpecError(f"lab name {self.name!r} must be a lowercase identifier (it names a folder and a module)")
        if not re.fullmatch(r"[A-Z]{2,}", self.prefix):
            raise LabSpecError(f"lab {self.name}: task prefix {self.prefix!r} must be two or more capital letters")
        if not self.tasks:
            raise LabSpecError(f"lab {self.name} declares no tasks")
        for i, task in enumerate(self.tasks, 1):
            if task.id != f"{self.prefix}{i}":
                raise LabSpecError(f"lab {self.name}: task {i} is {task.id!r}; expected {self.prefix}{i} "
                                   "(task IDs are the prefix and 1, 2, 3... in notebook order)")
            if task.points <= 0:
                raise LabSpecError(f"lab {self.name}: task {task.id} has {task.points} points; give it some")
            if not task.cells:
                raise LabSpecError(f"lab {self.name}: task {task.id} names no answer cells")
            earlier = {t.id for t in self.tasks[:i - 1]}
            for other in task.requires:
                if other not in earlier:
                    raise LabSpecError(f"lab {self.name}: task {task.id} requires {other!r}, which is not an "
                                       "earlier task")
        if self.timed is not None:
            task = self.task(self.timed.task)
            if self.timed.gate != task.graded_cell:
                raise LabSpecError(f"lab {self.name}: the timed task's gate is {self.timed.gate!r}; expected "
                                   f"{task.graded_cell!r}, the graded cell of {task.id}")

    def task(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise LabSpecError(f"lab {self.name} has no task {task_id!r}; tasks: {', '.join(t.id for t in self.tasks)}")

    @property
    def max_points(self) -> float:
        return sum(t.points for t in self.tasks)


CALL = re.compile(r"\b(self_check|grade)\(\s*[\"']([A-Za-z0-9]+)[\"']")


def notebook_problems(spec: LabSpec, nb) -> list[str]:
    """Where the lab's notebook and its spec disagree: grade cells, points, answer cells and check calls."""
    from .. import notebook

    problems = []
    ids = {notebook.grade_id(c): c for c in nb.cells if notebook.grade_id(c)}
    graded = {gid: c for gid, c in ids.items() if c.metadata.get("nbgrader", {}).get("grade")}
    for task in spec.tasks:
        cell = graded.get(task.graded_cell)
        if cell is None:
            problems.append(f"task {task.id}: no grade cell {task.graded_cell!r} in the notebook")
        elif float(cell.metadata["nbgrader"].get("points", 0)) != task.points:
            problems.append(f"task {task.id}: the notebook gives {cell.metadata['nbgrader'].get('points')} points, "
                            f"the spec {task.points}")
        for gid in task.cells:
            if gid not in ids:
                problems.append(f"task {task.id}: answer cell {gid!r} is not in the notebook")
    for gid in graded:
        if gid not in {t.graded_cell for t in spec.tasks}:
            problems.append(f"grade cell {gid!r} belongs to no task of the spec")
    for gid in (*spec.defining_cells, *spec.reference_cells):
        if gid not in ids:
            problems.append(f"cell {gid!r} named by the spec is not in the notebook")
    for gid, c in ids.items():
        if c.cell_type != "code":
            continue
        own = notebook.task_of(gid)
        for kind, task_id in CALL.findall(c.source):
            if task_id not in {t.id for t in spec.tasks}:
                problems.append(f"cell {gid!r} calls {kind}({task_id!r}), which is not a task of {spec.name}")
            elif own and own.startswith(spec.prefix) and own != task_id:
                problems.append(f"cell {gid!r} belongs to {own} but calls {kind}({task_id!r})")
    return problems
