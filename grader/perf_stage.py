"""grader.perf_stage: a lab's graded performance task, timed against the baseline and the reference in one run.

After a submission's notebook has run, and only if its hidden test for the timed task
passed (the code is correct on that seed's inputs), the autograder:

1. starts two worker processes (`grader.perf_worker`), each in the same sandbox with the
   same limits and thread count: one runs the learner's answer cells again, the other the
   reference answer cells from the lab's source. The learner's process never holds the
   reference, so it cannot call or copy it;
2. drives them from here, interleaved round by round in a shuffled order (warm-up first,
   repeats until the ratio is stable: `inferlab.bench.compare`): the grader's baseline and
   the reference in the clean process, the learner's code in its own;
3. reads every clock itself, outside the sandbox: a reply counts only once the worker has
   sent the tokens it generated, so a patched timer or a deferred result buys nothing.
   Every round feeds a different prompt, so results cached by input are useless too;
4. checks the tokens of every timed call against the baseline's, and turns the two
   speedups into the task's verdict (the lab's `judge_timing`).

The verdict replaces the hidden test's result for that task, and is appended to the
hidden test cell's outputs so that the learner's feedback shows the numbers.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import notebook
from .checks import ERROR, FAILED, PASSED, CheckFailed, CheckResult
from .timed import TimedTask
from .sandbox import Limits, die_with_parent, sandbox_env, sandboxed


class WorkerFailed(RuntimeError):
    pass


class Worker:
    """One sandboxed `grader.perf_worker` process, spoken to over its stdin/stdout."""

    def __init__(self, lab: str, role: str, cells: list[str], backend: str, limits: Limits, private: Path,
                 deadline: float):
        self.role, self.deadline = role, deadline
        private = private.resolve()
        private.mkdir(parents=True, exist_ok=True)
        os.chmod(private, 0o777)
        cmd = sandboxed([sys.executable, "-m", "grader.perf_worker"], backend, limits, private)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=sandbox_env(backend, limits, private), start_new_session=True,
                                     preexec_fn=die_with_parent)
        self._buffer = b""
        self.send({"lab": lab, "role": role, "cells": cells, "threads": limits.threads or os.cpu_count() or 1})

    def send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(f"the {self.role} process exited (exit code {self.proc.poll()})") from None

    def receive(self) -> dict:
        """The next reply, waiting no later than the stage's deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerFailed(f"the {self.role} process exited (exit code {self.proc.wait()}): "
                                   "it crashed, ran out of memory, or exited")
            self._buffer += chunk
            if len(self._buffer) > 16 << 20:
                raise WorkerFailed(f"the {self.role} process sent an oversized reply")
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply

    def run(self, name: str, prompt: list[int]) -> dict:
        self.send({"run": name, "prompt": prompt})
        return self.receive()

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the sandbox and anything the code started
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def cells_for(nb, cell_ids: tuple[str, ...]) -> list[str]:
    """Sources of the named cells, each followed by the cells the learner added right after it."""
    out, keep = [], False
    for c in nb.cells:
        gid = notebook.grade_id(c)
        if gid:
            keep = gid in cell_ids
            if keep and c.cell_type == "code":
                out.append(c.source)
        elif keep and c.cell_type == "code":
            out.append(c.source)
    return out


