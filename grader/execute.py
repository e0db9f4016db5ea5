"""grader.execute: turn one submission into a graded notebook.

1. `prepare`: rebuild the notebook from the lab's *source*, in the source's cell order.
   Solution cells come from the submission (matched by nbgrader `grade_id`); every other
   identified cell (instructions, setup, self-checks, graded cells) comes from the source, so a
   learner cannot edit or delete them. Cells the learner added keep their place after the cell
   they followed.
2. `execute`: run it in a sandboxed kernel, with wall-time and output limits, never
   stopping at an error: the executed notebook is the learner's feedback. The grade comes
   from the check stage (`grader.check_stage`), which runs after it, outside.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from . import notebook
from .sandbox import Limits, SandboxedKernelManager



class SubmissionError(ValueError):
    """A submission that cannot be graded as this lab (not a notebook, another lab's notebook...)."""


def lab_of(nb) -> set[str]:
    return {notebook.grade_id(c) for c in nb.cells if notebook.grade_id(c)}


def load_submission(path: Path, lab: str, source) -> nbformat.NotebookNode:
    """Read a submitted notebook, rejecting files that are not notebooks or belong to another lab."""
    from .catalogue import REPO_ROOT
    from .release import source_labs

    if not path.is_file():
        raise SubmissionError(f"no notebook was submitted (expected {path.name} in {path.parent})")
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as err:  # nbformat raises several types for bad JSON / schema
        raise SubmissionError(f"{path.name} is not a valid Jupyter notebook ({type(err).__name__}: "
                              f"{str(err)[:120]}); resubmit the .ipynb file saved by Jupyter") from None
    ids = lab_of(nb)
    wanted = {notebook.grade_id(c) for c in source.cells if (c.metadata.get("nbgrader", {}).get("solution"))}
    if ids & wanted:
        return nb
    for other in source_labs():
        if other == lab:
            continue
        other_src = notebook.read(REPO_ROOT / "solutions" / other / f"{other}.ipynb")
        if ids & {notebook.grade_id(c) for c in other_src.cells if c.metadata.get("nbgrader", {}).get("solution")}:
            raise SubmissionError(f"{path.name} is the notebook of lab {other!r}, not {lab!r}: submit it to {other}")
    raise SubmissionError(f"{path.name} has none of lab {lab!r}'s answer cells ({', '.join(sorted(wanted))}); "
                          f"start from labs/{lab}/{lab}.ipynb and keep its cells")


def prepare(source, submitted) -> nbformat.NotebookNode:
    """The notebook to execute: the learner's answer cells (and the cells they added) in the source."""
    by_id = {notebook.grade_id(c): c for c in submitted.cells if notebook.grade_id(c)}
    # Learner-added cells (no grade_id) stay after the identified cell they followed.
    extras: dict[str | None, list] = {}
    anchor = None
    for c in submitted.cells:
        gid = notebook.grade_id(c)
        if gid:
            anchor = gid
        else:
            extras.setdefault(anchor, []).append(c)
    cells = list(extras.get(None, []))
    for src in source.cells:
        gid = notebook.grade_id(src)
        meta = src.metadata.get("nbgrader", {})
        if meta.get("solution") and gid in by_id:
            cell = copy.deepcopy(by_id[gid])
            cell.metadata["nbgrader"] = copy.deepcopy(meta)  # the learner cannot re-label their cell as a test
        else:
            cell = copy.deepcopy(src)
            if meta.get("solution"):  # deleted by the learner: grade the stub
                cell.source = notebook.strip_solutions(cell.source)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
        cells.extend(copy.deepcopy(c) for c in extras.get(gid, []))
    nb = nbformat.v4.new_notebook(cells=cells, metadata=copy.deepcopy(source.metadata))
    return nb


@dataclass
class Execution:
    notebook: nbformat.NotebookNode
    seconds: float
    timed_out: bool = False
    kernel_died: bool = False
    output_truncated: bool = False
    error: str = ""
    kernel_log: str = ""
    failed_to_run: bool = False  # the kernel or the client failed for a reason of their own (not a time limit, not a crash)


class LimitedClient(NotebookClient):
    """nbclient that caps the bytes of output it keeps and stops the kernel when a submission floods."""

    def __init__(self, nb, max_output_bytes: int, **kw):
        super().__init__(nb, **kw)
        self.max_output_bytes = max_output_bytes
        self.output_bytes = 0
        self.truncated = False

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        result = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        # Which cells ran to their end (one cut off by the time limit has no error): tells a learner's cell that
        # started from an environment that failed before any learner code ran (`grader_fault`).
        cell.metadata.setdefault("inferlab", {})["completed"] = True
        return result

    def output(self, outs, msg, display_id, cell_index):
        size = len(str(msg.get("content", "")))
        self.output_bytes += size
        if self.output_bytes > self.max_output_bytes:
            if not self.truncated:
                self.truncated = True
                outs.append(nbformat.v4.new_output("stream", name="stderr", text=(
                    f"\n[grader] output limit of {self.max_output_bytes:,} bytes reached: further output dropped\n")))
            return None
        return super().output(outs, msg, display_id, cell_index)


# A Unix socket's path holds at most 107 bytes; ZeroMQ's kernel sockets are
# <folder>/inferlab-kernel-XXXXXXXX/sockets/kernel-N-suffix, about 50 bytes below the folder.
SOCKET_FOLDER_MAX = 55


def socket_parent(workdir: Path | None) -> str | None:
    """Where the kernel's private socket folder goes: the grading output folder when its path is
    short enough for Unix sockets, else the system's temporary folder (a deep --out must not break grading)."""
    if workdir is not None and len(str(Path(workdir).resolve())) <= SOCKET_FOLDER_MAX:
        return str(workdir)
    return None


def execute(nb, backend: str, limits: Limits, workdir: Path | None = None) -> Execution:
    """Run every cell in a sandboxed kernel; errors in cells are recorded, not raised."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inferlab-kernel-", dir=socket_parent(workdir)) as tmp:
        km = SandboxedKernelManager(backend, limits, Path(tmp) / "sockets")
        client = LimitedClient(nb, limits.output_bytes, km=km, timeout=limits.wall_s, allow_errors=True,
                               startup_timeout=120, record_timing=False)
        result = Execution(nb, 0.0)
        watchdog = threading.Timer(limits.wall_s, _kill, args=(km,))
        watchdog.daemon = True
        watchdog.start()
        try:
            client.execute(cleanup_kc=True)
        except CellTimeoutError:
            result.timed_out = True
            result.error = f"a cell ran past the time limit of {limits.wall_s:.0f} s"
        except DeadKernelError:
            result.kernel_died = True
            if time.perf_counter() - start >= limits.wall_s:
                result.timed_out = True
                result.error = f"the submission ran past the time limit of {limits.wall_s:.0f} s and was stopped"
            else:
                result.error = "the kernel died (a crash, or out of memory) while running a cell"
        except Exception as err:  # kernel failed to start, sandbox missing...
            result.error = f"{type(err).__name__}: {err}"
            result.failed_to_run = True
        finally:
            watchdog.cancel()
            _kill(km)
            km.close_log()
            result.kernel_log = km.kernel_log[-4000:]
        result.seconds = time.perf_counter() - start
        if result.seconds >= limits.wall_s and not result.error:
            result.timed_out = True
            result.error = f"the submission ran past the time limit of {limits.wall_s:.0f} s"
        result.output_truncated = client.truncated
        return result


# An import of the grader's own packages that fails means the sandbox cannot see them: nothing a learner did.
GRADER_PACKAGES = re.compile(r"No module named '(grader|inferlab)(\.[\w.]+)?'")


def grader_fault(run: Execution) -> str:
    """Why this run says nothing about the learner's work (the grader's environment failed), or ''.

    * a cell of the lab's own (setup, say) could not import `grader` or `inferlab`;
    * a cell of the lab's own failed before any of the learner's cells ran;
    * the kernel could not be run at all (not a time limit, not a crash) before any learner cell ran.
    A learner's own cells never count: an error there is theirs."""
    learner_started = False
    for c in run.notebook.cells:
        if c.cell_type != "code":
            continue
        meta = c.metadata.get("nbgrader", {})
        ours = bool(notebook.grade_id(c)) and not meta.get("solution")
        if not ours:
            learner_started = learner_started or c.metadata.get("inferlab", {}).get("completed", False) or bool(c.outputs)
            continue
        for out in c.get("outputs", []):
            if out.get("output_type") != "error":
                continue
            said = f"{out.get('ename')}: {out.get('evalue')}"
            where = f"(in the lab's cell {notebook.grade_id(c)!r})"
            if out.get("ename") in ("ModuleNotFoundError", "ImportError") and GRADER_PACKAGES.search(str(out.get("evalue"))):
                return (f"the sandbox could not import the grader: {said} {where}; check that the grader's packages "
                        "are visible inside the sandbox (`inferlab doctor`), then regrade")
            if not learner_started:
                return f"the lab's own setup failed before any of the learner's code ran: {said} {where}"
    if run.failed_to_run and not learner_started:
        return f"the submission's kernel could not be run: {run.error}"
    return ""


def _kill(km) -> None:
    """SIGKILL the kernel's whole process group (the sandbox dies with it); safe from any thread."""
    pid = getattr(getattr(km, "provisioner", None), "pid", None)
    if not pid:
        return
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
