"""grader.check_stage: a submission's tasks, checked in a process that never runs learner code.

After the notebook has run (for the learner's feedback), the autograder:

1. starts one sandboxed `grader.answer_worker` and sends it the lab's locked defining cells,
   then the learner's answer cells (and the cells the learner added after them), in notebook
   order, as each task needs them;
2. for each task, runs the lab's hidden check here (`grading.py` of the lab's package). The
   check draws its inputs from a seed drawn now, computes the expected values itself, and
   reaches the learner's code only through `Learner`: probe calls that return plain data,
   a model served from here (so the positions it processes are counted here), and the
   learner's cache driven call by call;
3. turns each check's outcome into the task's points and message. A check that measures time and
   cannot tell (`TooNoisy`) makes its task *inconclusive*: not awarded, not a zero, listed in the
   result's `inconclusive` so the gradebook asks for its grade and `--retry-inconclusive` regrades it;
   so are the tasks that build on it.

A crash, a hang or a `NotImplementedError` in the learner's code fails that task, with the
reason; the process dying fails the tasks not yet checked. An exception in the checker's own
code is a grader error, never a learner's zero.
"""

from __future__ import annotations

import os
import select
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import notebook, wire
from .checks import (ERROR, FAILED, INCONCLUSIVE, NOT_ATTEMPTED, PASSED, RETRY_HINT, CheckFailed, CheckResult,
                     TooNoisy)
from .labs.common import one_torch_thread, positions_fed
from .sandbox import Limits, start_sandboxed, stop_sandboxed

MAX_SECONDS = 600.0  # the whole stage: start-up, the answer cells, every task's check
QUIET_SECONDS = 60.0  # the longest the answers' process may go without a reply (a cell, a call, a cache update)
BUSY_FRACTION = 0.25  # of those seconds on a CPU: a loop in the learner's code, not a starved machine


class WorkerDied(RuntimeError):
    """The process running the learner's answers exited, or sent something that is not the protocol."""


class LearnerRaised(Exception):
    """The learner's code raised; `message` names the error and the line."""

    def __init__(self, message: str, not_implemented: bool = False):
        super().__init__(message)
        self.message, self.not_implemented = message, not_implemented


class GraderFault(RuntimeError):
    """The checker itself could not do its job (a bug, a missing file): a grader error, never a learner's zero."""


class Starved(GraderFault):
    """The answers' process went quiet without using the CPU: the machine was too busy to tell anything."""


@dataclass
class ServedModel:
    """A model the checker runs on the learner's behalf, and what it was asked to do."""

    model: Any
    positions: int = 0  # tokens processed, summed over every forward call (batch rows x new tokens)
    calls: list[tuple[int, int]] = field(default_factory=list)  # (batch rows, tokens per row) of each call
    fed: list[int] = field(default_factory=list)  # the positions of batch row 0, in the order they were fed


