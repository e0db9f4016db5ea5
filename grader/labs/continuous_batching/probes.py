"""grader.labs.continuous_batching.probes: what the checker may ask of a learner's continuous_batching answers, in
their sandboxed process.

Each probe calls the learner's code on inputs the checker sent and returns plain data. None of
them holds an expected value or decides anything: `grading.py`, in the checker, does that. The
model the learner's code gets is served from the checker, which records every call it makes.
The scheduler (CB2) is driven call by call by the checker: one probe call per `add_request`,
`step` and `has_unfinished`, so the checker knows which model calls each step made.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from .public import flatten, run_batcher, run_static


def _int(value: Any, what: str) -> int:
    try:
        return operator.index(value)  # int, numpy and 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


def _number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return float(value)  # numpy scalars too; a string or a list is reported, not sent
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}") from None


def _token_lists(out: Any, what: str) -> list[list[int]]:
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"{what} must return a list of token lists, got {type(out).__name__}")
    rows = []
    for b, row in enumerate(out):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise TypeError(f"{what} must return one list of tokens per prompt; item {b} is {type(row).__name__}")
        rows.append([_int(t, f"each token {what} returns") for t in row])
    return rows


def static_generate(session, model: dict, prompts: list[list[int]], max_new_tokens: Any,
                    eos_id: int | None) -> list[list[int]]:
    """CB1: static_batch_generate with a model that runs in the checker (which counts its calls)."""
    fn = session.answer("static_batch_generate")
    with torch.inference_mode():
        out = fn(session.model(model), [list(p) for p in prompts], max_new_tokens, eos_id=eos_id)
    return _token_lists(out, "static_batch_generate")


def new_batcher(session, model: dict, max_batch_size: int, token_budget: int, priority: bool,
                eos_id: int | None) -> int:
    """CB2/CB4: a new ContinuousBatcher on a served model; the checker then drives it call by call."""
    cls = session.answer("ContinuousBatcher")
    return session.handle(cls(session.model(model), max_batch_size, token_budget, priority=priority, eos_id=eos_id))


def add_request(session, batcher: int, request_id: int, prompt: list[int], max_new_tokens: int,
                priority: int) -> None:
    session.objects[batcher].add_request(request_id, list(prompt), max_new_tokens, priority=priority)


def step(session, batcher: int) -> dict[str, Any]:
    """One step(): its {request_id: token} as [[request_id, token], ...] (JSON keys would turn ids into strings)."""
    with torch.inference_mode():
        produced = session.objects[batcher].step()
    if not isinstance(produced, dict):
        return {"returned": type(produced).__name__}
    pairs = []
    for rid, token in produced.items():
        rid = operator.index(rid) if hasattr(rid, "__index__") else str(rid)[:40]
        pairs.append([rid, _int(token, f"the token of request {rid} in step()'s result")])
    return {"produced": pairs}


def has_unfinished(session, batcher: int) -> bool:
    return bool(session.objects[batcher].has_unfinished)


def serve_trace(session, model: dict, trace: list[dict], mode: str, max_batch_size: int,
                token_budget: int) -> dict[str, Any]:
    """CB3: serve_trace on the checker's trace; its numbers, as plain data (what is missing is left out)."""
    from inferlab.workloads import Request

    fn = session.answer("serve_trace")
    requests = [Request(r["id"], r["arrival_s"], tuple(r["prompt"]), r["max_new_tokens"]) for r in trace]
    stats = fn(session.model(model), requests, mode, max_batch_size, token_budget)
    if not isinstance(stats, dict):
        return {"returned": type(stats).__name__}
    out: dict[str, Any] = {}
    for key in ("tokens", "seconds", "tokens_per_s", "p50_s", "p99_s"):
        if key in stats:
            out[key] = _number(stats[key], f"serve_trace's {key!r}")
    if "latencies_s" in stats:
        values = stats["latencies_s"]
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        out["latencies_s"] = [_number(v, "each of serve_trace's latencies_s") for v in values]
    return out


PROBES = {"static_generate": static_generate, "new_batcher": new_batcher, "add_request": add_request, "step": step,
          "has_unfinished": has_unfinished, "serve_trace": serve_trace}


def perf_contenders(role: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """What a timing worker (`grader.perf_worker`) runs for CB4, built from the cells it executed: each contender
    serves one round's requests and returns every request's tokens, flattened.

    The model is loaded here, not taken from the notebook's namespace, so both processes time
    the same untouched weights."""
    from inferlab import load_model

    batcher_cls = namespace.get("ContinuousBatcher")
    if not callable(batcher_cls):
        raise NameError("ContinuousBatcher is not defined by the CB2 answer cell")
    model = load_model("tiny")
    torch.set_grad_enabled(False)
    if role == "submission":
        return {"candidate": lambda requests: flatten(run_batcher(batcher_cls, model, requests))}
    static_fn = namespace["static_batch_generate"]
    return {"baseline": lambda requests: flatten(run_static(static_fn, model, requests)),
            "reference": lambda requests: flatten(run_batcher(batcher_cls, model, requests))}
