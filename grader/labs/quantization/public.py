"""grader.labs.quantization.public: the quantization lab's checks (book ch. 7), tasks QZ1 to QZ6, as a notebook sees them.

The notebook imports this module as `checks`. Each `check_qzN` runs the learner's code here, on
the public seed, and compares with values stored in `public_expected.json` (written by
`inferlab release` from the grading side). This module holds no quantization formula: the
expected values of drawn inputs are computed in `grading.py` only.

The autograder runs the same `verify_*` functions in its own process, on seeds drawn at grading
time, against the learner's code in a sandboxed process (`probes.py` answers each `ask`).

The learner's surface, fixed by the notebook:
  QZ1 `quantize_int8(weight) -> (q int8 [out, in], scale float32 [out])`, `dequantize_int8(q, scale)`,
      `QuantLinear(linear)` with buffers `weight_int8`, `scale`, `bias` and `nbytes`.
  QZ2 `quantize_int4(weight, group_size) -> (packed uint8 [out, in/2], scales, offsets float32 [out, in/group])`
      (element 2j in the low nibble of byte j, 2j+1 in the high one), `dequantize_int4(packed, scales, offsets,
      group_size)`.
  QZ3 `int4_matmul(x [M, K], packed, scales, offsets, group_size) -> [M, N]`, a Triton kernel that dequantizes
      inside.
  QZ4 `Int8KVCache(args, batch_size, max_seq_len)` behind the `inferlab.KVCache` protocol, with `nbytes`.
  QZ5 `perplexity(model, tokens) -> float`.
  QZ6 INT8 decode tokens/s against fp32 on a memory-bound random Llama (timed by the autograder).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inferlab import ModelArgs, Transformer

from ...checks import CheckFailed
from ..common import random_args, tensor_bytes_held

LAB = "quantization"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")
GROUP_SIZES = (32, 64, 128, 256)
INT4_SCHEMES = (("int4", 32), ("int4", 64))  # tiny's ffn_dim, 704, is 11 x 64  # the two group sizes QZ5 measures
SCHEMES = (("fp32", None), ("int8", None), *INT4_SCHEMES)

# ask(probe, **plain inputs) -> plain outputs: the learner's code, in this process (a self-check) or in its
# sandbox (the autograder, through `probes.py`).
Ask = Callable[..., Any]


# ------------------------------------------------------------------------------------------------ shared helpers

def module_bytes_held(module: nn.Module) -> int:
    """Bytes of every distinct tensor storage a module and its submodules hold (parameters, buffers, and tensors
    kept as plain attributes, one level of containers deep): what the module really costs in memory."""
    seen, total = set(), 0
    for sub in module.modules():
        for v in _tensors_of(sub):
            ptr = v.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += v.untyped_storage().nbytes()
    return total


def _tensors_of(obj: Any) -> list[torch.Tensor]:
    values = list(vars(obj).values())
    for v in list(values):
        if isinstance(v, (list, tuple)):
            values.extend(v)
        elif isinstance(v, dict):
            values.extend(v.values())
    return [v for v in values if isinstance(v, torch.Tensor)]


def plain(value: Any) -> Any:
    """What a learner's function returned, as plain data: tensors and numbers pass, anything else is described."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return {"type": type(value).__name__}


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    if isinstance(value, dict) and "type" in value:
        return f"a {value['type']}"
    return f"a {type(value).__name__}"


def sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Signal-to-quantization-noise ratio of each row, in dB: 20 log10(|w| / |w - w_hat|)."""
    noise = (weight - approx).norm(dim=-1).clamp(min=1e-30)
    return 20 * torch.log10(weight.norm(dim=-1) / noise)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


def public_expected() -> dict[str, Any]:
    """The stored expected values of the public inputs (written by the grader at release time)."""
    return json.loads(EXPECTED_PATH.read_text())


def stored(task: str, seed: int) -> dict[str, Any]:
    data = public_expected()[task]
    if seed != data["seed"]:
        raise ValueError(f"expected values are stored for seed {data['seed']} only")
    return data


def as_tensors(value: Any, dtype: torch.dtype) -> Any:
    """Stored lists back to tensors (one level: a list of per-case nested lists)."""
    return [torch.tensor(v, dtype=dtype) for v in value]


def _check_rejects(ask: Ask, probe: str, cases: list[tuple[str, dict[str, Any]]], fix: str) -> None:
    """Each bad input must raise a ValueError (or TypeError) that says what is wrong; a result is a mistake."""
    for what, inputs in cases:
        got = ask(probe, **inputs)
        if not got.get("raised"):
            raise CheckFailed(f"{probe.split('_bad')[0]} accepted {what} and returned a result: raise a ValueError "
                              f"that names the problem ({fix})")
        if got["raised"] not in ("ValueError", "TypeError") or len(got.get("message", "").strip()) < 10:
            raise CheckFailed(f"for {what}, raise a ValueError with a message that names the problem and the fix; "
                              f"got {got['raised']}({got.get('message', '')!r})")


# ------------------------------------------------------------------------------------------------ QZ1: INT8

def int8_weight(rng: np.random.Generator, out_f: int, in_f: int) -> torch.Tensor:
    """A weight whose rows differ in magnitude by up to 300x, as real layers' output channels do: one scale for
    the whole tensor would leave the small rows only a few of the 255 levels."""
    row_scale = 10 ** rng.uniform(-2.0, 0.5, size=(out_f, 1))
    return torch.from_numpy(rng.standard_normal((out_f, in_f)) * row_scale).float()


def int8_cases(seed: int) -> dict[str, Any]:
    """QZ1's inputs: weights of drawn shapes (odd ones included), a Linear with and without bias, a random model."""
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(2, 48)), int(rng.integers(3, 130))) for _ in range(2)] + [(1, 1), (8, 256)]
    weights = [int8_weight(rng, o, i) for o, i in shapes]
    linears = []
    for bias in (True, False):
        out_f, in_f = int(rng.integers(3, 40)), int(8 * rng.integers(1, 12)) + int(rng.choice([0, 5]))
        linears.append({"weight": int8_weight(rng, out_f, in_f),
                        "bias": torch.from_numpy(rng.standard_normal(out_f)).float() if bias else None,
                        "x": torch.from_numpy(rng.standard_normal((2, 3, in_f))).float()})
    args = random_args(rng, max_seq_len=32)
    model_seed = int(rng.integers(0, 2**31))
    tokens = torch.from_numpy(rng.integers(0, args.vocab_size, (1, 12)))
    return {"weights": weights, "linears": linears, "model": {"args": args.to_dict(), "seed": model_seed,
                                                              "tokens": tokens}}


