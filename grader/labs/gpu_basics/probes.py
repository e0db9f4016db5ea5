"""grader.labs.gpu_basics.probes: what the checker may ask of a learner's gpu_basics answers, in their sandbox.

Each probe calls the learner's code on inputs the checker sent and returns plain data. None of
them holds an expected value or decides anything: `grading.py`, in the checker, does that.
"""

from __future__ import annotations

import gc
import json
from typing import Any

import torch

from inferlab import ModelArgs

from .public import call_args, one_cpu_thread, plain, random_llama


def answer(session, function: str, inputs: dict[str, Any]) -> Any:
    """GB1, GB2, GB3's formula, GB4: one of the learner's functions (`public.SIGNATURES`) on the checker's inputs."""
    return plain(session.answer(function)(*call_args(function, inputs)))


def measure_served(session, model: dict[str, Any], steps: int) -> Any:
    """GB3: measure_decode_tokens_per_s on a model that runs in the checker (the stand-in of known speed), which
    counts each call and the shape of its tokens there."""
    with torch.no_grad():
        return plain(session.answer("measure_decode_tokens_per_s")(session.model(model), steps))


_BUILT: dict[str, torch.nn.Module] = {}  # the one random Llama this process holds: {its recipe: the model}


def measure_built(session, recipe: dict[str, Any], steps: int) -> Any:
    """GB3: measure_decode_tokens_per_s on a random-weight Llama built here from the checker's recipe (args, seed,
    dtype, device), on one CPU thread as the checker's own stopwatch runs. A served model could not be timed:
    every step would cross the pipe. Built on the first call, kept for the next rounds."""
    key = json.dumps(recipe, sort_keys=True)
    if key not in _BUILT:
        _BUILT.clear()
        gc.collect()
        if recipe["device"] != "cpu" and not torch.cuda.is_available():
            return {"unavailable": f"no {recipe['device']} device in the learner's sandbox"}
        _BUILT[key] = random_llama(ModelArgs(**recipe["args"]), recipe["seed"], getattr(torch, recipe["dtype"]),
                                   recipe["device"])
    with one_cpu_thread(recipe["device"]):
        return plain(session.answer("measure_decode_tokens_per_s")(_BUILT[key], steps))


def drop_built(session) -> bool:
    """GB3 is done with the random Llama: give its memory back."""
    _BUILT.clear()
    gc.collect()
    return True


PROBES = {"answer": answer, "measure_served": measure_served, "measure_built": measure_built,
          "drop_built": drop_built}