class Learner:
    """The learner's answers in a sandboxed process: every call returns plain data, or raises `LearnerRaised`."""

    def __init__(self, lab: str, backend: str, limits: Limits, private: Path, deadline: float,
                 quiet_s: float = QUIET_SECONDS):
        self.deadline, self.quiet_s = deadline, quiet_s
        # The answers' private folder: the sandbox binds it at this same path, so it is the one folder both sides
        # see (serving's checks put a Unix socket there to talk to the learner's server).
        self.private = Path(private)
        self.proc = start_sandboxed("grader.answer_worker", backend, limits, private)
        self._buffer = b""
        self.models: dict[int, ServedModel] = {}
        self.tampered: set[str] = set()
        self._send({"setup": {"lab": lab, "threads": limits.threads or 1}})
        self._receive()

    # ------------------------------------------------------------------ the pipe
    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(wire.encode(message))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(self._exit_reason()) from None

    def _receive(self) -> dict[str, Any]:
        from .perf_stage import tree_cpu_s

        fd = self.proc.stdout.fileno()
        waited_from, cpu_before = time.monotonic(), tree_cpu_s(self.proc.pid)
        while b"\n" not in self._buffer:
            left = min(self.deadline, waited_from + self.quiet_s) - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                # Quiet too long. A learner's loop keeps a core busy; a starved machine leaves the process
                # waiting for one: then nothing can be said about the learner's code, and that is the verdict.
                busy = tree_cpu_s(self.proc.pid) - cpu_before
                quiet = time.monotonic() - waited_from
                if busy < BUSY_FRACTION * quiet:
                    raise Starved(f"the answers' process used {busy:.1f} s of CPU in {quiet:.0f} s without a reply: "
                                  "the machine is too busy to grade; regrade when it is quieter")
                raise TimeoutError
            chunk = os.read(fd, 1 << 22)
            if not chunk:
                raise WorkerDied(self._exit_reason())
            self._buffer += chunk
            if len(self._buffer) > wire.MAX_MESSAGE_BYTES:
                raise WorkerDied("the process running your answers sent an oversized reply")
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = wire.decode(line)
        except wire.WireError as err:
            raise WorkerDied(f"the process running your answers sent something that is not plain data: {err}") from None
        self.tampered.update(str(t) for t in message.pop("tampered", []) or [])
        return message

    def _exit_reason(self) -> str:
        code = self.proc.wait()
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            return (f"the process running your answers was killed by {name}"
                    + (" (out of memory, or a limit)" if name in ("SIGKILL", "SIGSEGV", "SIGXCPU") else ""))
        return f"the process running your answers exited (exit code {code})"

    def _wait(self, *keys: str) -> dict[str, Any]:
        """The reply to the last request, serving the model for the learner's code meanwhile."""
        while True:
            message = self._receive()
            if any(k in message for k in keys):
                return message
            if "raised" in message:
                raise LearnerRaised(str(message["raised"]), bool(message.get("not_implemented")))
            if "forward" in message:
                self._serve_forward(message["forward"])
                continue
            raise WorkerDied(f"the process running your answers broke the protocol (sent {sorted(message)[:3]})")

    # ------------------------------------------------------------------ what checks use
    def exec(self, source: str, cell: str = "", trusted: bool = False) -> str:
        """Run a cell; '' or what it raised (an answer cell that raises is the learner's business, as in a notebook)."""
        self._send({"exec": source, "cell": cell, "trusted": trusted})
        return str(self._wait("done").get("raised") or "")

    def call(self, probe: str, **args: Any) -> Any:
        """Call one of the lab's probes with plain arguments; its plain result."""
        self._send({"call": probe, "args": args})
        return self._wait("result")["result"]

    def serve(self, model: Any) -> dict[str, Any]:
        """An argument that stands for `model` in a probe call: the learner's code gets a RemoteModel."""
        key = len(self.models)
        self.models[key] = ServedModel(model)
        dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        return {"model": key, "args": model.args.to_dict(), "dtype": dtype}

    def served(self, spec: dict[str, Any]) -> ServedModel:
        return self.models[spec["model"]]

    def cache(self, handle: int, args: Any) -> "RemoteCache":
        return RemoteCache(self, handle, args)

    def _serve_forward(self, request: Any) -> None:
        """The learner's code called a served model: run it here, count the work, answer with the logits."""
        import torch

        try:
            if not isinstance(request, dict) or request.get("model") not in self.models:
                raise CheckFailed("the model was called with an unknown model handle")
            served = self.models[request["model"]]
            tokens, pos, mask = request.get("tokens"), request.get("input_pos"), request.get("attention_mask")
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
                raise CheckFailed(f"tokens must be an integer tensor [batch, new tokens], got {_describe(tokens)}")
            for name, value in (("input_pos", pos), ("attention_mask", mask)):
                if value is not None and not isinstance(value, torch.Tensor):
                    raise CheckFailed(f"{name} must be a tensor or None, got {_describe(value)}")
            cache = None if request.get("cache") is None else RemoteCache(self, int(request["cache"]),
                                                                           served.model.args)
            served.calls.append((int(tokens.shape[0]), int(tokens.shape[1])))
            served.positions += int(tokens.numel())
            served.fed += positions_fed(tokens, pos)
            with torch.no_grad():
                logits = served.model(tokens.long(), None if pos is None else pos.long(), cache,
                                      None if mask is None else mask.bool())
            self._send({"logits": logits})
        except (CheckFailed, LearnerRaised) as err:
            self._send({"forward_error": getattr(err, "message", str(err))})
        except (ValueError, IndexError, RuntimeError) as err:  # what the real model raises for bad arguments
            self._send({"forward_error": f"{type(err).__name__}: {err}"[:600]})

    def close(self) -> None:
        stop_sandboxed(self.proc)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{list(shape) if shape is not None else ''} {getattr(value, 'dtype', '')}".strip()


