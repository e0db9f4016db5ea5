"""grader.labs.paged_attention.probes: what the checker may ask of a learner's paged_attention answers, in their
sandboxed process.

Each probe calls the learner's code on inputs the checker sent and returns plain data. None of them
holds an expected value or decides anything: `grading.py`, in the checker, does that. The batcher (PA4)
is driven call by call, on a model served from the checker, which counts every forward call's rows.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from inferlab import ModelArgs

from ..common import tensor_bytes_held
from .public import run_script as _run_script


def _int(value: Any, what: str) -> int:
    try:
        return operator.index(value)  # int, numpy and 0-d integer tensors; not floats
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


def _claimed(value: Any) -> Any:
    return operator.index(value) if hasattr(value, "__index__") else value  # a float or a string goes back as is


def run_script(session, cls: str, script: dict) -> list[dict]:
    """PA1/PA3: a scripted list of operations on a new allocator; each operation's result and the state after it."""
    if cls not in ("BlockAllocator", "PrefixCachingAllocator"):
        raise ValueError(f"no allocator class {cls!r} to script")
    return _run_script(session.answer(cls), script)


def new_paged_cache(session, args: dict, num_blocks: int, block_size: int) -> int:
    """PA2: a new PagedKVCache; the checker then asks for views and drives their `update` layer by layer."""
    return session.handle(session.answer("PagedKVCache")(ModelArgs(**args), num_blocks, block_size))


def view(session, cache: int, tables: list[list[int]]) -> int:
    return session.handle(session.objects[cache].view([list(t) for t in tables]))


def copy_block(session, cache: int, src: int, dst: int) -> None:
    session.objects[cache].copy_block(src, dst)


def cache_bytes(session, cache: int) -> list[Any]:
    """What the cache's `nbytes` claims, and the bytes its tensors hold."""
    obj = session.objects[cache]
    return [_claimed(obj.nbytes), tensor_bytes_held(obj)]


def new_batcher(session, model: dict, num_blocks: int, block_size: int, max_batch_size: int) -> int:
    """PA4: a new PagedBatcher on a served model; the checker then drives it call by call."""
    cls = session.answer("PagedBatcher")
    return session.handle(cls(session.model(model), num_blocks, block_size, max_batch_size))


def add_request(session, batcher: int, request_id: int, prompt: list[int], max_new_tokens: int) -> None:
    session.objects[batcher].add_request(request_id, list(prompt), max_new_tokens)


def step(session, batcher: int) -> dict[str, Any]:
    """One step(): its {request_id: token} as [[request_id, token], ...] (JSON keys would turn ids into strings)."""
    with torch.inference_mode():
        produced = session.objects[batcher].step()
    if not isinstance(produced, dict):
        return {"returned": type(produced).__name__}
    return {"produced": [[_int(rid, "a request id in step()'s result"),
                          _int(token, f"the token of request {rid} in step()'s result")]
                         for rid, token in produced.items()]}


def has_unfinished(session, batcher: int) -> bool:
    return bool(session.objects[batcher].has_unfinished)


def blocks(session, batcher: int) -> list[list[int]]:
    """[[request_id, number of blocks it holds], ...] from the batcher's allocator."""
    tables = dict(session.objects[batcher].allocator.block_tables)
    return [[_int(rid, "a block_tables key"), len(table)] for rid, table in tables.items()]


def batcher_bytes(session, batcher: int) -> list[Any]:
    obj = session.objects[batcher].cache
    return [_claimed(obj.nbytes), tensor_bytes_held(obj)]


PROBES = {"run_script": run_script, "new_paged_cache": new_paged_cache, "view": view, "copy_block": copy_block,
          "cache_bytes": cache_bytes, "new_batcher": new_batcher, "add_request": add_request, "step": step,
          "has_unfinished": has_unfinished, "blocks": blocks, "batcher_bytes": batcher_bytes}
