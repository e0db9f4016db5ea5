"""grader.labs.flash_attention.public: the flash_attention lab's checks (book ch. 8-9), FA1 to FA4, as a notebook sees them.

The notebook imports this module as `checks`. Each `check_faN` runs the learner's code here on the
public seed and compares it with plain attention computed in float64 (the definition, not an answer:
FA1 and FA2 ask for the tiled algorithm). Where a value would answer a task (FA3's byte counts), it is
stored in `public_expected.json`, written from the grading side.

The autograder runs the same `verify_*` functions in its own process, on seeds drawn at grading time,
against the learner's code in a sandboxed process (`grading.py`, `grader.check_stage`).

The learner's surface, fixed by the notebook (q: [B, H, N, D]; k, v: [B, Hkv, N, D]):
  FA1 `tiled_attention(q, k, v, causal=False, block_q=64, block_k=64) -> o` (H == Hkv), in PyTorch.
  FA2 `flash_attention_forward(q, k, v, causal=False, scale=None, block_m=16, block_n=16) -> (o, L)`, a
      Triton kernel (H a multiple of Hkv; L [B, H, N] float32), and `flash_attention_fn`, the model's
      attention function (`inferlab.model.AttentionFn`) that calls it.
  FA3 `flash_bytes_moved(batch, heads, seq_len, head_dim, block_m, block_n, causal, element_bytes)` and
      `naive_bytes_moved(batch, heads, seq_len, head_dim, element_bytes)`, both ints.
  FA4 `flash_attention_backward(q, k, v, o, L, do, causal=False) -> (dq, dk, dv)` (H == Hkv).

Equality rule (FlashAttention's own tests, or CS336's): the error against float64 attention is at most
twice that of a low-precision naive attention (bf16 for float32 inputs, the inputs' dtype otherwise),
or within rtol = atol = 1e-2.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checks import CheckFailed

LAB = "flash_attention"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")

MEMORY_SEQ_LEN, MEMORY_HEADS, MEMORY_HEAD_DIM = 2048, 4, 64  # FA1's memory case: [1, 4, 2048, 64] float32
MEMORY_BLOCK = 128  # the tile FA1's memory case asks for (fewer tiles: the measurement costs per op)
FORBIDDEN_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention")  # FA1 is yours, not SDPA's
LOGITS_ATOL = 1e-2  # FA2 in the model: 1e-5 in the interpreter (fp32); room for a GPU's tf32 dot; a wrong mask or
# grouped-query mapping moves the logits by far more


# ------------------------------------------------------------------------------------------------ the definition

def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in float64: (o [B, H, N, D], L [B, H, N] = logsumexp of each row of scaled scores).

    k and v may have fewer heads (grouped-query): query head h uses key/value head h // (H // Hkv)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # [B, H, N, N]
    if causal:
        s = s.masked_fill(causal_mask(s.shape[-2], s.shape[-1]).logical_not(), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def causal_mask(n_q: int, n_k: int) -> torch.Tensor:
    """[n_q, n_k] bool, True = attend: query i (the last n_q positions) sees keys 0..i + n_k - n_q."""
    return torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)


def naive_low_precision(q, k, v, causal: bool) -> torch.Tensor:
    """Naive attention in low precision (bf16 for float32 inputs, else the inputs' dtype): the error bar."""
    low = torch.bfloat16 if q.dtype == torch.float32 else q.dtype
    group = q.shape[1] // k.shape[1]
    ql, kl, vl = q.to(low), k.to(low).repeat_interleave(group, 1), v.to(low).repeat_interleave(group, 1)
    s = (ql @ kl.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(causal_mask(s.shape[-2], s.shape[-1]).logical_not(), float("-inf"))
    return torch.softmax(s, -1) @ vl


def compare(got: Any, want: torch.Tensor, low_error: float | None, what: str, hint: str,
            against: str = "attention") -> float:
    """The equality rule (FlashAttention's, with `low_error` the error of a low-precision naive attention, or
    CS336's rtol = atol = 1e-2; only the latter when `low_error` is None); the max error, or CheckFailed."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what} must be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what} has shape {list(got.shape)}; expected {list(want.shape)}")
    got64 = got.detach().to("cpu", torch.float64)
    if not torch.isfinite(got64).all():
        raise CheckFailed(f"{what} holds NaN or inf: {hint}")
    err = float((got64 - want).abs().max())
    close = bool(torch.allclose(got64, want, rtol=1e-2, atol=1e-2))
    if not close and (low_error is None or err > 2 * low_error):
        allowed = ("rtol = atol = 1e-2" if low_error is None else
                   f"{2 * low_error:.3g}, twice a low-precision naive attention's error, or rtol = atol = 1e-2")
        raise CheckFailed(f"{what} differs from {against} by up to {err:.3g} (allowed: {allowed}): {hint}",
                          max_abs_error=err)
    return err


def random_qkv(rng: np.random.Generator, batch: int, heads: int, kv_heads: int, n: int, d: int,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values with a spread of scores (std 1.5), so a max that moves between tiles is the rule."""
    def draw(h: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal((batch, h, n, d)) * 1.5).to(dtype)
    return draw(heads), draw(kv_heads), draw(kv_heads)


# ------------------------------------------------------------------------------------------------ FA1: equality

def tiled_cases(seed: int) -> list[dict[str, Any]]:
    """FA1's equality inputs: lengths that are not a multiple of the tile, tiles of several sizes, causal or not."""
    rng = np.random.default_rng(seed)
    cases = []
    for causal in (False, True, True):
        cases.append({"batch": int(rng.integers(1, 3)), "heads": int(rng.choice([1, 2, 4])),
                      "n": int(rng.integers(40, 200)), "d": int(rng.choice([16, 32, 64])), "causal": causal,
                      "block_q": int(rng.choice([16, 32, 64])), "block_k": int(rng.choice([16, 32, 64])),
                      "seed": int(rng.integers(0, 2**31))})
    return cases


def case_inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(case["seed"])
    heads = case["heads"]
    return random_qkv(rng, case["batch"], heads, case.get("kv_heads", heads), case["n"], case["d"],
                      getattr(torch, case.get("dtype", "float32")))


def verify_tiled(tiled: Callable[..., Any], seed: int) -> dict[str, Any]:
    """tiled(q, k, v, causal, block_q, block_k) equals attention on every case."""
    worst = 0.0
    cases = tiled_cases(seed)
    for case in cases:
        q, k, v = case_inputs(case)
        want, _ = attention64(q, k, v, case["causal"])
        got = tiled(q, k, v, case["causal"], case["block_q"], case["block_k"])
        shape = f"[{case['batch']}, {case['heads']}, {case['n']}, {case['d']}]"
        worst = max(worst, compare(
            got, want, float((naive_low_precision(q, k, v, case["causal"]).double() - want).abs().max()),
            f"tiled_attention's output (q {shape}, causal={case['causal']}, block_q={case['block_q']}, "
            f"block_k={case['block_k']})",
            "keep a running max m and a running sum l per query row; when the max grows, rescale both the sum "
            "and the accumulator by exp(m_old - m_new) before adding the new tile; divide by l at the end"
            + ("; in a causal tile, mask key j > query i with -inf" if case["causal"] else "")))
    return {"cases": len(cases), "max_abs_error": worst}


# ------------------------------------------------------------------------------------------------ FA1: memory

class PeakTensorBytes:
    """Bytes of tensor storage allocated while it is active and still alive: the peak, and the largest tensor.

    Every torch operator's outputs pass through it (a `TorchDispatchMode`); a new storage is counted when it
    appears and uncounted when it is freed (a weak reference on the storage), so views of one tensor count
    once and a tile freed each step does not add up. It also records the operators that ran."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._saw(func, out)
                return out

        self.mode = Mode()
        self.live = self.peak = self.largest = 0
        self.largest_shape: list[int] = []
        self.ops: set[str] = set()
        self._sizes: dict[tuple[int, int], int] = {}

    def _saw(self, func, out) -> None:
        from torch.utils._pytree import tree_flatten

        self.ops.add(str(getattr(func, "__name__", func)))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), id(storage))
            if not storage.data_ptr() or key in self._sizes:
                continue
            size = storage.nbytes()
            self._sizes[key] = size
            self.live += size
            weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.live)
            if size > self.largest:
                self.largest, self.largest_shape = size, list(t.shape)

    def _free(self, key) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def measure_peak(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, Any]]:
    """(fn's result, its peak tensor bytes, largest tensor and the operators it called)."""
    meter = PeakTensorBytes()
    with meter:
        out = fn(*args)
    return out, {"peak_bytes": int(meter.peak), "largest_bytes": int(meter.largest),
                 "largest_shape": meter.largest_shape, "ops": sorted(meter.ops)}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """What FA1 is measured against: scores, softmax and output, each materialised (the N^2 way)."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, N, N]
    if causal:
        s = s.masked_fill(causal_mask(s.shape[-2], s.shape[-1]).logical_not(), float("-inf"))
    return torch.softmax(s, -1) @ v


def memory_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return random_qkv(np.random.default_rng(seed), 1, MEMORY_HEADS, MEMORY_HEADS, MEMORY_SEQ_LEN, MEMORY_HEAD_DIM)


@functools.lru_cache(maxsize=1)
def naive_memory() -> dict[str, Any]:
    """Naive attention's peak at FA1's memory case, measured here (inputs do not change it, only shapes)."""
    q, k, v = memory_inputs(0)
    return measure_peak(naive_attention, q, k, v, True)[1]


def verify_memory(measured: dict[str, Any], output: Any, inputs: tuple[torch.Tensor, ...],
                  naive: dict[str, Any], rss_growth: int | None = None) -> dict[str, Any]:
    """FA1's memory: the tiled version, causal, at N = 2048, is right and its tensors peak at most a fraction of
    naive attention's (`max_peak_fraction_of_naive`, grader/thresholds/flash_attention.json).

    `measured` comes from the learner's process (PeakTensorBytes around the call); when grading, the checker
    also reads the process's resident memory from outside (`rss_growth`, bytes), which code that hides
    its work from torch cannot shrink."""
    q, k, v = inputs
    want, _ = attention64(q, k, v, True)
    compare(output, want, float((naive_low_precision(q, k, v, True).double() - want).abs().max()),
            f"tiled_attention's output at N = {MEMORY_SEQ_LEN}", "make the equality check pass first")
    used = [op for op in measured.get("ops", []) if any(f in op for f in FORBIDDEN_OPS)]
    if used:
        raise CheckFailed(f"tiled_attention called {', '.join(used)}: FA1 asks for the tiled algorithm written with "
                          "matmuls, max, exp and sums, not a library's fused attention")
    from ...perf import threshold

    max_fraction = float(threshold(LAB, "FA1", "cpu")["max_peak_fraction_of_naive"])  # bytes: one bar everywhere
    n_sq = MEMORY_HEADS * MEMORY_SEQ_LEN * MEMORY_SEQ_LEN * 4  # one float32 [1, H, N, N]
    peak, naive_peak = int(measured["peak_bytes"]), int(naive["peak_bytes"])
    ratio = peak / naive_peak
    numbers = {"peak_bytes": peak, "naive_peak_bytes": naive_peak, "ratio_to_naive": round(ratio, 4),
               "largest_tensor": measured.get("largest_shape")}
    if ratio > max_fraction:
        raise CheckFailed(
            f"tiled_attention (causal, q [1, {MEMORY_HEADS}, {MEMORY_SEQ_LEN}, {MEMORY_HEAD_DIM}], "
            f"block_q = block_k = {MEMORY_BLOCK}) peaked at {peak / 2**20:.1f} MiB of tensors, {ratio:.0%} of naive "
            f"attention's {naive_peak / 2**20:.1f} MiB (at most {max_fraction:.0%} is allowed); its largest "
            f"tensor was {measured.get('largest_shape')}: never build the [N, N] scores, only one "
            "[block_q, block_k] tile per head at a time", **numbers)
    if rss_growth is not None:
        numbers["rss_growth_bytes"] = int(rss_growth)
        if rss_growth > n_sq:
            raise CheckFailed(
                f"your process's resident memory grew by {rss_growth / 2**20:.1f} MiB while tiled_attention ran, "
                f"more than one [{MEMORY_HEADS}, {MEMORY_SEQ_LEN}, {MEMORY_SEQ_LEN}] float32 matrix "
                f"({n_sq / 2**20:.0f} MiB), though its torch tensors peaked at {peak / 2**20:.1f} MiB: compute with "
                "torch tensors, one tile at a time (work done outside torch still counts)", **numbers)
    return numbers


# ------------------------------------------------------------------------------------------------ resident memory

def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def process_tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += _children(pid)
    return seen


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class ResidentPeak:
    """The largest growth of any process's resident memory in the learner's tree during a call, read from
    /proc: each process's peak (VmHWM) is reset to its current resident set just before (clear_refs 5).
    None when this machine does not allow it (then only the learner's own meter counts, which it says)."""

    def __init__(self, root: int):
        self.root, self.before = root, {}

    def __enter__(self):
        for pid in process_tree(self.root):
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                continue
            rss = _status_kib(pid, "VmRSS")
            if rss is not None:
                self.before[pid] = rss
        return self

    def __exit__(self, *exc):
        return False

    @property
    def growth_bytes(self) -> int | None:
        grown = [(_status_kib(pid, "VmHWM") or 0) - rss for pid, rss in self.before.items()]
        return max(grown) * 1024 if grown else None


def check_fa1(tiled: Callable[..., Any], seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """FA1 self-check: equality on the public cases, then the peak memory at N = 2048 against naive attention."""
    out = verify_tiled(lambda q, k, v, causal, bq, bk: tiled(q, k, v, causal=causal, block_q=bq, block_k=bk), seed)
    q, k, v = memory_inputs(seed)
    naive = naive_memory()
    with ResidentPeak(os.getpid()) as resident:
        output, measured = measure_peak(
            lambda: tiled(q, k, v, causal=True, block_q=MEMORY_BLOCK, block_k=MEMORY_BLOCK))
    return {**out, **verify_memory(measured, output, (q, k, v), naive, resident.growth_bytes)}


# ------------------------------------------------------------------------------------------------ FA2

def kernel_device() -> str:
    """Where a Triton kernel runs here: a GPU when there is one (compiled), else the CPU (the interpreter).
    The checks keep their inputs on the CPU and move them to this device for the kernel, and back."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def kernel_cases(seed: int) -> list[dict[str, Any]]:
    """FA2's inputs: small (the Triton interpreter runs every program in Python), grouped-query heads, lengths
    that are not a multiple of the tile, tiles of 16 and 32, float32 and float16 (the interpreter has no bf16)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i, causal in enumerate((False, True, True, False)):
        kv_heads = int(rng.choice([1, 2]))
        cases.append({"batch": int(rng.integers(1, 3)), "heads": kv_heads * int(rng.choice([1, 2])),
                      "kv_heads": kv_heads, "n": int(rng.integers(17, 72)), "d": int(rng.choice([16, 32])),
                      "causal": causal, "block_m": int(rng.choice([16, 32])), "block_n": int(rng.choice([16, 32])),
                      "dtype": "float16" if i == 3 else "float32", "seed": int(rng.integers(0, 2**31))})
    return cases


def verify_kernel(kernel: Callable[..., Any], seed: int) -> dict[str, Any]:
    """kernel(q, k, v, causal, block_m, block_n) -> (o, L): o by the equality rule, L within rtol = atol = 1e-2."""
    worst_o = worst_l = 0.0
    cases = kernel_cases(seed)
    for case in cases:
        q, k, v = case_inputs(case)
        want_o, want_l = attention64(q, k, v, case["causal"])
        got = kernel(q, k, v, case["causal"], case["block_m"], case["block_n"])
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"flash_attention_forward must return (o, L), got {type(got).__name__}")
        o, lse = got
        where = (f"q [{case['batch']}, {case['heads']}, {case['n']}, {case['d']}], {case['kv_heads']} key/value "
                 f"heads, {case['dtype']}, causal={case['causal']}, block_m={case['block_m']}, "
                 f"block_n={case['block_n']}")
        if isinstance(o, torch.Tensor) and o.dtype != q.dtype:
            raise CheckFailed(f"flash_attention_forward returned o as {o.dtype} for {q.dtype} inputs ({where}): "
                              "accumulate in float32, store in the inputs' dtype")
        worst_o = max(worst_o, compare(
            o, want_o, float((naive_low_precision(q, k, v, case["causal"]).double() - want_o).abs().max()),
            f"o ({where})",
            "check the online softmax (rescale acc and l by exp(m_old - m_new)), the masks of the last, partial "
            "tile (rows and columns past N), and, when causal, the mask inside the diagonal tile (key j <= query i)"))
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(want_l.shape) or lse.dtype != torch.float32:
            raise CheckFailed(f"L must be a float32 tensor {list(want_l.shape)} ({where}), got "
                              f"{getattr(lse, 'dtype', type(lse).__name__)} {list(getattr(lse, 'shape', []))}")
        lse64 = lse.detach().to("cpu", torch.float64)
        err_l = float((lse64 - want_l).abs().max())
        if not torch.allclose(lse64, want_l, rtol=1e-2, atol=1e-2):  # 1e-2: a GPU's tf32 dot for float32 inputs
            raise CheckFailed(f"L differs from the logsumexp of the scaled scores by up to {err_l:.3g} ({where}; "
                              "allowed: rtol = atol = 1e-2): L = m + log(l), natural log, with m the running max and "
                              "l the running sum, per query row", max_abs_error_L=err_l)
        worst_l = max(worst_l, err_l)
    return {"cases": len(cases), "max_abs_error_o": worst_o, "max_abs_error_L": worst_l}


def model_prompt(seed: int, vocab: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, vocab, (1, int(rng.integers(16, 40)))))


def verify_model(attention: Callable[..., Any], model, seed: int) -> dict[str, Any]:
    """The model with `attention` as its attention function gives its own logits (SDPA) on a drawn prompt.

    `attention` is the model's seam: a function of (q, k, v, mask, *, scale, **context); it must call the
    kernel (the caller counts calls where it can)."""
    tokens = model_prompt(seed, model.args.vocab_size).to(model.embed_tokens.weight.device)
    with torch.no_grad():
        want = model(tokens)
        before = model.layers[0].self_attn.attention_fn
        model.set_attention(attention)
        try:
            got = model(tokens)
        finally:
            model.set_attention(before)
    err = float((got - want).abs().max())
    if not err <= LOGITS_ATOL:
        raise CheckFailed(f"with flash_attention_fn as its attention, the model's logits differ from its own by up "
                          f"to {err:.3g} on a {tokens.shape[1]}-token prompt (at most {LOGITS_ATOL} is allowed): "
                          "flash_attention_fn gets q [B, H, T, D] and k, v [B, Hkv, S, D] (grouped-query: do not "
                          "assume H == Hkv), and scale; a plain prefill's mask is causal", max_abs_error=err)
    return {"prompt_tokens": int(tokens.shape[1]), "max_abs_logit_error": err}


def counting(kernel: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return kernel(*args, **kwargs)
    return counted, calls


def check_fa2(kernel: Callable[..., Any], attention_fn: Callable[..., Any], namespace: dict[str, Any] | None = None,
              seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """FA2 self-check: the kernel on the public cases, then the bundled model with flash_attention_fn.

    Pass `globals()` as namespace so the check can count the kernel calls flash_attention_fn makes."""
    from inferlab import load_model

    device = kernel_device()
    out = verify_kernel(lambda q, k, v, causal, bm, bn: kernel(q.to(device), k.to(device), v.to(device),
                                                               causal=causal, block_m=bm, block_n=bn), seed)
    model = load_model("tiny", device=device)
    counted, calls = counting(kernel)
    swap = namespace is not None and namespace.get("flash_attention_forward") is kernel
    if swap:  # flash_attention_fn looks the kernel up by name when it runs: count its calls
        namespace["flash_attention_forward"] = counted
    try:
        out.update(verify_model(attention_fn, model, seed))
    finally:
        if swap:
            namespace["flash_attention_forward"] = kernel
    if swap:
        verify_kernel_calls(len(calls), model.args.n_layers)
    return out


def verify_kernel_calls(calls: int, layers: int) -> None:
    if calls < layers:
        raise CheckFailed(f"flash_attention_fn called flash_attention_forward {calls} times in a forward pass of "
                          f"{layers} layers: the model's attention must run on your kernel, once per layer")


# ------------------------------------------------------------------------------------------------ FA3

def byte_cases(seed: int) -> list[dict[str, Any]]:
    """FA3's inputs: shapes and tiles (no answers). seq_len is a multiple of both tiles."""
    rng = np.random.default_rng(seed)
    cases = []
    for causal in (False, True, False, True):
        block_m, block_n = int(rng.choice([16, 32, 64, 128])), int(rng.choice([16, 32, 64, 128]))
        tile = max(block_m, block_n)
        cases.append({"batch": int(rng.integers(1, 9)), "heads": int(rng.choice([8, 16, 32, 64])),
                      "seq_len": tile * int(rng.integers(1, 65)), "head_dim": int(rng.choice([64, 128])),
                      "block_m": block_m, "block_n": block_n, "causal": causal,
                      "element_bytes": int(rng.choice([2, 4]))})
    return cases


def as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckFailed(f"{what} must return an int (bytes), got {type(value).__name__} {value!r}")
    return int.__index__(value)


def verify_bytes(flash_bytes: Callable[..., Any], naive_bytes: Callable[..., Any], cases: list[dict[str, Any]],
                 expected: list[list[int]]) -> dict[str, Any]:
    """flash_bytes_moved and naive_bytes_moved give the expected bytes for every case (from the caller: stored
    public values here, the checker's own formula when grading)."""
    ratios = []
    for case, (want_flash, want_naive) in zip(cases, expected):
        shape = (f"batch={case['batch']}, heads={case['heads']}, seq_len={case['seq_len']}, "
                 f"head_dim={case['head_dim']}, element_bytes={case['element_bytes']}")
        naive = as_int(naive_bytes(case["batch"], case["heads"], case["seq_len"], case["head_dim"],
                                   case["element_bytes"]), "naive_bytes_moved")
        if naive != want_naive:
            raise CheckFailed(f"naive_bytes_moved({shape}) = {naive}, expected {want_naive}: count S = QK^T (read Q "
                              "and K, write S), softmax (read S, write P) and O = PV (read P and V, write O)")
        tiles = f"block_m={case['block_m']}, block_n={case['block_n']}, causal={case['causal']}"
        flash = as_int(flash_bytes(case["batch"], case["heads"], case["seq_len"], case["head_dim"], case["block_m"],
                                   case["block_n"], case["causal"], case["element_bytes"]), "flash_bytes_moved")
        if flash != want_flash:
            raise CheckFailed(f"flash_bytes_moved({shape}, {tiles}) = {flash}, expected {want_flash}: per query tile, "
                              "read it once, read every key and value tile it visits (when causal, only up to the "
                              "one that holds its last row's diagonal), write its output tile and its rows of L "
                              "(float32)")
        ratios.append(want_naive / want_flash)
    return {"cases": len(cases), "naive_over_flash": [round(r, 2) for r in ratios]}


def public_expected() -> dict[str, Any]:
    """The stored expected values of the public inputs (written by the grader at release time)."""
    return json.loads(EXPECTED_PATH.read_text())


def check_fa3(flash_bytes: Callable[..., Any], naive_bytes: Callable[..., Any],
              seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """FA3 self-check: both byte counts against stored values for the public cases."""
    stored = public_expected()["FA3"]
    if seed != stored["seed"]:
        raise ValueError(f"expected values are stored for seed {stored['seed']} only")
    return verify_bytes(flash_bytes, naive_bytes, byte_cases(seed), stored["bytes"])


# ------------------------------------------------------------------------------------------------ FA4

def backward_cases(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"batch": int(rng.integers(1, 3)), "heads": int(rng.choice([1, 2])), "n": int(rng.integers(16, 80)),
             "d": int(rng.choice([16, 32])), "causal": causal, "seed": int(rng.integers(0, 2**31))}
            for causal in (False, True)]


def backward_inputs(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """q, k, v, do, and o and L from float64 attention (given, so FA4 does not depend on FA2), all float32."""
    q, k, v = case_inputs(case)
    do = torch.from_numpy(np.random.default_rng(case["seed"] + 1).standard_normal(tuple(q.shape))).float()
    o, lse = attention64(q, k, v, case["causal"])
    return {"q": q, "k": k, "v": v, "o": o.float(), "L": lse.float(), "do": do}


def expected_grads(inputs: dict[str, torch.Tensor], causal: bool) -> list[torch.Tensor]:
    """dq, dk, dv by autograd through float64 attention."""
    q, k, v = (inputs[n].double().requires_grad_() for n in ("q", "k", "v"))
    o, _ = attention64(q, k, v, causal)
    o.backward(inputs["do"].double())
    return [q.grad, k.grad, v.grad]


def verify_backward(backward: Callable[..., Any], seed: int) -> dict[str, Any]:
    """backward(q, k, v, o, L, do, causal) -> (dq, dk, dv) equals autograd's, within rtol = atol = 1e-2."""
    worst = 0.0
    cases = backward_cases(seed)
    for case in cases:
        inputs = backward_inputs(case)
        got = backward(**inputs, causal=case["causal"])
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"flash_attention_backward must return (dq, dk, dv), got {type(got).__name__}")
        for name, g, want in zip(("dq", "dk", "dv"), got, expected_grads(inputs, case["causal"])):
            where = (f"{name} (q [{case['batch']}, {case['heads']}, {case['n']}, {case['d']}], "
                     f"causal={case['causal']})")
            worst = max(worst, compare(g, want, None, where,
                                       "recompute P = exp(S - L) (masked when causal), then dV = P^T dO, dP = dO V^T, "
                                       "D = rowsum(dO * O), dS = P * (dP - D), dQ = dS K * scale, dK = dS^T Q * scale",
                                       against="autograd's gradient of attention"))
    return {"cases": len(cases), "max_abs_error": worst}


def check_fa4(backward: Callable[..., Any], seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """FA4 self-check: the gradients against autograd of float64 attention."""
    return verify_backward(backward, seed)


# ------------------------------------------------------------------------------------------------ speed (reported)

def report_speed(tiled: Callable[..., Any], seq_len: int = 1024, repeats: int = 3) -> dict[str, Any]:
    """Milliseconds of naive attention, the tiled version and SDPA on this machine (median of interleaved
    repeats). Reported, not graded: on a CPU the tiled Python loop is not expected to beat SDPA."""
    import statistics
    import time

    import torch.nn.functional as F

    q, k, v = random_qkv(np.random.default_rng(0), 1, MEMORY_HEADS, MEMORY_HEADS, seq_len, MEMORY_HEAD_DIM)
    contenders = {"naive": lambda: naive_attention(q, k, v, True),
                  "tiled": lambda: tiled(q, k, v, causal=True, block_q=MEMORY_BLOCK, block_k=MEMORY_BLOCK),
                  "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name, fn in contenders.items():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    return {"seq_len": seq_len, "ms": ms, "tiled_over_sdpa": round(ms["tiled"] / ms["sdpa"], 1)}