class RemoteCache:
    """The learner's cache, seen from the checker: `update` is a call into the learner's process, and what comes
    back is checked before the model uses it."""

    def __init__(self, learner: Learner, handle: int, args: Any):
        self.learner, self.handle, self.args = learner, handle, args

    def update(self, layer: int, input_pos, k, v):
        import torch

        self.learner._send({"update": {"cache": self.handle, "layer": layer, "input_pos": input_pos, "k": k, "v": v}})
        out = self.learner._wait("kv")["kv"]
        if not isinstance(out, list) or len(out) not in (2, 3):
            raise CheckFailed(f"cache.update must return (k_all, v_all), got {_describe(out)}")
        B, Hkv, _, D = k.shape
        need = int(input_pos.max()) + 1
        for name, t in zip(("k_all", "v_all"), out[:2]):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
                raise CheckFailed(f"cache.update returned {name} as {_describe(t)}; expected a float tensor "
                                  f"[batch, n_kv_heads, slots, head_dim]")
            if t.shape[0] != B or t.shape[1] != Hkv or t.shape[3] != D or t.shape[2] < need:
                raise CheckFailed(
                    f"update returned {name} of shape {list(t.shape)}; expected [batch={B}, n_kv_heads={Hkv}, "
                    f"S >= {need}, head_dim={D}]: store the n_kv_heads key/value heads you are given (grouped-query "
                    "attention shares them; do not repeat them to n_heads) and return slots 0..max(input_pos)")
        if out[0].shape != out[1].shape:
            raise CheckFailed(f"k_all {list(out[0].shape)} and v_all {list(out[1].shape)} differ in shape")
        if len(out) == 3 and (not isinstance(out[2], torch.Tensor) or out[2].dtype != torch.bool
                              or out[2].shape != (B, out[0].shape[2])):
            raise CheckFailed(f"a key mask must be a bool tensor [batch={B}, slots={out[0].shape[2]}], "
                              f"got {_describe(out[2])}")
        return (out[0].to(k.dtype), out[1].to(v.dtype), *out[2:])


# ---------------------------------------------------------------------- the stage

@dataclass
class TaskOutcome:
    task: str
    cell: str  # the grade_id of the task's graded cell
    points: float
    max_points: float
    result: CheckResult
    seed: int


