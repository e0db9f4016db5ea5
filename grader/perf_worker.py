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
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> int:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    # The learner's prints, plots and warnings must not be mistaken for replies, nor flood anything.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    os.environ.setdefault("MPLBACKEND", "Agg")

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")

    setup = json.loads(sys.stdin.readline())
    import torch

    torch.set_num_threads(int(setup.get("threads") or 1))
    from . import perf  # binds the original clocks before any learner code runs

    lab = importlib.import_module(f"grader.labs.{setup['lab']}")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()  # cells may use magics or get_ipython(), as in the notebook
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
    for line in sys.stdin:
        command = json.loads(line)
        try:
            tokens = [int(t) for t in contenders[command["run"]](list(command["prompt"]))]
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the reply must come after the work, not after its launch
        except BaseException as err:  # noqa: BLE001 (anything the learner's code raises is reported)
            send({"error": f"{type(err).__name__}: {err}"[:800]})
            continue
        send({"tokens": tokens, "tampered": perf.tampered_clocks()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
