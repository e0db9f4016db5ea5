"""grader.labs.roi.probes: what the checker may ask of a learner's roi answers, in their sandboxed process.

Each probe calls the learner's code on inputs the checker sent and returns plain data (numbers,
what was raised, the shapes a model saw). None of them holds an expected value or decides
anything: `grading.py`, in the checker, does that.
"""

from __future__ import annotations

from typing import Any

from .public import observe_decode, observe_raising, plain_number, plain_numbers, plain_table

ROI1_FUNCTIONS = ("cost_per_million_tokens", "cost_per_query")


def _roi1(session, function: str):
    if function not in ROI1_FUNCTIONS:
        raise KeyError(f"{function!r} is not an ROI1 function")
    return session.answer(function)


def values(session, function: str, calls: list[list[float]]) -> list[Any]:
    """ROI1 (and ROI2/ROI3's 'your own ROI1'): one of the formulas on each input, positionally. What it raises
    propagates: the checker reports it (NotImplementedError: not attempted)."""
    fn = _roi1(session, function)
    return [plain_number(fn(*args)) for args in calls]


def impossible(session, calls: list[list[Any]]) -> list[dict[str, Any]]:
    """ROI1: [function, inputs] that must raise ValueError; what each raised or returned."""
    return [observe_raising(_roi1(session, function), args) for function, args in calls]


def table(session, scenarios: dict[str, dict[str, float]], queries_per_day: float, human_dollars_per_query: float,
          baseline: str) -> Any:
    """ROI2: what_if_table on the checker's scenarios, as plain rows."""
    fn = session.answer("what_if_table")
    return plain_table(fn(scenarios, queries_per_day, human_dollars_per_query, baseline=baseline))


def batch_costs(session, batch_sizes: list[int], seconds: list[float], new_tokens: int, gpu_dollars_per_hour: float,
                utilisation: float) -> Any:
    """ROI3: cost_by_batch_size on the checker's measurements."""
    fn = session.answer("cost_by_batch_size")
    return plain_numbers(fn(list(batch_sizes), list(seconds), new_tokens, gpu_dollars_per_hour, utilisation))


def build_model(session, args: dict[str, Any], seed: int) -> int:
    """ROI3: a real model built here from the checker's architecture and seed (a served model runs in the checker,
    so it cannot be timed); a handle the timing calls name it by."""
    from inferlab import ModelArgs

    from ..common import random_model

    return session.handle(random_model(ModelArgs(**args), seed))


def time_decode(session, model: int | dict[str, Any], batch_size: int, prompt_tokens: int, new_tokens: int,
                repeats: int) -> dict[str, Any]:
    """ROI3: time_batched_decode on a model built here (`build_model`'s handle) or served by the checker (a spec
    from `Learner.serve`): the seconds it returned and the batches the model saw here (the checker counts a
    served model's calls on its own side)."""
    fn = session.answer("time_batched_decode")
    target = session.model(model) if isinstance(model, dict) else session.objects[int(model)]
    return observe_decode(fn, target, batch_size, prompt_tokens, new_tokens, repeats)


PROBES = {"values": values, "impossible": impossible, "table": table, "batch_costs": batch_costs,
          "build_model": build_model, "time_decode": time_decode}