def outcome(task: str, check: Callable[[Learner, int], dict[str, Any] | None], learner: Learner,
            seed: int) -> CheckResult:
    """Run one hidden check; classify what happened (never raises for what the learner's code did)."""
    start = time.perf_counter()
    try:
        # The checker's models run on one torch thread: the answers' process waits for each served call, and a
        # second thread spinning here takes the core it needs (measured on speculative_sampling's reference, whose
        # checks serve two models: 271 s with the default threads on a busy 2-core machine, 23 s on one).
        with one_torch_thread():
            measured = check(learner, seed) or {}
        result = CheckResult(task, PASSED, measured=dict(measured))
    except TooNoisy as err:  # a measurement that cannot tell: "don't know", never a pass or a fail
        result = CheckResult(task, INCONCLUSIVE, f"{err.message}; {RETRY_HINT}", dict(err.measured))
    except CheckFailed as err:
        result = CheckResult(task, FAILED, err.message, dict(err.measured))
    except LearnerRaised as err:
        if err.not_implemented:
            said = err.message.removeprefix("NotImplementedError: ")
            result = CheckResult(task, NOT_ATTEMPTED, said if "Task " in said else
                                 f"task {task} is not implemented yet ({said})")
        else:
            result = CheckResult(task, ERROR, f"your code raised {err.message}")
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def run(lab, executed, backend: str, limits: Limits, seeds: dict[str, int], workdir: Path | None = None,
        max_seconds: float = MAX_SECONDS) -> tuple[list[TaskOutcome], list[str]]:
    """Check every task of `lab` (a `grader.labs.Lab`) against the answers in the executed notebook.

    Returns each task's outcome, and the names the learner's process replaced (flags for the instructor)."""
    spec, grading = lab.spec, lab.grading
    start = time.monotonic()
    outcomes: list[TaskOutcome] = []
    stopped = ""
    learner = None
    defining = notebook.answer_cells(executed, spec.defining_cells)
    ran: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="inferlab-check-", dir=workdir) as tmp:
        try:
            learner = Learner(spec.name, backend, limits, Path(tmp) / "answers", start + max_seconds)
            for gid, source in defining:
                raised = learner.exec(source, gid, trusted=True)
                if raised:  # a locked cell, restored from the source: its failure is the environment's
                    raise GraderFault(f"the lab's locked cell {gid!r} failed in the answers' sandbox: {raised}")
            ran.update(spec.defining_cells)
            for task in spec.tasks:
                seed = seeds[task.id]
                unmet = [o.task for o in outcomes if o.task in task.requires and not o.result.passed]
                if stopped:
                    result = CheckResult(task.id, FAILED, stopped)
                elif unmet:  # it builds on work that is not right yet: checking it would judge that work again
                    statuses = {o.result.status for o in outcomes if o.task in unmet}
                    if statuses == {NOT_ATTEMPTED}:
                        result = CheckResult(task.id, NOT_ATTEMPTED, f"{task.id} builds on {', '.join(unmet)}, "
                                             f"which is not attempted yet: make {' and '.join(unmet)} pass first")
                    elif statuses == {INCONCLUSIVE}:  # not known yet, so neither is this task
                        result = CheckResult(task.id, INCONCLUSIVE, f"{task.id} builds on {', '.join(unmet)}, "
                                             f"whose grade is not known yet; {RETRY_HINT}")
                    else:
                        result = CheckResult(task.id, FAILED, f"{task.id} builds on {', '.join(unmet)}, which "
                                             f"did not pass: make {' and '.join(unmet)} pass first")
                else:
                    try:
                        for gid, source in notebook.answer_cells(executed, tuple(c for c in task.cells if c not in ran)):
                            learner.exec(source, gid)
                        ran.update(task.cells)
                        result = outcome(task.id, grading.HIDDEN_CHECKS[task.id], learner, seed)
                    except TimeoutError:
                        stopped = (f"grading stopped: your code ran for {learner.quiet_s:.0f} s without returning "
                                   f"(while checking {task.id}; the whole check may take {max_seconds:.0f} s): "
                                   "look for a loop that never ends")
                        result = CheckResult(task.id, FAILED, stopped)
                    except WorkerDied as err:
                        stopped = f"grading stopped while checking {task.id}: {err}"
                        result = CheckResult(task.id, FAILED, stopped)
                passed = result.passed
                outcomes.append(TaskOutcome(task.id, task.graded_cell, task.points if passed else 0.0, task.points,
                                            result, seed))
                if stopped and learner is not None:
                    learner.close()
        except GraderFault:
            raise
        except WorkerDied as err:  # before any task: the defining cells or the worker's start-up failed
            raise GraderFault(f"the answer process could not start: {err}") from None
        except TimeoutError:
            raise GraderFault(f"the answers' process did not start (it was busy for {QUIET_SECONDS:.0f} s "
                              "without a reply)") from None
        except Exception as err:  # noqa: BLE001 (a bug of the checker: never a learner's zero)
            raise GraderFault(f"the checker failed: {type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}") \
                from None
        finally:
            if learner is not None:
                learner.close()
    return outcomes, sorted(learner.tampered) if learner is not None else []


def apply(lab, result: dict, executed, backend: str, limits: Limits, seeds: dict[str, int],
          workdir: Path | None = None) -> dict:
    """Fold the out-of-process verdicts into a graded result, and show them under each graded cell."""
    import nbformat

    outcomes, tampered = run(lab, executed, backend, limits, seeds, workdir)
    result["tasks"] = [{"cell": o.cell, "points": o.points, "max_points": o.max_points, "passed": o.result.passed,
                        "message": "" if o.result.passed else o.result.line()[:500],
                        **({"inconclusive": True} if o.result.status == INCONCLUSIVE else {})} for o in outcomes]
    unknown = [o.task for o in outcomes if o.result.status == INCONCLUSIVE]
    if unknown:
        result["inconclusive"] = sorted(set(result.get("inconclusive", [])) | set(unknown))
    result["checks"] = [asdict(o.result) for o in outcomes]
    result["seeds"] = {o.cell: o.seed for o in outcomes}
    result["points"] = sum(o.points for o in outcomes)
    if tampered:
        result["tampered"] = tampered[:20]
    for o in outcomes:
        try:
            cell = notebook.cell(executed, o.cell)
        except KeyError:
            continue
        cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text=(
            f"[grader] {o.task}, checked outside your notebook on inputs drawn at grading time:\n"
            f"{o.result.line()}\n")))
    return result
