"""grader.labs.flash_attention.probes: what the checker may ask of a learner's flash_attention answers, in their sandboxed process.

Each probe calls the learner's code on inputs the checker sent (or, for FA1's 2048-token memory case, drew
from a seed the checker sent, so no input crosses the pipe while the process's memory is read) and returns
plain data. None of them holds an expected value or decides anything: `grading.py`, in the checker, does that.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from .public import MEMORY_BLOCK, counting, kernel_device, measure_peak, memory_inputs


def tiled(session, q, k, v, causal: bool, block_q: int, block_k: int) -> Any:
    """FA1: tiled_attention on the checker's inputs."""
    fn = session.answer("tiled_attention")
    with torch.no_grad():
        return fn(q, k, v, causal=bool(causal), block_q=int(block_q), block_k=int(block_k))


def tiled_memory(session, seed: int) -> dict[str, Any]:
    """FA1: tiled_attention, causal, at N = 2048 with 128 x 128 tiles, under the tensor-bytes meter."""
    fn = session.answer("tiled_attention")
    q, k, v = memory_inputs(int(seed))
    with torch.no_grad():
        output, measured = measure_peak(lambda: fn(q, k, v, causal=True, block_q=MEMORY_BLOCK, block_k=MEMORY_BLOCK))
    return {"measured": measured, "output": output}


def kernel(session, q, k, v, causal: bool, block_m: int, block_n: int) -> list[Any]:
    """FA2: flash_attention_forward on the checker's inputs; [o, L]."""
    fn = session.answer("flash_attention_forward")
    device = kernel_device()  # the checker's tensors are on the CPU; a compiled kernel needs them on the GPU
    out = fn(q.to(device), k.to(device), v.to(device), causal=bool(causal), block_m=int(block_m),
             block_n=int(block_n))
    return list(out) if isinstance(out, (tuple, list)) else out


def seam(session, q, k, v, mask, scale: float, layer: int) -> list[Any]:
    """FA2: flash_attention_fn, called by the checker's model for one layer; [output, kernel calls it made]."""
    fn = session.answer("flash_attention_fn")
    forward = session.answer("flash_attention_forward")
    counted, calls = counting(forward)
    session.ns["flash_attention_forward"] = counted  # the attention function looks the kernel up by name
    try:
        device = kernel_device()
        out = fn(q.to(device), k.to(device), v.to(device), mask.to(device), scale=float(scale), layer=int(layer),
                 cache=None)
    finally:
        if session.ns.get("flash_attention_forward") is counted:
            session.ns["flash_attention_forward"] = forward
    return [out, len(calls)]


def _plain(value: Any) -> Any:
    try:
        return operator.index(value) if not isinstance(value, bool) else value
    except TypeError:
        return value if isinstance(value, (int, float, str)) else repr(value)[:80]


def bytes_moved(session, cases: list[dict]) -> list[list[Any]]:
    """FA3: [flash_bytes_moved, naive_bytes_moved] for every case."""
    flash, naive = session.answer("flash_bytes_moved"), session.answer("naive_bytes_moved")
    out = []
    for c in cases:
        out.append([_plain(flash(c["batch"], c["heads"], c["seq_len"], c["head_dim"], c["block_m"], c["block_n"],
                                 bool(c["causal"]), c["element_bytes"])),
                    _plain(naive(c["batch"], c["heads"], c["seq_len"], c["head_dim"], c["element_bytes"]))])
    return out


def backward(session, q, k, v, o, L, do, causal: bool) -> Any:
    """FA4: flash_attention_backward on the checker's inputs; [dq, dk, dv]."""
    fn = session.answer("flash_attention_backward")
    with torch.no_grad():
        out = fn(q, k, v, o, L, do, causal=bool(causal))
    return list(out) if isinstance(out, (tuple, list)) else out


PROBES = {"tiled": tiled, "tiled_memory": tiled_memory, "kernel": kernel, "seam": seam,
          "bytes_moved": bytes_moved, "backward": backward}
