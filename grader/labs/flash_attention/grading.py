"""grader.labs.flash_attention.grading: the checker's side of the flash_attention lab. Never in a sandbox nor a learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed process reached
through the probes) and a seed drawn at grading time, computes what is expected here, and raises
`CheckFailed` with what to do next when the answer is wrong.

  FA1 tiled_attention on drawn shapes against float64 attention computed here; then the 2048-token memory
      case: the learner's process reports the peak bytes of torch tensors (its own meter, which it could
      forge), and this process reads that process's resident memory from outside (/proc: its peak resident
      set, reset just before the call), which it cannot; naive attention's peak is measured here.
  FA2 flash_attention_forward on drawn shapes (o and L against float64 attention); then the bundled model
      runs here with an attention function that sends each layer's q, k, v and mask to the learner's
      flash_attention_fn and checks each reply; its logits against the model's own, and the kernel calls.
  FA3 the byte counts against the formula, which lives only in this file.
  FA4 the gradients against autograd of float64 attention, computed here.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from ...checks import CheckFailed
from . import SPEC
from .public import (MEMORY_SEQ_LEN, ResidentPeak, byte_cases, memory_inputs, naive_memory,
                     verify_backward, verify_bytes, verify_kernel, verify_kernel_calls, verify_memory, verify_model,
                     verify_tiled)

LAB = SPEC.name


@functools.lru_cache(maxsize=1)
def bundled():
    from inferlab import load_model

    return load_model("tiny")


# ------------------------------------------------------------------------------------------------ FA3's formula

def expected_flash_bytes(batch: int, heads: int, seq_len: int, head_dim: int, block_m: int, block_n: int,
                         causal: bool, element_bytes: int) -> int:
    """Per batch x head and query tile: Q tile in, O tile out, each visited K and V tile in, L rows out (fp32)."""
    per_head = 0
    for tile in range(seq_len // block_m):
        keys = (tile + 1) * block_m if causal else seq_len
        visited = -(-keys // block_n)
        per_head += (2 * block_m + 2 * visited * block_n) * head_dim * element_bytes + 4 * block_m
    return batch * heads * per_head


def expected_naive_bytes(batch: int, heads: int, seq_len: int, head_dim: int, element_bytes: int) -> int:
    """QK^T (Q, K in; S out), softmax (S in; P out), PV (P, V in; O out): 4 N d + 4 N^2 elements per head."""
    return batch * heads * (4 * seq_len * head_dim + 4 * seq_len * seq_len) * element_bytes


def expected_bytes(cases: list[dict[str, Any]]) -> list[list[int]]:
    return [[expected_flash_bytes(c["batch"], c["heads"], c["seq_len"], c["head_dim"], c["block_m"], c["block_n"],
                                  c["causal"], c["element_bytes"]),
             expected_naive_bytes(c["batch"], c["heads"], c["seq_len"], c["head_dim"], c["element_bytes"])]
            for c in cases]


def public_expected() -> dict[str, Any]:
    """What `public_expected.json` must hold: the expected values of the self-checks' public inputs."""
    seed = SPEC.public_seed
    return {"FA3": {"seed": seed, "bytes": expected_bytes(byte_cases(seed))}}


# ------------------------------------------------------------------------------------------------ the checks

def hidden_fa1(learner, seed: int) -> dict[str, Any]:
    def tiled(q, k, v, causal, block_q, block_k):
        return learner.call("tiled", q=q, k=k, v=v, causal=causal, block_q=block_q, block_k=block_k)
    equal = verify_tiled(tiled, seed)
    memory_seed = int(np.random.default_rng(seed).integers(0, 2**31))
    with ResidentPeak(learner.proc.pid) as resident:
        reply = learner.call("tiled_memory", seed=memory_seed)
    if not isinstance(reply, dict) or not isinstance(reply.get("measured"), dict):
        raise CheckFailed("the memory measurement did not come back: keep tiled_attention's name and signature")
    measured = reply["measured"]
    for key in ("peak_bytes", "largest_bytes"):
        if not isinstance(measured.get(key), int):
            raise CheckFailed("the memory measurement came back malformed: keep tiled_attention's name and signature")
    memory = verify_memory(measured, reply.get("output"), memory_inputs(memory_seed), naive_memory(),
                           resident.growth_bytes)
    if resident.growth_bytes is None:
        memory["rss_growth_bytes"] = "not readable here"
    return {**equal, **memory, "memory_seq_len": MEMORY_SEQ_LEN}


def hidden_fa2(learner, seed: int) -> dict[str, Any]:
    def kernel(q, k, v, causal, block_m, block_n):
        return learner.call("kernel", q=q, k=k, v=v, causal=causal, block_m=block_m, block_n=block_n)
    out = verify_kernel(kernel, seed)
    calls = []

    def remote_attention(q, k, v, mask, *, scale, **context):
        reply = learner.call("seam", q=q, k=k, v=v, mask=mask, scale=float(scale), layer=int(context.get("layer", 0)))
        if not isinstance(reply, list) or len(reply) != 2:
            raise CheckFailed("flash_attention_fn's reply did not come back: keep its name and signature")
        o, n = reply
        if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(q.shape) or not o.is_floating_point():
            raise CheckFailed(f"flash_attention_fn returned {type(o).__name__} {list(getattr(o, 'shape', []))}; "
                              f"the model needs a float tensor of q's shape {list(q.shape)}")
        calls.append(int(n) if isinstance(n, int) else 0)
        return o.to(q.dtype)
    out.update(verify_model(remote_attention, bundled(), seed))
    verify_kernel_calls(sum(1 for n in calls if n >= 1), bundled().args.n_layers)
    return {**out, "layers_on_your_kernel": sum(1 for n in calls if n >= 1)}


