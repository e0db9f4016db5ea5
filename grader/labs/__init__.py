"""grader.labs: the registry of labs. `load(name)` is the one way to reach a lab's parts.

A lab is a package (`grader/labs/<lab>/`, laid out as `spec.py` says) whose `__init__` declares
`SPEC`. Its parts are imported only when asked for, so that the sandboxed learner's process
imports `public` and `probes` and never `grading`, which it cannot see.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

from ..timed import TimedTask
from .spec import LabSpec, LabSpecError, Task, notebook_problems

LABS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Lab:
    spec: LabSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def _part(self, part: str) -> ModuleType:
        return importlib.import_module(f"grader.labs.{self.name}.{part}")

    @cached_property
    def public(self) -> ModuleType:
        return self._part("public")

    @cached_property
    def probes(self) -> ModuleType:
        return self._part("probes")

    @cached_property
    def grading(self) -> ModuleType:
        """The checker's side; importing it in a learner's sandbox fails (it is not there)."""
        return self._part("grading")

    @property
    def directory(self) -> Path:
        return LABS_DIR / self.name

    # The timed task's parts, for the timing stage (grader.perf_stage, grader.perf_worker) and the
    # calibration (grader.calibrate, bench/gpu_check.py): named here once, each with what is missing.
    @property
    def timed(self) -> TimedTask | None:
        return self.spec.timed

    def _function(self, part: str, name: str) -> Callable[..., Any]:
        fn = getattr(getattr(self, part), name, None)
        if not callable(fn):
            raise LabSpecError(f"lab {self.name}: grader/labs/{self.name}/{part}.py must define {name}()"
                               + (f" (the lab has the timed task {self.timed.task})" if self.timed else ""))
        return fn

    def perf_contenders(self, role: str, namespace: dict[str, Any]) -> dict[str, Callable[..., Any]]:
        """What a timing worker runs (learner side, in its sandbox): `candidate`, or `baseline` and `reference`."""
        return self._function("probes", "perf_contenders")(role, namespace)

    def perf_prompts(self, seed: int, n: int) -> list[Any]:
        return self._function("grading", "perf_prompts")(seed, n)

    def judge_timing(self, result: Any, tampered: list[str], profile: str | None = None) -> dict[str, Any]:
        return self._function("grading", "judge_timing")(result, tampered, profile)

    def timed_outputs_agree(self, inputs: Any, got: Any, want: Any) -> bool:
        """Whether a timed result that differs from the baseline's is still right (a lab may show that a near
        tie tipped); by default a timed result must equal the baseline's."""
        agree = getattr(self.grading, "timed_outputs_agree", None)
        return bool(agree(inputs, got, want)) if agree is not None else False

    def reference_namespace(self) -> dict[str, Any]:
        """The reference answers, run from the one source that defines them: the solution notebook's
        reference cells (the spec's), in one namespace. Grading side only: the solutions are not in a sandbox."""
        from .. import notebook
        from ..catalogue import REPO_ROOT

        source = REPO_ROOT / "solutions" / self.name / f"{self.name}.ipynb"
        return notebook.exec_cells(notebook.read(source), list(self.spec.reference_cells))

    def public_expected(self) -> dict[str, Any] | None:
        """What `public_expected.json` must hold (the self-checks' stored expected values), or None if the lab
        stores none (`grading.public_expected`)."""
        expected = getattr(self.grading, "public_expected", None)
        return expected() if expected is not None else None

    def definitions(self, kind: str) -> dict[str, Any]:
        """The lab's sample submissions (`samples.py`, SAMPLES) or attacks (`attacks.py`, ATTACKS)."""
        names = {"samples": "SAMPLES", "attacks": "ATTACKS"}
        if kind not in names:
            raise ValueError(f"kind must be one of {', '.join(names)}, got {kind!r}")
        if not (self.directory / f"{kind}.py").is_file():
            raise FileNotFoundError(f"lab {self.name!r} has no {kind} definitions at grader/labs/{self.name}/{kind}.py")
        return getattr(self._part(kind), names[kind])

    @property
    def calibrates(self) -> bool:
        """Whether the lab has bars measured on a machine (`grading.calibrate`)."""
        return callable(getattr(self.grading, "calibrate", None))

    def calibrate(self, **options: Any) -> dict[str, Any]:
        return self._function("grading", "calibrate")(**options)

    @property
    def calibrate_options(self) -> set[str]:
        import inspect

        return set(inspect.signature(self._function("grading", "calibrate")).parameters)


def is_package(name: str) -> bool:
    """Whether there is a lab package `grader/labs/<name>/`."""
    return (LABS_DIR / name / "__init__.py").is_file()


def names() -> list[str]:
    """Every lab package, by name."""
    return sorted(p.name for p in LABS_DIR.iterdir() if (p / "__init__.py").is_file())


_LOADED: dict[str, Lab] = {}


def load(name: str) -> Lab:
    """The lab `name`, its spec validated (and its prefix unique among the labs loaded so far)."""
    if name in _LOADED:
        return _LOADED[name]
    if not is_package(name):
        known = ", ".join(names()) or "none"
        raise LabSpecError(f"no lab package grader/labs/{name}/ (labs: {known})")
    spec = importlib.import_module(f"grader.labs.{name}").SPEC
    if not isinstance(spec, LabSpec) or spec.name != name:
        raise LabSpecError(f"grader/labs/{name}/__init__.py must declare SPEC = LabSpec(name={name!r}, ...)")
    for other in _LOADED.values():
        if other.spec.prefix == spec.prefix:
            raise LabSpecError(f"labs {other.name} and {name} share the task prefix {spec.prefix!r}")
    _LOADED[name] = Lab(spec)
    return _LOADED[name]


GRADING_SIDE = ("grading.py", "samples.py", "attacks.py")  # never in a learner's sandbox or image


def grading_side_paths() -> list[Path]:
    """Files of every lab package that only the checker may read (and the bytecode caches that would copy them)."""
    paths = []
    for name in names():
        folder = LABS_DIR / name
        paths += [folder / f for f in GRADING_SIDE if (folder / f).is_file()]
        # The cache folder is made now if it can be: a sandbox sees files its host writes later, and a grading
        # process importing grading.py beside a running sandbox would otherwise leave its bytecode in view.
        try:
            (folder / "__pycache__").mkdir(exist_ok=True)
        except OSError:  # a read-only install: nobody can write bytecode there either
            pass
        if (folder / "__pycache__").is_dir():
            paths.append(folder / "__pycache__")
    return paths


def strip_grading_side(labs_dir: Path = LABS_DIR) -> list[Path]:
    """Delete the grading side from a copy of the labs (a learner's image); returns what was removed."""
    import shutil

    removed = []
    for folder in sorted(p for p in Path(labs_dir).iterdir() if (p / "__init__.py").is_file()):
        for f in GRADING_SIDE:
            if (folder / f).is_file():
                (folder / f).unlink()
                removed.append(folder / f)
        if (folder / "__pycache__").is_dir():
            shutil.rmtree(folder / "__pycache__")
            removed.append(folder / "__pycache__")
    return removed


__all__ = ["GRADING_SIDE", "Lab", "grading_side_paths", "strip_grading_side", "LabSpec", "LabSpecError", "Task", "is_package", "load", "names",
           "notebook_problems"]