def int8_bad_inputs() -> list[tuple[str, dict[str, Any]]]:
    return [("a 1-D weight of shape [16]", {"weight": torch.randn(16)}),
            ("a 3-D weight of shape [2, 4, 8]", {"weight": torch.randn(2, 4, 8)}),
            ("an integer weight", {"weight": torch.ones(4, 8, dtype=torch.int32)})]


def verify_int8(ask: Ask, cases: dict[str, Any], expected: dict[str, Any], min_sqnr_db: float) -> dict[str, Any]:
    """quantize_int8 gives one symmetric scale per output row (amax / 127) and round-to-nearest codes; dequantize
    inverts it; QuantLinear computes with them, holds int8 codes and fp32 scales only, and swaps into the model
    through `replace_linears`."""
    worst_sqnr = math.inf
    for i, weight in enumerate(cases["weights"]):
        out_f, in_f = weight.shape
        got = ask("int8_quantize", weight=weight)
        if not isinstance(got, list) or len(got) != 2:
            raise CheckFailed(f"quantize_int8 must return (q, scale); got {_shape(got)}")
        q, scale = got
        if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or tuple(q.shape) != (out_f, in_f):
            raise CheckFailed(f"q must be an int8 tensor [out_features={out_f}, in_features={in_f}]; got {_shape(q)}: "
                              "store the codes as torch.int8, one byte per weight")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (out_f,):
            raise CheckFailed(f"scale must be a float32 tensor [out_features={out_f}] (one per output row); got "
                              f"{_shape(scale)}")
        want_q, want_scale = expected["q"][i], expected["scale"][i]
        if not torch.allclose(scale, want_scale, rtol=1e-5, atol=0):
            row = int(((scale - want_scale).abs() / want_scale).argmax())
            same = bool((scale == scale[0]).all()) and out_f > 1
            raise CheckFailed(
                f"scale[{row}] is {float(scale[row]):.6g}, expected {float(want_scale[row]):.6g} for a {out_f}x{in_f} "
                "weight" + (": every row got the same scale, which is per-tensor quantization; give each output row "
                            "its own scale, max(|row|) / 127" if same else
                            ": the symmetric per-channel scale of a row is max(|row|) / 127"),
                row=row)
        off = (q.int() - want_q.int()).abs()
        if int(off.max()) > 1 or float((off > 0).float().mean()) > 1e-3:
            approx = q.float() * want_scale[:, None]
            beyond_half = (weight - approx).abs() > want_scale[:, None] * 0.5 * (1 + 1e-4)
            raise CheckFailed(
                f"{int((off > 0).sum())} of {q.numel()} codes differ from round(w / scale) for a {out_f}x{in_f} weight"
                + (": codes are off by more than half a step, so they are truncated; round to the nearest code "
                   "(torch.round), then clamp to [-127, 127]" if bool(beyond_half.any()) else
                   ": q = clamp(round(w / scale), -127, 127)"), codes_differing=int((off > 0).sum()))
        deq = ask("int8_dequantize", q=want_q, scale=want_scale)
        if not isinstance(deq, torch.Tensor) or tuple(deq.shape) != (out_f, in_f) or not deq.is_floating_point():
            raise CheckFailed(f"dequantize_int8 must return a float tensor [{out_f}, {in_f}]; got {_shape(deq)}")
        if rel_error(deq, expected["dequantized"][i]) > 1e-6:
            raise CheckFailed("dequantize_int8(q, scale) must give q * scale, each row by its own scale "
                              f"(relative error {rel_error(deq, expected['dequantized'][i]):.2g})")
        row_sqnr = float(sqnr_db(weight, deq).min())
        worst_sqnr = min(worst_sqnr, row_sqnr)
        if row_sqnr < min_sqnr_db:
            raise CheckFailed(f"a row's SQNR is {row_sqnr:.1f} dB, under the bar of {min_sqnr_db} dB",
                              sqnr_db=round(row_sqnr, 1))
    _check_rejects(ask, "int8_quantize_bad", int8_bad_inputs(),
                   "quantize_int8 takes a 2-D floating-point weight [out_features, in_features]")

    for j, case in enumerate(cases["linears"]):
        got = ask("int8_linear", weight=case["weight"], bias=case["bias"], x=case["x"])
        out, want = got["out"], expected["linear_out"][j]
        if not isinstance(out, torch.Tensor) or out.shape != want.shape:
            raise CheckFailed(f"QuantLinear returned {_shape(out)} for input {list(case['x'].shape)}; expected shape "
                              f"{list(want.shape)}: [..., in_features] -> [..., out_features]")
        err = rel_error(out, want)
        if err > 1e-2:
            raise CheckFailed(f"QuantLinear's output differs from x @ dequantize_int8(q, scale).T + bias by {err:.2g} "
                              f"(relative; bias={case['bias'] is not None}): compute with the INT8 codes and scales, and "
                              "add the bias", relative_error=err)
        formula = expected["linear_bytes"][j]
        if got["held"] != formula:
            raise CheckFailed(f"QuantLinear of a {list(case['weight'].shape)} weight (bias={case['bias'] is not None}) "
                              f"holds {got['held']} bytes of tensors; INT8 codes, fp32 scales and the bias take "
                              f"{formula}: keep only those (no fp32 copy of the weight, not even in a submodule)",
                              held=got["held"], expected=formula)
        if got["claimed"] != got["held"]:
            raise CheckFailed(f"QuantLinear.nbytes says {got['claimed']!r} but the module holds {got['held']} bytes: "
                              "count the bytes of the tensors it keeps", claimed=got["claimed"], held=got["held"])

    got = ask("int8_model", **cases["model"])
    want = expected["model_logits"]
    err = rel_error(got["logits"], want) if isinstance(got.get("logits"), torch.Tensor) and \
        got["logits"].shape == want.shape else math.inf
    if len(got["replaced"]) != expected["model_linears"]:
        raise CheckFailed(f"replace_linears swapped {len(got['replaced'])} of the model's {expected['model_linears']} "
                          "Linears for QuantLinear: every Linear should be quantized")
    if err > 2e-2:
        raise CheckFailed(f"the model with every Linear swapped for QuantLinear gives logits {err:.2g} (relative) away "
                          "from the same model with dequantized weights", relative_error=err)
    if got["held"] != expected["model_bytes"]:
        raise CheckFailed(f"the quantized random model holds {got['held']} bytes; with INT8 Linears it should hold "
                          f"{expected['model_bytes']}", held=got["held"], expected=expected["model_bytes"])
    return {"min_row_sqnr_db": round(worst_sqnr, 1), "model_relative_error": float(f"{err:.2g}"),
            "quantized_model_bytes": got["held"], "fp32_model_bytes": expected["model_fp32_bytes"]}


