"""grader.perf_worker: one side of an out-of-process timing run (`python -m grader.perf_worker`).

The autograder times a learner's code against the grader's baseline and the reference in
*separate processes* (see `grader.perf_stage`): the learner's process never holds the
reference, so it can neither call nor copy it, and every clock that decides anything is
read by the driver, outside the sandbox, so patching a timer here changes nothing.

Protocol, one JSON object per line:
  stdin, first:  {"lab": "kv_cache", "role": "submission" | "reference" | "verify", "cells": [source, ...],
                  "threads": 1}
  stdout, first: {"ready": [contender names]}  or  {"error": "..."}
  stdin, then:   {"run": name, "prompt": [token ids]}     (timing)
  stdout, then:  {"tokens": [...], "tampered": [clock names]}  or  {"error": "..."}
  stdin, then:   {"exec": source}  /  {"hidden": source}   (verify: answer cells, then hidden tests)
  stdout, then:  {"done": true, "raised": ""}  /  {"results": [check results], "raised": "", "tampered": [...]}
Whatever the cells print goes to /dev/null: only this protocol uses the real stdout.

The `verify` role re-runs a submission's hidden tests in a clean process (`grader.verify_stage`):
it records each check's result object itself instead of reading printed lines, and before and
after each hidden test compares every attribute of the grader, the runtime and the libraries
they use with a snapshot taken before any learner code ran, so code that replaces `grade`, a
check, `print` or a clock to fake a result is caught instead of believed.
"""

from __future__ import annotations

import json
import os
import sys


WATCHED = ("builtins", "json", "os", "sys", "io", "contextlib", "random", "numpy", "numpy.random", "torch",
           "torch.nn.functional")
# Clocks are the timing stage's business: it reads its own, outside, and reports replaced ones (which
# costs the timed task its points). Replacing a clock does not change what a correctness check finds.
CLOCKS = ("inferlab.bench._perf_counter", "inferlab.bench.time_once")


def module_state() -> dict[str, int]:
    """Identity of everything the checks rely on: module attributes of the grader, the runtime and
    the libraries they use, class attributes and function code of the grader and the runtime."""
    state = {}
    for name, module in list(sys.modules.items()):
        ours = name.split(".")[0] in ("grader", "inferlab")
        if module is None or not (ours or name in WATCHED):
            continue
        for key, value in list(vars(module).items()):
            state[f"{name}.{key}"] = id(value)
            if ours and isinstance(value, type) and value.__module__ == name:
                for attr, member in list(vars(value).items()):
                    state[f"{name}.{key}.{attr}"] = id(member)
            if ours and callable(value) and hasattr(value, "__code__"):
                state[f"{name}.{key}.__code__"] = id(value.__code__)
    torch = sys.modules.get("torch")
    if torch is not None:  # tensor methods: a patched comparison or arithmetic changes what any check computes
        resolved: dict[str, object] = {}
        for klass in reversed(torch.Tensor.__mro__):  # as attribute lookup resolves them: the subclass wins
            resolved.update(vars(klass))
        for attr, member in resolved.items():
            state[f"torch.Tensor.{attr}"] = id(member)
    return state


def changed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Names replaced or removed since `before` (new names are allowed: imports add them)."""
    return sorted(k for k, v in before.items() if after.get(k) != v and not k.startswith(CLOCKS))


def protocol_streams(binary: bool = False):
    """(replies, commands): this process's real stdout and stdin, kept for the protocol alone. Everything the
    learner's code prints, plots or warns goes to /dev/null: it must not be mistaken for a reply, nor flood."""
    replies = os.fdopen(os.dup(1), "wb", buffering=0) if binary else os.fdopen(os.dup(1), "w", buffering=1)
    commands = os.fdopen(os.dup(0), "rb" if binary else "r")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    os.environ.setdefault("MPLBACKEND", "Agg")
    return replies, commands


def main() -> int:
    reply, commands = protocol_streams()
    dumps, loads = json.dumps, json.loads

    def send(obj: dict) -> None:
        reply.write(dumps(obj, default=str) + "\n")

    setup = loads(commands.readline())
    import torch

    torch.set_num_threads(int(setup.get("threads") or 1))
    from . import checks, perf  # bound (with the original clocks) before any learner code runs

    from .labs import load

    lab = load(setup["lab"])
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()  # cells may use magics or get_ipython(), as in the notebook
    tampered = perf.tampered_clocks
    run_check, real_grade = checks.run_check, checks.grade
    for i, source in enumerate(setup["cells"]):
        result = shell.run_cell(source, store_history=False)
        err = result.error_before_exec or result.error_in_exec
        if err is not None:
            send({"error": f"cell {i + 1} of {len(setup['cells'])} raised {type(err).__name__}: {err}"[:800]})
            return 1
    if setup["role"] == "verify":
        contenders = {}
    else:
        try:
            contenders = lab.perf_contenders(setup["role"], shell.user_ns)
        except Exception as err:  # e.g. the function to time is not defined
            send({"error": f"{type(err).__name__}: {err}"[:800]})
            return 1
    # verify: after the lab's locked defining cells (trusted: restored from the source; they also let
    # torch finish wrapping itself, as loading a model does to torch.manual_seed), before any learner code.
    baseline = module_state() if setup["role"] == "verify" else {}
    send({"ready": sorted(contenders)})
    for line in commands:
        command = loads(line)
        if "exec" in command:  # verify: the next answer cell (or a cell the learner added)
            result = shell.run_cell(command["exec"], store_history=False)
            err = result.error_before_exec or result.error_in_exec
            send({"done": True, "raised": f"{type(err).__name__}: {err}"[:800] if err is not None else ""})
            continue
        if "hidden" in command:  # verify: a hidden test cell, its check results recorded, not printed
            edits = changed(baseline, module_state())
            recorded = []
            raised = ""
            if not edits:
                def recording_grade(task, check, *args, **kwargs):
                    outcome = run_check(task, check, *args, **kwargs)
                    recorded.append(outcome)
                    if not outcome.passed:
                        raise AssertionError(outcome.line())
                    return outcome

                checks.grade = recording_grade  # what the cell's `from grader.checks import grade` picks up
                shell.user_ns["checks"] = lab  # the lab's real checks, whatever the learner bound to the name
                try:
                    result = shell.run_cell(command["hidden"], store_history=False)
                finally:
                    checks.grade = real_grade
                err = result.error_before_exec or result.error_in_exec
                raised = f"{type(err).__name__}: {err}"[:800] if err is not None else ""
                edits = changed(baseline, module_state())
            send({"results": [] if edits else [vars(r) for r in recorded], "raised": raised, "tampered": edits[:20]})
            continue
        try:
            tokens = [int(t) for t in contenders[command["run"]](list(command["prompt"]))]
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the reply must come after the work, not after its launch
        except BaseException as err:  # noqa: BLE001 (anything the learner's code raises is reported)
            send({"error": f"{type(err).__name__}: {err}"[:800]})
            continue
        send({"tokens": tokens, "tampered": tampered()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