def time_submission(lab: str, prepared, source, backend: str, limits: Limits, seed: int,
                    workdir: Path | None = None, spec: TimedTask | None = None) -> CheckResult:
    """Time the submission's code of the lab's timed task against the baseline and the reference."""
    from inferlab.bench import compare

    module = importlib.import_module(f"grader.labs.{lab}")
    spec = spec or module.TIMED
    start = time.monotonic()
    deadline = start + spec.max_seconds
    prompts = module.perf_prompts(seed, 1 + spec.rounds[1])
    # Timed results must equal the baseline's; a lab may accept a result that differs only where it
    # can show it is still right (continuous_batching: a near tie that another batch shape tipped).
    outputs_agree = getattr(module, "timed_outputs_agree", lambda inputs, got, want: False)
    tokens: dict[str, list[list[int]]] = {"baseline": [], "reference": [], "candidate": []}
    tampered: set[str] = set()
    workers: list[Worker] = []
    try:
        with tempfile.TemporaryDirectory(prefix="inferlab-timing-", dir=workdir) as tmp:
            learner = Worker(lab, "submission", cells_for(prepared, spec.cells), backend, limits,
                             Path(tmp) / "submission", deadline)
            workers.append(learner)
            clean = Worker(lab, "reference", cells_for(source, spec.cells), backend, limits,
                           Path(tmp) / "reference", deadline)
            workers.append(clean)
            try:
                learner.receive()
            except WorkerFailed as err:
                raise CheckFailed(f"your answer cells could not be run again for timing: {err}") from None
            clean.receive()

            def contender(worker: Worker, name: str):
                def call():  # the i-th call of every contender gets the i-th prompt: same work per round
                    i = len(tokens[name])
                    reply = worker.run(name, prompts[i])
                    tokens[name].append(reply["tokens"])
                    tampered.update(reply.get("tampered", []))
                    # Speed counts only for correct results, checked call by call: code that is right
                    # while tested but cuts corners while timed fails here.
                    if len(tokens["candidate"]) > i and len(tokens["baseline"]) > i \
                            and tokens["candidate"][i] != tokens["baseline"][i] \
                            and not outputs_agree(prompts[i], tokens["candidate"][i], tokens["baseline"][i]):
                        raise CheckFailed(f"while being timed, your code returned tokens that differ from the "
                                          f"baseline's for prompt {i + 1} (first 5: {tokens['candidate'][i][:5]}, "
                                          f"expected {tokens['baseline'][i][:5]}): timing counts only for correct "
                                          "results")
                return call

            try:
                result = compare({"baseline": contender(clean, "baseline"),
                                  "reference": contender(clean, "reference"),
                                  "candidate": contender(learner, "candidate")},
                                 baseline="baseline", warmup=1, min_rounds=spec.rounds[0], max_rounds=spec.rounds[1],
                                 rel_ci=spec.rel_ci, seed=seed,
                                 max_seconds=max(1.0, deadline - time.monotonic() - spec.slack_s))
            except WorkerFailed as err:
                raise CheckFailed(f"your code failed while being timed: {err}") from None
    except CheckFailed as err:
        return CheckResult(spec.task, FAILED, err.message, dict(err.measured), time.monotonic() - start)
    except TimeoutError:
        return CheckResult(spec.task, FAILED, f"timing did not finish within {spec.max_seconds:.0f} s: "
                           "make a generation call take well under a second", {}, time.monotonic() - start)
    except WorkerFailed as err:  # the reference side failed: a grader problem, not the learner's
        return CheckResult(spec.task, ERROR, f"the grader's reference process failed: {err}", {},
                           time.monotonic() - start)
    finally:
        for w in workers:
            w.close()
    try:
        measured = module.judge_timing(result, sorted(tampered))
        status, message = PASSED, ""
    except CheckFailed as err:
        measured, status, message = dict(err.measured), FAILED, err.message
    return CheckResult(spec.task, status, message, measured, time.monotonic() - start)


def apply(lab: str, result: dict, executed, source, backend: str, limits: Limits, seed: int,
          workdir: Path | None = None) -> dict:
    """Run the lab's timed task for a graded submission (if its gate passed) and fold the verdict into it."""
    module = importlib.import_module(f"grader.labs.{lab}")
    spec: TimedTask | None = getattr(module, "TIMED", None)
    if spec is None:
        return result
    task = next((t for t in result["tasks"] if t["cell"] == spec.gate), None)
    if task is None or not task["passed"]:
        return result  # not correct (or not reached): nothing to time, the gate's message stands
    timing = time_submission(lab, executed, source, backend, limits, seed, workdir)
    if not timing.passed:
        task.update(points=0.0, passed=False, message=timing.line()[:500])
    checks = [c for c in result["checks"] if c["task"] != spec.task]
    checks.append({"task": timing.task, "status": timing.status, "message": timing.message,
                   "measured": timing.measured, "seconds": round(timing.seconds, 2)})
    result["checks"] = checks
    result["points"] = sum(t["points"] for t in result["tasks"])
    import nbformat

    notebook.cell(executed, spec.gate).outputs.append(nbformat.v4.new_output("stream", name="stdout", text=(
        f"[grader] {spec.task} timed in separate processes, interleaved with the baseline and the reference:\n"
        f"{timing.line()}\n")))
    return result
