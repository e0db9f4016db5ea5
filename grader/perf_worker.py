"""grader.perf_worker: one side of an out-of-process timing run (`python -m grader.perf_worker`).

The autograder times a learner's code against the grader's baseline and the reference in
*separate processes* (see `grader.perf_stage`): the learner's process never holds the
reference, so it can neither call nor copy it, and every clock that decides anything is
read by the driver, outside the sandbox, so patching a timer here changes nothing.

Protocol, one JSON object per line:
  stdin, first:  {"lab": "kv_cache", "role": "submission" | "reference", "cells": [source, ...], "threads": 1}
  stdout, first: {"ready": [contender names]}  or  {"error": "..."}
  stdin, then:   {"run": name, "prompt": [token ids]}
  stdout, then:  {"tokens": [...], "tampered": [clock names]}  or  {"error": "..."}
Whatever the cells print goes to /dev/null: only this protocol uses the real stdout.

`module_state` and `changed` also serve the answers' worker (`grader.answer_worker`), which
reports what learner code replaced as flags for the instructor.
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
    from . import perf  # bound (with the original clocks) before any learner code runs
    from .labs import load

    lab = load(setup["lab"])
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()  # cells may use magics or get_ipython(), as in the notebook
    tampered = perf.tampered_clocks
    for i, source in enumerate(setup["cells"]):
        result = shell.run_cell(source, store_history=False)
        err = result.error_before_exec or result.error_in_exec
        if err is not None:
            send({"error": f"cell {i + 1} of {len(setup['cells'])} raised {type(err).__name__}: {err}"[:800]})
            return 1
    try:
        contenders = lab.perf_contenders(setup["role"], shell.user_ns)
    except Exception as err:  # e.g. the function to time is not defined
        send({"error": f"{type(err).__name__}: {err}"[:800]})
        return 1
    send({"ready": sorted(contenders)})
    for line in commands:
        command = loads(line)
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
