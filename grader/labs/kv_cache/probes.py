"""grader.labs.kv_cache.probes: what the checker may ask of a learner's kv_cache answers, in their sandboxed process.

Each probe calls the learner's code on inputs the checker sent and returns plain data. None of
them holds an expected value or decides anything: `grading.py`, in the checker, does that.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from inferlab import ModelArgs

from ..common import tensor_bytes_held
from .public import KV4_NEW_TOKENS


def _int(value: Any, what: str) -> int:
    try:
        return operator.index(value)  # int, numpy and 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


def new_cache(session, args: dict, batch_size: int, max_seq_len: int) -> int:
    """KV1: a new ContiguousKVCache; the checker then drives its `update` layer by layer."""
    cache_cls = session.answer("ContiguousKVCache")
    return session.handle(cache_cls(ModelArgs(**args), batch_size, max_seq_len))


def generate(session, model: dict, prompt: list[int], max_new_tokens: int, sampling: dict) -> list[int]:
    """KV2/KV4: cached_generate with a model that runs in the checker (which counts what it processes)."""
    fn = session.answer("cached_generate")
    with torch.inference_mode():
        out = fn(session.model(model), list(prompt), max_new_tokens, **sampling)
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    return [_int(t, "each token cached_generate returns") for t in out]


def kv_bytes(session, args: dict, batch_size: int, seq_len: int, dtype: str) -> Any:
    """KV3: kv_cache_bytes on the checker's inputs."""
    fn = session.answer("kv_cache_bytes")
    got = fn(ModelArgs(**args), batch_size, seq_len, getattr(torch, dtype))
    return operator.index(got) if hasattr(got, "__index__") else got  # a float or a string goes back as it is


def cache_bytes(session, args: dict, batch_size: int, seq_len: int) -> list[Any]:
    """KV3: what a new cache's `nbytes` claims, and the bytes its tensors hold."""
    cache = session.answer("ContiguousKVCache")(ModelArgs(**args), batch_size, seq_len)
    claimed = cache.nbytes
    return [operator.index(claimed) if hasattr(claimed, "__index__") else claimed, tensor_bytes_held(cache)]


PROBES = {"new_cache": new_cache, "generate": generate, "kv_bytes": kv_bytes, "cache_bytes": cache_bytes}


def perf_contenders(role: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """What a timing worker (`grader.perf_worker`) runs for KV4, built from the cells it executed.

    The model is loaded here, not taken from the notebook's namespace, so both processes time
    the same untouched weights."""
    from inferlab import load_model, naive_generate

    fn = namespace.get("cached_generate")
    if not callable(fn):
        raise NameError("cached_generate is not defined by the KV2 answer cell")
    model = load_model("tiny")
    torch.set_grad_enabled(False)
    if role == "submission":
        return {"candidate": lambda prompt: fn(model, prompt, KV4_NEW_TOKENS)}
    return {"baseline": lambda prompt: naive_generate(model, prompt, KV4_NEW_TOKENS),
            "reference": lambda prompt: fn(model, prompt, KV4_NEW_TOKENS)}