def hidden_fa3(learner, seed: int) -> dict[str, Any]:
    cases = byte_cases(seed)
    answers = learner.call("bytes_moved", cases=cases)
    if not isinstance(answers, list) or len(answers) != len(cases) or \
            not all(isinstance(a, list) and len(a) == 2 for a in answers):
        raise CheckFailed("flash_bytes_moved and naive_bytes_moved did not answer every case: keep their names "
                          "and signatures")
    flash_answers, naive_answers = iter(a[0] for a in answers), iter(a[1] for a in answers)
    return verify_bytes(lambda *case: next(flash_answers), lambda *case: next(naive_answers), cases,
                        expected_bytes(cases))


def hidden_fa4(learner, seed: int) -> dict[str, Any]:
    def backward(q, k, v, o, L, do, causal):
        return learner.call("backward", q=q, k=k, v=v, o=o, L=L, do=do, causal=causal)
    return verify_backward(backward, seed)


HIDDEN_CHECKS = {"FA1": hidden_fa1, "FA2": hidden_fa2, "FA3": hidden_fa3, "FA4": hidden_fa4}


# ------------------------------------------------------------------------------------------------ calibration

def calibrate(seed: int = 0, seq_len: int | None = None) -> dict[str, Any]:
    """FA1's memory bar, measured; and the speeds, which are reported, never graded.

    Memory (bytes, the same on every machine): the reference's peak tensor bytes and those of the sample
    that materialises the scores (`samples.MATERIALISES_FA1`), each over naive attention's, at FA1's memory
    case; the bar is their geometric mean, so both sides have the same margin.
    Speed: on a GPU, the reference Triton kernel against naive attention and SDPA, causal, fp16, warmed up
    and synchronised (`inferlab.bench.compare` synchronises around every call); on a CPU, the tiled PyTorch
    reference instead (the kernel would run in the interpreter, which says nothing about speed)."""
    import math

    from inferlab.bench import compare

    from .. import load
    from .public import (MEMORY_BLOCK, MEMORY_HEAD_DIM, MEMORY_HEADS, measure_peak, naive_attention, random_qkv)
    from .samples import MATERIALISES_FA1

    ns = load(LAB).reference_namespace()
    materialising = dict(ns)
    exec(MATERIALISES_FA1, materialising)
    q, k, v = memory_inputs(seed)
    naive = naive_memory()["peak_bytes"]

    def ratio(fn) -> float:
        return measure_peak(lambda: fn(q, k, v, causal=True, block_q=MEMORY_BLOCK, block_k=MEMORY_BLOCK))[1][
            "peak_bytes"] / naive
    reference_ratio, materialised_ratio = ratio(ns["tiled_attention"]), ratio(materialising["tiled_attention"])
    bar = round(math.sqrt(reference_ratio * materialised_ratio), 2)

    cuda = torch.cuda.is_available()
    n = seq_len or (4096 if cuda else 1024)
    heads = MEMORY_HEADS * (8 if cuda else 1)
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    q, k, v = (t.to(device) for t in random_qkv(np.random.default_rng(seed), 1, heads, heads, n, MEMORY_HEAD_DIM,
                                                 dtype))
    if cuda:
        label, ours = "triton", lambda: ns["flash_attention_forward"](q, k, v, causal=True, block_m=64, block_n=64)
    else:
        label, ours = "tiled", lambda: ns["tiled_attention"](q, k, v, causal=True, block_q=MEMORY_BLOCK,
                                                             block_k=MEMORY_BLOCK)
    result = compare({"naive": lambda: naive_attention(q, k, v, True), label: ours,
                      "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)},
                     baseline="naive", warmup=2, min_rounds=5, max_rounds=15, rel_ci=0.1)
    ours_x, sdpa_x = result.speedup(label), result.speedup("sdpa")
    speed = {f"{label}_speedup_vs_naive": round(ours_x, 2), "sdpa_speedup_vs_naive": round(sdpa_x, 2),
             "seq_len": n, "heads": heads, "head_dim": MEMORY_HEAD_DIM, "dtype": str(dtype).removeprefix("torch."),
             "rounds": result.rounds,
             "speed_note": (f"causal attention, N = {n}: {label} {ours_x:.2f}x and SDPA {sdpa_x:.2f}x over naive "
                            f"attention, interleaved, {result.rounds} rounds; reported, not graded")}
    memory = {"reference_peak_fraction": round(reference_ratio, 4),
              "materialised_peak_fraction": round(materialised_ratio, 4), "naive_peak_bytes": naive,
              "note": (f"peak tensor bytes over naive attention's ({naive:,} bytes) at q [1, {MEMORY_HEADS}, "
                       f"{MEMORY_SEQ_LEN}, {MEMORY_HEAD_DIM}], causal, {MEMORY_BLOCK} x {MEMORY_BLOCK} tiles: "
                       f"reference {reference_ratio:.3f}, materialised scores {materialised_ratio:.3f}; bar = their "
                       f"geometric mean = {bar}")}
    entry = {"FA1": {"max_peak_fraction_of_naive": bar, "calibration": {**memory, **({} if cuda else speed)}}}
    if cuda:
        entry["FA2"] = {"reported_only": True, "calibration": {**speed, "note": speed["speed_note"]}}
    return entry