def check_qz1(quantize_fn: Any, dequantize_fn: Any, linear_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """QZ1 self-check: INT8 codes, scales, round trip, QuantLinear and its bytes, against stored public values."""
    data = stored("QZ1", seed)
    expected = {"q": as_tensors(data["q"], torch.int8), "scale": as_tensors(data["scale"], torch.float32),
                "dequantized": as_tensors(data["dequantized"], torch.float32),
                "linear_out": as_tensors(data["linear_out"], torch.float32), "linear_bytes": data["linear_bytes"],
                "model_logits": torch.tensor(data["model_logits"]), "model_linears": data["model_linears"],
                "model_bytes": data["model_bytes"], "model_fp32_bytes": data["model_fp32_bytes"]}
    ask = local_ask({"quantize_int8": quantize_fn, "dequantize_int8": dequantize_fn, "QuantLinear": linear_cls})
    return verify_int8(ask, int8_cases(seed), expected, threshold_value("QZ1", "min_row_sqnr_db"))


# ------------------------------------------------------------------------------------------------ QZ2: INT4

def int4_weight(rng: np.random.Generator, out_f: int, in_f: int, group: int) -> torch.Tensor:
    """Groups that differ in magnitude and mean: a group boundary in the wrong place, or a symmetric scheme,
    shows."""
    n_groups = in_f // group
    g_scale = np.repeat(10 ** rng.uniform(-1.5, 0.5, size=(out_f, n_groups)), group, axis=1)
    g_shift = np.repeat(rng.uniform(-1.0, 1.0, size=(out_f, n_groups)), group, axis=1)
    return torch.from_numpy((rng.standard_normal((out_f, in_f)) + g_shift) * g_scale).float()


def int4_cases(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    groups = [int(g) for g in rng.permutation(GROUP_SIZES)[:3]]
    cases = []
    for group in groups:
        out_f, in_f = int(rng.integers(1, 12)), group * int(rng.integers(1, 3))
        cases.append({"weight": int4_weight(rng, out_f, in_f, group), "group_size": group})
    return cases


def int4_bad_inputs(seed: int) -> list[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng(seed + 1)
    group = int(rng.choice(GROUP_SIZES))
    odd_in = group * int(rng.integers(1, 3)) + int(rng.choice([2, 6, 10]))
    return [(f"in_features={odd_in} with group_size={group} (not a multiple)",
             {"weight": torch.randn(4, odd_in), "group_size": group}),
            ("group_size=48 (not one of 32, 64, 128, 256)", {"weight": torch.randn(4, 96), "group_size": 48}),
            ("group_size=16 (below 32)", {"weight": torch.randn(4, 64), "group_size": 16}),
            ("a 1-D weight", {"weight": torch.randn(64), "group_size": 32})]


def verify_int4(ask: Ask, cases: list[dict[str, Any]], bad: list[tuple[str, dict[str, Any]]],
                expected: dict[str, Any], min_sqnr_db: float) -> dict[str, Any]:
    """quantize_int4: asymmetric codes 0..15 per group (scale = (max - min) / 15, offset = min), rounded to the
    nearest, two per byte with element 2j in the low nibble; exact bytes; dequantize inverts it."""
    worst = math.inf
    for i, case in enumerate(cases):
        weight, group = case["weight"], case["group_size"]
        out_f, in_f = weight.shape
        n_groups = in_f // group
        got = ask("int4_quantize", weight=weight, group_size=group)
        if not isinstance(got, list) or len(got) != 3:
            raise CheckFailed(f"quantize_int4 must return (packed, scales, offsets); got {_shape(got)}")
        packed, scales, offsets = got
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or \
                tuple(packed.shape) != (out_f, in_f // 2):
            raise CheckFailed(f"packed must be a uint8 tensor [out_features={out_f}, in_features/2={in_f // 2}] (two "
                              f"4-bit codes per byte); got {_shape(packed)}")
        for name, t in (("scales", scales), ("offsets", offsets)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (out_f, n_groups):
                raise CheckFailed(f"{name} must be a float32 tensor [out_features={out_f}, in_features/group_size="
                                  f"{n_groups}] (one per group of {group} inputs in a row); got {_shape(t)}")
        held = sum(t.untyped_storage().nbytes() for t in (packed, scales, offsets))
        if held != expected["bytes"][i]:
            raise CheckFailed(f"the quantized {out_f}x{in_f} weight takes {held} bytes; packed codes plus fp32 scales "
                              f"and offsets take {expected['bytes'][i]}: return tensors that hold only those "
                              "(.contiguous().clone() a view of a larger tensor)", held=held)
        want_s, want_o = expected["scales"][i], expected["offsets"][i]
        for name, t, want in (("offsets", offsets, want_o), ("scales", scales, want_s)):
            if not torch.allclose(t, want, rtol=1e-5, atol=1e-7):
                at = tuple(int(x) for x in ((t - want).abs() == (t - want).abs().max()).nonzero()[0])
                raise CheckFailed(
                    f"{name}[{at[0]}, {at[1]}] is {float(t[at]):.6g}, expected {float(want[at]):.6g} (group_size="
                    f"{group}): group g of row r is w[r, g*group_size:(g+1)*group_size]; its offset is the group's "
                    "min and its scale (max - min) / 15", row=at[0], group=at[1])
        want_packed = expected["packed"][i]
        got_lo, got_hi = packed & 0x0F, packed >> 4
        want_lo, want_hi = want_packed & 0x0F, want_packed >> 4
        if bool((got_lo == want_hi).all() and (got_hi == want_lo).all()) and not bool((want_lo == want_hi).all()):
            raise CheckFailed("the nibbles are swapped: element 2j goes in the low 4 bits of byte j and element 2j+1 "
                              "in the high 4 bits (byte = q[2j] | q[2j+1] << 4)")
        off = torch.cat([(got_lo.int() - want_lo.int()).abs(), (got_hi.int() - want_hi.int()).abs()])
        if int(off.max()) > 1 or float((off > 0).float().mean()) > 1e-3:
            lower = bool((torch.cat([got_lo, got_hi]).int() <= torch.cat([want_lo, want_hi]).int()).all())
            raise CheckFailed(
                f"{int((off > 0).sum())} of {2 * packed.numel()} 4-bit codes differ from round((w - offset) / scale)"
                + (": every code that differs is lower, so the codes are truncated; round to the nearest "
                   "(torch.round) before clamping to 0..15" if lower else
                   ": check the rounding, the clamp to 0..15 and the nibble order"),
                codes_differing=int((off > 0).sum()))
        deq = ask("int4_dequantize", packed=want_packed, scales=want_s, offsets=want_o, group_size=group)
        if not isinstance(deq, torch.Tensor) or tuple(deq.shape) != (out_f, in_f) or not deq.is_floating_point():
            raise CheckFailed(f"dequantize_int4 must return a float tensor [{out_f}, {in_f}]; got {_shape(deq)}")
        err = rel_error(deq, expected["dequantized"][i])
        if err > 1e-6:
            raise CheckFailed(f"dequantize_int4 of the expected codes differs from q * scale + offset by {err:.2g} "
                              "(relative): unpack the low nibble as element 2j and the high one as 2j+1, then apply "
                              "each group's scale and offset", relative_error=err)
        row_sqnr = float(sqnr_db(weight, deq).min())
        worst = min(worst, row_sqnr)
        if row_sqnr < min_sqnr_db:
            raise CheckFailed(f"a row's SQNR is {row_sqnr:.1f} dB, under the bar of {min_sqnr_db} dB")
    _check_rejects(ask, "int4_quantize_bad", bad, "check the shape, and that group_size is 32, 64, 128 or 256 and "
                                                  "divides in_features")
    return {"min_row_sqnr_db": round(worst, 1), "group_sizes": [c["group_size"] for c in cases]}


def check_qz2(quantize_fn: Any, dequantize_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """QZ2 self-check: INT4 packed bytes, nibble order, rounding, group boundaries, rejections, round trip."""
    data = stored("QZ2", seed)
    expected = {"packed": as_tensors(data["packed"], torch.uint8), "scales": as_tensors(data["scales"], torch.float32),
                "offsets": as_tensors(data["offsets"], torch.float32),
                "dequantized": as_tensors(data["dequantized"], torch.float32), "bytes": data["bytes"]}
    ask = local_ask({"quantize_int4": quantize_fn, "dequantize_int4": dequantize_fn})
    return verify_int4(ask, int4_cases(seed), int4_bad_inputs(seed), expected, threshold_value("QZ2", "min_row_sqnr_db"))


# ------------------------------------------------------------------------------------------------ QZ3: the kernel

def kernel_cases(seed: int) -> list[dict[str, Any]]:
    """Small shapes (the interpreter runs every program in Python), most of them not multiples of any block size."""
    rng = np.random.default_rng(seed)
    cases = []
    for m, n in ((int(rng.integers(1, 4)), int(rng.integers(17, 70))), (int(rng.integers(17, 40)), int(rng.integers(3, 33))),
                 (16, 32)):
        group = int(rng.choice([32, 64]))
        k = group * int(rng.integers(1, 4))
        cases.append({"x": torch.from_numpy(rng.standard_normal((m, k))).float(),
                      "packed": torch.from_numpy(rng.integers(0, 256, (n, k // 2), dtype=np.uint8)),
                      "scales": torch.from_numpy(rng.uniform(0.01, 0.2, (n, k // group))).float(),
                      "offsets": torch.from_numpy(rng.uniform(-1.0, 0.0, (n, k // group))).float(),
                      "group_size": group})
    return cases


@contextmanager
def triton_launches() -> Any:
    """Counts Triton kernel launches in this process (compiled or interpreted), to tell a kernel from torch code."""
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # an older Triton without the interpreter
        pass
    counter = {"launches": 0}
    originals = {cls: cls.run for cls in classes}

    def counting(original):
        def run(self, *args, **kwargs):
            counter["launches"] += 1
            return original(self, *args, **kwargs)
        return run
    for cls in classes:
        cls.run = counting(originals[cls])
    try:
        yield counter
    finally:
        for cls, original in originals.items():
            cls.run = original


def verify_kernel(ask: Ask, cases: list[dict[str, Any]], expected: list[torch.Tensor]) -> dict[str, Any]:
    """int4_matmul equals x @ dequantize_int4(...).T on every shape, the unaligned ones included, and a Triton
    kernel did the work."""
    worst = 0.0
    for case, want in zip(cases, expected):
        m, n = case["x"].shape[0], case["packed"].shape[0]
        got = ask("int4_matmul", **case)
        out = got["out"]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, n):
            raise CheckFailed(f"int4_matmul returned {_shape(out)} for x [{m}, {case['x'].shape[1]}] and {n} output "
                              f"features; expected a tensor [{m}, {n}]")
        if got["launches"] < 1:
            raise CheckFailed("no Triton kernel ran: int4_matmul must launch your @triton.jit kernel (kernel[grid](...)),"
                              " which dequantizes inside; a PyTorch matmul is the reference, not the task")
        err = (out.double() - want.double()).abs()
        tol = 1e-4 * float(want.abs().max()) + 1e-5
        if not bool(torch.isfinite(out).all()) or float(err.max()) > tol:
            bad = (~torch.isfinite(out)) | (err > tol)
            rows, cols = bad.any(dim=1).nonzero().flatten(), bad.any(dim=0).nonzero().flatten()
            raise CheckFailed(
                f"int4_matmul differs from x @ dequantize_int4(...).T for M={m}, N={n}, K={case['x'].shape[1]}, "
                f"group_size={case['group_size']} in rows {rows.tolist()[:4]} and columns {cols.tolist()[:4]}"
                f"{'...' if len(cols) > 4 else ''} (max error {float(err.nan_to_num(math.inf).max()):.3g}): "
                "launch cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N) programs and mask the loads and stores at the edges",
                max_error=float(err.nan_to_num(1e30).max()))
        worst = max(worst, float(err.max()) / max(float(want.abs().max()), 1e-30))
    return {"shapes": [[c["x"].shape[0], c["packed"].shape[0], c["x"].shape[1]] for c in cases],
            "max_relative_error": float(f"{worst:.2g}")}


def check_qz3(matmul_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """QZ3 self-check: the Triton kernel against stored products on public shapes, aligned and not."""
    data = stored("QZ3", seed)
    ask = local_ask({"int4_matmul": matmul_fn})
    return verify_kernel(ask, kernel_cases(seed), as_tensors(data["out"], torch.float32))


# ------------------------------------------------------------------------------------------------ QZ4: KV cache

def kv_cases(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"bytes_args": [random_args(rng).to_dict() for _ in range(2)],
            "batch": int(rng.integers(1, 4)), "slots": int(rng.integers(16, 96)),
            "prompt": int(rng.integers(6, 20)), "total": 28,
            "prompt_seed": int(rng.integers(0, 2**31))}


@torch.no_grad()
def verify_kv_cache(new_cache: Callable[[ModelArgs, int, int], Any], cache_bytes: Callable[..., tuple[Any, int]],
                    cases: dict[str, Any], expected_bytes: list[int], fp32_bytes: list[int], bundled: Transformer,
                    max_rel_error: float) -> dict[str, Any]:
    """The INT8 cache, driven by the model (prefill, then one position per step), gives logits close to fp32
    recomputation; it holds exactly int8 codes plus one fp32 scale per token, head and layer for K and V."""
    from inferlab.workloads import prompts

    from inferlab import load_tokenizer

    args = bundled.args
    text = prompts(load_tokenizer("tiny"), 1, seed=cases["prompt_seed"], min_tokens=cases["total"],
                   max_tokens=cases["total"])[0]
    tokens = torch.tensor([text])
    want = bundled(tokens)  # [1, total, V], recomputed in fp32 at every position
    prefill, total = cases["prompt"], cases["total"]
    cache = new_cache(args, 1, total)
    got = [bundled(tokens[:, :prefill], torch.arange(prefill), cache)]
    for pos in range(prefill, total):
        got.append(bundled(tokens[:, pos:pos + 1], torch.tensor([pos]), cache))
    got = torch.cat(got, dim=1)
    err = rel_error(got, want)
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    if err > max_rel_error:
        raise CheckFailed(f"with your INT8 cache the logits are {err:.3g} (relative) away from fp32 recomputation; the "
                          f"bar is {max_rel_error}: quantize each token's key (and value) per head with its own scale "
                          "(max |x| / 127 over head_dim), round to nearest, and dequantize what you return",
                          relative_error=err)
    gains = []
    for a, want_bytes, full in zip(cases["bytes_args"], expected_bytes, fp32_bytes):
        claimed, held = cache_bytes(ModelArgs(**a), cases["batch"], cases["slots"])
        if held != want_bytes:
            raise CheckFailed(
                f"an Int8KVCache for batch {cases['batch']} x {cases['slots']} slots (n_layers={a['n_layers']}, "
                f"n_kv_heads={a['n_kv_heads']}, head_dim={a['dim'] // a['n_heads']}) holds {held} bytes; INT8 keys and "
                f"values plus one fp32 scale per token per head take {want_bytes} (fp32 would take {full})",
                held=held, expected=want_bytes)
        if not isinstance(claimed, int) or claimed != held:
            raise CheckFailed(f"Int8KVCache.nbytes says {claimed!r} but its tensors hold {held} bytes", held=held)
        gains.append(full / held)
    return {"relative_logit_error": float(f"{err:.3g}"), "argmax_agreement": round(agree, 3),
            "capacity_gain": [round(g, 2) for g in gains]}


def kv_cache_bytes_of(cache_cls: Any) -> Callable[[ModelArgs, int, int], tuple[Any, int]]:
    def measure(args: ModelArgs, batch: int, slots: int) -> tuple[Any, int]:
        cache = cache_cls(args, batch, slots)
        claimed = cache.nbytes
        return (int(claimed) if isinstance(claimed, (int, np.integer)) and not isinstance(claimed, bool) else claimed,
                tensor_bytes_held(cache))
    return measure


def check_qz4(cache_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """QZ4 self-check: your Int8KVCache, driven by the tiny model, against fp32 recomputation and the stored bytes."""
    from inferlab import load_model

    data = stored("QZ4", seed)
    return verify_kv_cache(lambda a, b, s: cache_cls(a, b, s), kv_cache_bytes_of(cache_cls), kv_cases(seed),
                           data["bytes"], data["fp32_bytes"], load_model("tiny"),
                           threshold_value("QZ4", "max_relative_logit_error"))


# ------------------------------------------------------------------------------------------------ QZ5: perplexity

def held_out_texts(seed: int, n: int = 2, length: int = 160) -> list[list[int]]:
    """Held-out text the tiny model never saw (standard-library files, 1 in 50 by path hash)."""
    from inferlab import load_tokenizer
    from inferlab.workloads import prompts

    return prompts(load_tokenizer("tiny"), n, seed=seed, min_tokens=length, max_tokens=length)


def verify_perplexity(ask: Ask, texts: list[list[int]], expected: dict[str, Any], max_increase: dict[str, float],
                      checker_ppl: Callable[[str, Any], float]) -> dict[str, Any]:
    """perplexity(model, tokens) agrees with the checker's on fp32 tiny; each scheme's weights, as the learner's code
    quantized them, cost at most the calibrated perplexity increase (computed from those weights by the checker)."""
    rows = {}
    got_fp32 = ask("perplexity", scheme="fp32", group_size=None, texts=texts)
    if not isinstance(got_fp32, (int, float)) or not math.isfinite(got_fp32):
        raise CheckFailed(f"perplexity must return a finite float; got {got_fp32!r}")
    want_fp32 = expected["fp32"]
    if abs(got_fp32 - want_fp32) > 1e-3 * want_fp32:
        raise CheckFailed(f"perplexity of fp32 tiny on held-out text is {got_fp32:.4f} by your function and "
                          f"{want_fp32:.4f} by the checker: exp(mean negative log-likelihood of tokens[1:] given the "
                          "tokens before), over every text, all tokens weighted alike", got=got_fp32, want=want_fp32)
    rows["fp32"] = round(want_fp32, 4)
    for scheme, group in SCHEMES[1:]:
        name = scheme if group is None else f"{scheme}-g{group}"
        weights = ask("quantized_weights", scheme=scheme, group_size=group)
        ppl = checker_ppl(name, weights)
        increase = ppl / want_fp32 - 1
        if increase > max_increase[name]:
            raise CheckFailed(f"tiny with your {name} weights has perplexity {ppl:.3f} against {want_fp32:.3f} in fp32 "
                              f"(+{increase:.1%}); the bar is +{max_increase[name]:.1%}", increase=increase)
        learner = ask("perplexity", scheme=scheme, group_size=group, texts=texts)
        if not isinstance(learner, (int, float)) or abs(learner - ppl) > 1e-2 * ppl:
            raise CheckFailed(f"your perplexity of tiny in {name} is {learner!r}; from your quantized weights the checker "
                              f"computes {ppl:.4f}", got=learner, want=ppl)
        rows[name] = round(ppl, 4)
    return {"perplexity": rows,
            "increase": {k: float(f"{v / rows['fp32'] - 1:.3g}") for k, v in rows.items() if k != "fp32"}}


def check_qz5(perplexity_fn: Any, quantize8: Any, dequantize8: Any, quantize4: Any, dequantize4: Any,
              linear_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """QZ5 self-check: your perplexity and your quantized tiny on held-out text, with your own dequantization (the
    autograder dequantizes your codes with its own)."""
    data = stored("QZ5", seed)
    answers = {"perplexity": perplexity_fn, "quantize_int8": quantize8, "dequantize_int8": dequantize8,
               "quantize_int4": quantize4, "dequantize_int4": dequantize4, "QuantLinear": linear_cls}
    ask = local_ask(answers)
    texts = held_out_texts(seed)

    def own_ppl(name: str, weights: dict[str, Any]) -> float:
        scheme, _, group = name.partition("-g")
        model = fake_quantized_tiny(weights, lambda w: dequantize8(*w) if scheme == "int8" else
                                    dequantize4(*w, int(group)))
        return float(perplexity_fn(model, texts))
    bars = {name: threshold_value("QZ5", "max_perplexity_increase")[name] for name in data["names"]}
    return verify_perplexity(ask, texts, data, bars, own_ppl)


def fake_quantized_tiny(weights: dict[str, Any], dequantize: Callable[[list[torch.Tensor]], torch.Tensor]) -> Transformer:
    """tiny with every Linear's weight replaced by a dequantized copy (the tie of the head to the embedding ended,
    as a quantized head does)."""
    from inferlab import load_model

    model = load_model("tiny")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                if name not in weights:
                    raise CheckFailed(f"no quantized weight came back for {name}: quantize every Linear")
                module.weight = nn.Parameter(dequantize(weights[name]).float().reshape(module.weight.shape))
    return model


# ------------------------------------------------------------------------------------------------ QZ6: speed

# A random Llama of 152M parameters, in the 100-300M range where one decode step is bound by reading the weights:
# 608 MB in fp32, beyond every cache of the machines the course runs on (this VM reports 480 MiB of L3), so each
# step streams its weights from memory. At one token per step, fp32 reads them at about 11 GB/s on one core here.
SPEED_ARGS = ModelArgs(vocab_size=16384, dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                       max_seq_len=64)
SPEED_SEED, SPEED_STEPS = 1234, 12


def speed_model() -> Transformer:
    """The timed model, the same weights in every process (random, seeded)."""
    torch.manual_seed(SPEED_SEED)
    with torch.device("meta"):
        model = Transformer(SPEED_ARGS)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.embed_tokens.weight if SPEED_ARGS.tie_embeddings else model.lm_head.weight
    gen = torch.Generator().manual_seed(SPEED_SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    model.reset_rope()
    return model.eval()


@torch.inference_mode()
def decode_steps(model: nn.Module, tokens: list[int]) -> list[int]:
    """len(tokens) decode steps, one token per forward as a KV-cached decode is: step i feeds tokens[i] at position
    i and returns the argmax of its logits. No cache is given here (the kv_cache lab builds one), so attention sees
    only the step's own token; that changes the logits, not the work of the Linears, which read every weight once
    per step, as in a cached decode. That read is what INT8 shrinks."""
    out = []
    for i, token in enumerate(tokens):
        logits = model(torch.tensor([[token]]), input_pos=torch.tensor([i]))
        out.append(int(logits[0, -1].argmax()))
    return out


def speed_prompts(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, SPEED_ARGS.vocab_size, SPEED_STEPS).tolist() for _ in range(n)]


def argmax_agreement(got: list[int], want: list[int]) -> float:
    return sum(int(a == b) for a, b in zip(got, want)) / max(len(want), 1)


# INT8 weights (and the bf16 activations PyTorch's int8 kernel takes) tip near ties of the random model's argmax:
# over 60 prompts of 12 steps the reference differs from fp32 at 4% of steps, agreeing at 10-12 of 12. A bar of
# 3/4 would fail a correct answer on about one prompt in 1,000 (4 or more ties of 12), and the timing stage checks
# every round's prompt; at 1/2 that is about one in 10 million. A model computing something else agrees at ~0.
MIN_SPEED_AGREEMENT = 0.5


def int8_speed_model(linear_cls: Any) -> nn.Module:
    """The timed model with every Linear swapped for the learner's QuantLinear (the head included)."""
    from inferlab import replace_linears

    model = speed_model()
    replace_linears(model, lambda name, linear: linear_cls(linear))
    return model


def verify_speed_ready(decode_int8: Callable[[list[int]], Any], fp32_model: nn.Module, seed: int) -> dict[str, Any]:
    """QZ6 times the INT8 model, so it must first decode like the fp32 one (the same argmax at most steps)."""
    prompt = speed_prompts(seed, 1)[0]
    want = decode_steps(fp32_model, prompt)
    got = decode_int8(prompt)
    if not isinstance(got, list) or len(got) != len(want):
        raise CheckFailed(f"decoding {len(prompt)} steps with QuantLinear returned {_shape(got)}")
    agree = argmax_agreement(got, want)
    if agree < MIN_SPEED_AGREEMENT:
        raise CheckFailed(f"with QuantLinear the random Llama predicts the fp32 model's token at only {agree:.0%} of "
                          f"{len(want)} decode steps (at least {MIN_SPEED_AGREEMENT:.0%} expected): make QZ1 pass first",
                          agreement=agree)
    return {"argmax_agreement": round(agree, 2), "steps": len(want)}


@torch.inference_mode()
def check_qz6_speed(linear_cls: Any, seed: int = PUBLIC_SEED, profile: str | None = None) -> dict[str, Any]:
    """QZ6 self-check: decode steps of the random Llama with your QuantLinear against fp32, interleaved here.

    The graded measure is taken by the autograder in its own processes, against the reference in the same
    run; under the autograder this self-check only checks correctness."""
    from ...perf import ClockTampered, self_check_speed, speedup_over_baseline, threshold
    from ..common import one_torch_thread

    fp32 = speed_model()
    int8 = int8_speed_model(linear_cls)
    measured = verify_speed_ready(lambda p: decode_steps(int8, p), fp32, seed)
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {**measured, "timing": "by the autograder, against the reference in the same run"}
    bar = threshold(LAB, "QZ6", profile)
    prompt = speed_prompts(seed, 1)[0]
    try:
        with one_torch_thread():
            result = speedup_over_baseline(lambda: decode_steps(int8, prompt), lambda: decode_steps(fp32, prompt))
    except ClockTampered as err:
        raise CheckFailed(f"the clock was tampered with ({', '.join(err.names)}): remove any code that replaces timing "
                          "functions") from None
    speedup = result.speedup("candidate")
    low, high = result.ratios["candidate"]["ci_low"], result.ratios["candidate"]["ci_high"]
    reference = bar["calibration"]["reference_speedup_vs_fp32"]
    numbers = {"speedup_vs_fp32": round(speedup, 2), "ci95": [round(low, 2), round(high, 2)],
               "threshold": bar["min_speedup_vs_fp32"], "calibrated_reference_speedup_vs_fp32": reference,
               "profile": bar["profile"], "rounds": result.rounds}
    too_slow = (f"decode with QuantLinear is {speedup:.2f}x as fast as fp32; the bar is {bar['min_speedup_vs_fp32']}x "
                f"(the reference reaches about {reference}x): multiply by the INT8 codes directly "
                "(torch.ops.aten._weight_int8pack_mm) instead of dequantizing the weight at every call")
    return self_check_speed(speedup, (low, high), bar["min_speedup_vs_fp32"], numbers, too_slow)


def threshold_value(task: str, key: str) -> Any:
    from ...perf import threshold

    return threshold(LAB, task)[key]


# ------------------------------------------------------------------------------------------------ the learner, locally

def local_ask(answers: dict[str, Any]) -> Ask:
    """The probes of `probes.py`, run here on the learner's objects (a self-check): the same code as remotely."""
    from . import probes

    def get(name: str) -> Any:
        if name not in answers:
            raise NameError(f"{name} is not defined")
        return answers[name]

    def ask(probe: str, **inputs: Any) -> Any:
        return probes.LOCAL[probe](get, **inputs)
    return ask
