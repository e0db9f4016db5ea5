"""grader.labs.quantization.grading: the checker's side of the quantization lab. Never in a sandbox nor a learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed process reached
through the probes) and a seed drawn at grading time, computes what is expected here, and raises
`CheckFailed` with what to do next when the answer is wrong.

  QZ1 INT8 codes and scales against the formula (here only), the round trip, QuantLinear's output and the bytes
      it holds (counted in the learner's process by the probe, against the formula), and a random model with
      every Linear swapped through `replace_linears`.
  QZ2 INT4 packed bytes, nibble order, rounding, group boundaries, rejections, against the formula here.
  QZ3 the Triton kernel's products against x @ dequantize(...).T computed here, on unaligned shapes.
  QZ4 the checker's model drives the learner's INT8 cache layer by layer (each update is a call into the
      learner's process) and compares logits with fp32 recomputation; the bytes its tensors hold.
  QZ5 the learner's codes for every Linear of tiny come back as plain tensors; the checker dequantizes them
      with its own code and computes the perplexity on held-out text drawn now.
  QZ6 first right (the INT8 model decodes like fp32), then timed by `grader.perf_stage` against fp32 and the
      reference in the same run; `judge_timing` gives the verdict.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from inferlab import ModelArgs, Transformer, replace_linears

from ...checks import CheckFailed
from ...perf import bar_between, fraction_of_reference_verdict, threshold
from ..common import random_model
from . import SPEC
from .public import (MIN_SPEED_AGREEMENT, SCHEMES, _shape, argmax_agreement, decode_steps, held_out_texts,
                     int4_bad_inputs, int4_cases, int8_cases, kernel_cases, kv_cases, module_bytes_held, speed_model,
                     speed_prompts, verify_int4, verify_int8, verify_kernel, verify_kv_cache, verify_perplexity,
                     verify_speed_ready)

LAB = SPEC.name


# ------------------------------------------------------------------------------------------------ the formulas

def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output row: scale = max|row| / 127, q = round(w / scale) in [-127, 127]."""
    w = weight.double()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30)
    q = torch.round(w / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale.float()


def int8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_linear_bytes(out_f: int, in_f: int, bias: bool) -> int:
    """One byte per weight, a 4-byte scale per output row, and the fp32 bias."""
    return out_f * in_f + 4 * out_f + (4 * out_f if bias else 0)


def int4_codes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group of `group` inputs in a row: offset = min, scale = (max - min) / 15 (1 where the group
    is constant), q = round((w - offset) / scale) in 0..15; byte j = q[2j] | q[2j+1] << 4."""
    out_f, in_f = weight.shape
    g = weight.float().reshape(out_f, in_f // group, group)
    low, high = g.amin(dim=2), g.amax(dim=2)
    scales = (high - low) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((g - low[:, :, None]) / scales[:, :, None]).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return (q[:, 0::2] | (q[:, 1::2] << 4)), scales, low


def int4_weight(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int) -> torch.Tensor:
    out_f = packed.shape[0]
    q = torch.empty(out_f, packed.shape[1] * 2, dtype=torch.uint8)
    q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
    return (q.float().reshape(out_f, -1, group) * scales[:, :, None] + offsets[:, :, None]).reshape(out_f, -1)


def int4_bytes(out_f: int, in_f: int, group: int) -> int:
    """Half a byte per weight, and a 4-byte scale and offset per group."""
    return out_f * in_f // 2 + 2 * 4 * out_f * (in_f // group)


def int8_kv_bytes(args: ModelArgs, batch: int, slots: int) -> int:
    """K and V, every layer, kv head and slot: head_dim int8 codes plus one fp32 scale."""
    return 2 * args.n_layers * batch * args.n_kv_heads * slots * (args.head_dim + 4)


def fp32_kv_bytes(args: ModelArgs, batch: int, slots: int) -> int:
    return 2 * args.n_layers * batch * args.n_kv_heads * slots * args.head_dim * 4


@torch.no_grad()
def perplexity_of(model: nn.Module, texts: list[list[int]]) -> float:
    """exp(mean negative log-likelihood of every token after the first of each text, given those before)."""
    nll, count = 0.0, 0
    for text in texts:
        tokens = torch.tensor([text])
        logits = model(tokens)[0, :-1].double()  # [T-1, V]: position t predicts token t+1
        nll += float(torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum"))
        count += len(text) - 1
    return math.exp(nll / count)


@functools.lru_cache(maxsize=1)
def bundled() -> Transformer:
    from inferlab import load_model

    return load_model("tiny")


# ------------------------------------------------------------------------------------------------ expected values

class _FakeInt8(nn.Module):
    """A Linear that computes in fp32 with the INT8-rounded weight, holding what an INT8 Linear holds."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = int8_codes(linear.weight.detach())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ int8_weight(self.weight_int8, self.scale).T
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def expected_int8(cases: dict[str, Any]) -> dict[str, Any]:
    codes = [int8_codes(w) for w in cases["weights"]]
    out = []
    for case in cases["linears"]:
        y = case["x"] @ int8_weight(*int8_codes(case["weight"])).T
        out.append(y if case["bias"] is None else y + case["bias"])
    m = cases["model"]
    model = random_model(ModelArgs(**m["args"]), m["seed"])
    fp32_bytes = module_bytes_held(model)
    n_linears = len(replace_linears(model, lambda name, linear: _FakeInt8(linear)))
    return {"q": [c[0] for c in codes], "scale": [c[1] for c in codes],
            "dequantized": [int8_weight(*c) for c in codes], "linear_out": out,
            "linear_bytes": [int8_linear_bytes(*c["weight"].shape, c["bias"] is not None) for c in cases["linears"]],
            "model_logits": model(m["tokens"]), "model_linears": n_linears, "model_bytes": module_bytes_held(model),
            "model_fp32_bytes": fp32_bytes}


def expected_int4(cases: list[dict[str, Any]]) -> dict[str, Any]:
    codes = [int4_codes(c["weight"], c["group_size"]) for c in cases]
    return {"packed": [c[0] for c in codes], "scales": [c[1] for c in codes], "offsets": [c[2] for c in codes],
            "dequantized": [int4_weight(*c, case["group_size"]) for c, case in zip(codes, cases)],
            "bytes": [int4_bytes(*case["weight"].shape, case["group_size"]) for case in cases]}


def expected_products(cases: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [(c["x"].double() @ int4_weight(c["packed"], c["scales"], c["offsets"], c["group_size"]).double().T).float()
            for c in cases]


def expected_kv(cases: dict[str, Any]) -> tuple[list[int], list[int]]:
    args = [ModelArgs(**a) for a in cases["bytes_args"]]
    return ([int8_kv_bytes(a, cases["batch"], cases["slots"]) for a in args],
            [fp32_kv_bytes(a, cases["batch"], cases["slots"]) for a in args])


def _tolist(items: list[torch.Tensor]) -> list[Any]:
    return [t.tolist() for t in items]


def public_expected() -> dict[str, Any]:
    """What `public_expected.json` must hold: the expected values of the self-checks' public inputs."""
    seed = SPEC.public_seed
    e1 = expected_int8(int8_cases(seed))
    e2 = expected_int4(int4_cases(seed))
    kv_bytes, kv_fp32 = expected_kv(kv_cases(seed))
    texts = held_out_texts(seed)
    return {
        "QZ1": {"seed": seed, "q": _tolist(e1["q"]), "scale": _tolist(e1["scale"]),
                "dequantized": _tolist(e1["dequantized"]), "linear_out": _tolist(e1["linear_out"]),
                "linear_bytes": e1["linear_bytes"], "model_logits": e1["model_logits"].tolist(),
                "model_linears": e1["model_linears"], "model_bytes": e1["model_bytes"],
                "model_fp32_bytes": e1["model_fp32_bytes"]},
        "QZ2": {"seed": seed, **{k: (_tolist(v) if k != "bytes" else v) for k, v in e2.items()}},
        "QZ3": {"seed": seed, "out": _tolist(expected_products(kernel_cases(seed)))},
        "QZ4": {"seed": seed, "bytes": kv_bytes, "fp32_bytes": kv_fp32},
        "QZ5": {"seed": seed, "fp32": round(perplexity_of(bundled(), texts), 6),
                "names": [s if g is None else f"{s}-g{g}" for s, g in SCHEMES[1:]]},
    }


# ------------------------------------------------------------------------------------------------ hidden checks

def run_check(task: str, ask, seed: int, new_cache=None, cache_bytes=None) -> dict[str, Any]:
    """One task's check on the inputs of `seed`, expected values computed here. `ask` reaches the learner's code
    (`learner.call` when grading; `public.local_ask` in the tests), and for QZ4 `new_cache(args, batch, slots)`
    and `cache_bytes(args, batch, slots) -> (claimed, held)` reach its cache."""
    if task == "QZ1":
        cases = int8_cases(seed)
        return verify_int8(ask, cases, expected_int8(cases), threshold(LAB, "QZ1")["min_row_sqnr_db"])
    if task == "QZ2":
        cases = int4_cases(seed)
        return verify_int4(ask, cases, int4_bad_inputs(seed), expected_int4(cases),
                           threshold(LAB, "QZ2")["min_row_sqnr_db"])
    if task == "QZ3":
        cases = kernel_cases(seed)
        return verify_kernel(ask, cases, expected_products(cases))
    if task == "QZ4":
        cases = kv_cases(seed)
        want, full = expected_kv(cases)
        return verify_kv_cache(new_cache, cache_bytes, cases, want, full, bundled(),
                               threshold(LAB, "QZ4")["max_relative_logit_error"])
    if task == "QZ5":
        texts = held_out_texts(seed)
        return verify_perplexity(ask, texts, {"fp32": perplexity_of(bundled(), texts)},
                                 threshold(LAB, "QZ5")["max_perplexity_increase"], checker_perplexity(texts))
    if task == "QZ6":
        return verify_speed_ready(lambda prompt: ask("speed_decode", prompt=prompt), fp32_speed_model(), seed)
    raise KeyError(task)


def checker_perplexity(texts: list[list[int]]):
    """name ("int8", "int4-g32", ...), the learner's codes for every Linear of tiny -> the perplexity of tiny with
    them, dequantized here."""
    from .public import fake_quantized_tiny

    def ppl(name: str, weights: Any) -> float:
        scheme, _, group = name.partition("-g")
        weights = _checked_weights(name, weights)
        model = fake_quantized_tiny(weights, lambda w: int8_weight(w[0], w[1].float()) if scheme == "int8" else
                                    int4_weight(w[0], w[1].float(), w[2].float(), int(group)))
        return perplexity_of(model, texts)
    return ppl


def _checked_weights(name: str, weights: Any) -> dict[str, list[torch.Tensor]]:
    """The learner's codes for every Linear of tiny, checked for type, dtype and shape before use."""
    scheme, _, group = name.partition("-g")
    model = bundled()
    if not isinstance(weights, dict):
        raise CheckFailed(f"the {name} weights came back as {_shape(weights)}")
    for lname, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        got = weights.get(lname)
        out_f, in_f = module.weight.shape
        if scheme == "int8":
            ok = isinstance(got, list) and len(got) == 2 and isinstance(got[0], torch.Tensor) and \
                got[0].dtype == torch.int8 and tuple(got[0].shape) == (out_f, in_f) and \
                isinstance(got[1], torch.Tensor) and tuple(got[1].shape) == (out_f,)
        else:
            n = in_f // int(group)
            ok = isinstance(got, list) and len(got) == 3 and isinstance(got[0], torch.Tensor) and \
                got[0].dtype == torch.uint8 and tuple(got[0].shape) == (out_f, in_f // 2) and \
                all(isinstance(t, torch.Tensor) and tuple(t.shape) == (out_f, n) for t in got[1:])
        if not ok:
            raise CheckFailed(f"quantizing tiny's {lname} ({out_f}x{in_f}) in {name} gave {_shape(got)}: make QZ1 and "
                              "QZ2 pass first")
    return weights


@functools.lru_cache(maxsize=1)
def fp32_speed_model() -> Transformer:
    return speed_model()


def _remote_cache(learner):
    def new_cache(args: ModelArgs, batch: int, slots: int):
        handle = learner.call("new_kv_cache", args=args.to_dict(), batch_size=batch, max_seq_len=slots)
        if not isinstance(handle, int):
            raise CheckFailed("Int8KVCache could not be created")
        return learner.cache(handle, args)

    def cache_bytes(args: ModelArgs, batch: int, slots: int) -> tuple[Any, int]:
        claimed, held = learner.call("kv_cache_bytes", args=args.to_dict(), batch_size=batch, max_seq_len=slots)
        return claimed, held
    return new_cache, cache_bytes


def _hidden(task: str):
    def check(learner, seed: int) -> dict[str, Any]:
        return run_check(task, learner.call, seed, *(_remote_cache(learner) if task == "QZ4" else ()))
    check.__name__ = f"hidden_{task.lower()}"
    return check


HIDDEN_CHECKS = {task.id: _hidden(task.id) for task in SPEC.tasks}


# ------------------------------------------------------------------------------------------------ QZ6, timed

def perf_prompts(seed: int, n: int) -> list[list[int]]:
    """A different token sequence every round: a result cached by input is worth nothing."""
    return speed_prompts(seed, n)


def timed_outputs_agree(inputs: Any, got: Any, want: Any) -> bool:
    """INT8 weights may tip a near tie of the fp32 argmax; most steps must still agree."""
    return isinstance(got, list) and argmax_agreement(got, want) >= MIN_SPEED_AGREEMENT


def judge_timing(result: Any, tampered: list[str], profile: str | None = None) -> dict[str, Any]:
    """The QZ6 verdict from one interleaved run: the learner's INT8 speedup over fp32 as a fraction of the
    reference's in the same run."""
    bar = threshold(LAB, "QZ6", profile)

    def too_slow(speedup: float, reference: float, fraction: float) -> str:
        return (f"decode with your QuantLinear is {speedup:.2f}x as fast as fp32, {fraction:.0%} of the reference's "
                f"{reference:.2f}x in the same run; the bar is {bar['min_fraction_of_reference']:.0%} on the "
                f"{bar['profile']} profile: multiply by the INT8 codes directly (torch.ops.aten._weight_int8pack_mm) "
                "instead of dequantizing the whole weight at every call")
    return fraction_of_reference_verdict(result, tampered, bar, "fp32", too_slow)


class DequantizeEveryCall(nn.Module):
    """The 'slower' answer: INT8 storage, but the weight is dequantized to fp32 at every call, then multiplied."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = int8_codes(linear.weight.detach())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight_int8.float() * self.scale[:, None], self.bias)


def calibrate(seed: int = 0) -> dict[str, Any]:
    """Measure the reference and a dequantize-at-every-call INT8 Linear against fp32 decode, interleaved.

    Rule for the bars: `grader.perf.bar_between`, the geometric mean of the reference's speedup and the slow one's
    (dequantize-every-call counted as at least 1x); graded as a fraction of the reference timed in the same run, the
    notebook's self-check uses the mean itself."""
    from inferlab.bench import compare

    from .. import load
    from ..common import one_torch_thread
    from .public import int8_speed_model

    ref_cls = load(LAB).reference_namespace()["QuantLinear"]
    fp32, ref, slow = speed_model(), int8_speed_model(ref_cls), int8_speed_model(DequantizeEveryCall)
    prompt = speed_prompts(seed, 1)[0]
    with one_torch_thread(), torch.inference_mode():
        result = compare({"fp32": lambda: decode_steps(fp32, prompt), "reference": lambda: decode_steps(ref, prompt),
                          "dequantize": lambda: decode_steps(slow, prompt)},
                         baseline="fp32", warmup=2, min_rounds=10, max_rounds=30, rel_ci=0.05)
    reference, slower = result.speedup("reference"), result.speedup("dequantize")
    bar, fraction = bar_between(reference, slower)
    return {"QZ6": {
        "min_fraction_of_reference": fraction,
        "min_speedup_vs_fp32": bar,
        "calibration": {
            "reference_speedup_vs_fp32": round(reference, 2), "dequantize_every_call_speedup_vs_fp32": round(slower, 2),
            "ci95_reference": [round(result.ratios["reference"]["ci_low"], 2),
                               round(result.ratios["reference"]["ci_high"], 2)],
            "rounds": result.rounds, "steps": len(prompt),
            "note": (f"reference {reference:.2f}x and dequantize-every-call {slower:.2f}x over fp32 decode steps of the "
                     f"random Llama, interleaved, {result.rounds} rounds, one torch thread; bar = geometric mean of the "
                     f"two (the slow one counted as 1x) = {bar}x = {fraction:.0%} of the reference"),
        }}}
