"""grader.labs.gpu_basics.public: the gpu_basics lab's checks (book ch. 3), tasks GB1 to GB4, as a notebook sees them.

The notebook imports this module as `checks`. Each `check_gbN` runs the learner's functions
here, on the public seed's inputs, and compares with the expected values stored in
`public_expected.json` (written by `inferlab release` from `grading.public_expected()`). This
module holds no formula that answers a task: the formulas, and the drawing of hidden inputs,
live in `grading.py`, which runs in the autograder's own process and never in a learner's.

The same `verify_*` functions judge both: here the learner's functions are called directly;
when grading, through the probes (`probes.py`) in the learner's sandboxed process, on inputs the
checker drew from a seed and with expected values it computed itself.

The learner's surface, fixed by the notebook (`args` a ModelArgs, `dtype` a torch dtype):
  GB1 `parameter_count(args) -> int`, `weight_bytes(args, dtype) -> int`,
      `memory_needed(args, dtype, batch_size, context_len) -> int` (weights + KV cache).
  GB2 `weights_read_per_forward(args) -> int`, `forward_flops(args, batch_size, n_tokens) -> int`,
      `arithmetic_intensity(args, dtype, batch_size, n_tokens) -> float` (FLOPs per byte of weights read).
  GB3 `predict_decode_tokens_per_s(args, dtype, bandwidth_gb_s, batch_size=1) -> float` (the roofline)
      and `measure_decode_tokens_per_s(model, steps=10) -> float`.
  GB4 `predict_on_hardware(args, dtype, hardware, context_len) -> (tokens_per_s, fits)` for a datasheet
      entry `{"bandwidth_gb_s": ..., "memory_gb": ...}`.

A later task builds on earlier functions (GB2's weights read on GB1's parameter count, GB3's
prediction on GB2's weights read, GB4 on both). When an answer is wrong, its check asks the
earlier function on the same input, and where that one is wrong and explains the mistake, the
message points at it instead of at the later formula.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer

from ...checks import CheckFailed
from ..common import one_torch_thread

LAB = "gpu_basics"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")
GB = 1e9  # datasheets count bandwidth and memory in decimal gigabytes
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# The learner's functions the checks call, with their parameters in order. Inputs travel as plain data
# (a ModelArgs as its dict, a dtype as its name) and become the learner's types in `call_args`.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "parameter_count": ("args",),
    "weight_bytes": ("args", "dtype"),
    "memory_needed": ("args", "dtype", "batch_size", "context_len"),
    "weights_read_per_forward": ("args",),
    "forward_flops": ("args", "batch_size", "n_tokens"),
    "arithmetic_intensity": ("args", "dtype", "batch_size", "n_tokens"),
    "predict_decode_tokens_per_s": ("args", "dtype", "bandwidth_gb_s", "batch_size"),
    "predict_on_hardware": ("args", "dtype", "hardware", "context_len"),
}

# ask(function, inputs) -> what the learner's function returned, as plain data (see `plain`).
# maybe(function, inputs) -> the same, or None when the learner's function raised: for diagnoses only.
Ask = Callable[[str, dict[str, Any]], Any]


def call_args(function: str, inputs: dict[str, Any]) -> list[Any]:
    """The positional arguments of one call: a fresh ModelArgs each time (a function that edits it edits a copy),
    a torch dtype, a copy of the datasheet entry."""
    if function not in SIGNATURES:
        raise KeyError(f"no learner function {function!r} in gpu_basics; known: {', '.join(SIGNATURES)}")
    convert = {"args": lambda a: ModelArgs(**a), "dtype": lambda d: getattr(torch, d), "hardware": dict}
    return [convert.get(name, lambda v: v)(inputs[name]) for name in SIGNATURES[function]]


def plain(value: Any) -> Any:
    """What a learner's function returned, as plain data: numbers, bools, strings and short lists of them.

    One-element tensors and numpy scalars become Python numbers; anything else is described, so the
    check can say what came back."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)) and len(value) <= 8:
        return [plain(v) for v in value]
    return {"unsupported": type(value).__name__, "repr": repr(value)[:120]}


def local_answers(functions: dict[str, Callable[..., Any]]) -> tuple[Ask, Ask]:
    """(ask, maybe) over the learner's functions in this process, as the self-checks call them."""
    def ask(function: str, inputs: dict[str, Any]) -> Any:
        return plain(functions[function](*call_args(function, inputs)))

    def maybe(function: str, inputs: dict[str, Any]) -> Any:
        if function not in functions:
            return None
        try:
            return ask(function, inputs)
        except Exception:  # noqa: BLE001 (a diagnosis only: an earlier function that fails explains nothing)
            return None
    return ask, maybe


def stored(task: str) -> dict[str, Any]:
    """The public seed's inputs and expected values of one task, as `grading.public_expected()` wrote them."""
    return json.loads(EXPECTED_PATH.read_text())[task]


# ------------------------------------------------------------------------------------------------ reading answers

def _shown(value: Any) -> str:
    if isinstance(value, dict) and "unsupported" in value:
        return f"{value['unsupported']} {value['repr']}"
    return f"{type(value).__name__} {value!r}"


def as_int(value: Any, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckFailed(f"{what} must return an int (a count of parameters, FLOPs or bytes); got {_shown(value)}")
    return int.__index__(value)


def as_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckFailed(f"{what} must return a number; got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise CheckFailed(f"{what} returned {value}: it must be a finite number")
    return value


def number(value: Any) -> float | None:
    """A finite number, or None: for reading an earlier function's answer in a diagnosis."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def close(got: float, want: float, rel: float = 1e-6) -> bool:
    return abs(got - want) <= rel * abs(want)


def _call(case: dict[str, Any]) -> str:
    """How a question reads in a message: `weight_bytes(llama-3-8b, bfloat16)`."""
    inputs = case["inputs"]
    shown = [case["config"]] + [f"{name}={inputs[name]}" if name != "dtype" else inputs[name]
                                for name in SIGNATURES[case["function"]][1:] if name != "hardware"]
    return f"{case['function']}({', '.join(shown)})"


# ------------------------------------------------------------------------------------------------ GB1

def _parameter_hint(args: ModelArgs, got: int, want: int) -> str:
    """Name the mistake when the difference is exactly one known slip."""
    kv_extra = 2 * (args.n_heads - args.n_kv_heads) * args.head_dim
    slips = [
        (args.n_layers * (args.dim * kv_extra + (kv_extra if args.qkv_bias else 0)),
         "k_proj and v_proj have n_kv_heads x head_dim outputs (grouped-query attention), not n_heads x head_dim"),
        (-args.vocab_size * args.dim if not args.tie_embeddings else args.vocab_size * args.dim,
         "count the output head (vocab_size x dim) only when it is not tied to the embedding "
         "(tie_embeddings=False)"),
        (-args.n_layers * args.dim * args.ffn_dim,
         "the SwiGLU MLP has three matrices (gate_proj, up_proj, down_proj), each dim x ffn_dim"),
        (-args.n_layers * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim,
         "with qkv_bias=True, q_proj, k_proj and v_proj each have a bias of their output size"),
        (-args.n_layers * args.dim, "with out_bias=True, o_proj has a bias of size dim"),
        (-(2 * args.n_layers + 1) * args.dim,
         "count the norms: two RMSNorm weights of size dim per layer, and the final norm"),
        (-args.dim, "count the final RMSNorm (size dim) after the last layer"),
        (-args.vocab_size * args.dim, "count the embedding table, vocab_size x dim"),
        (2 * args.n_layers * args.dim * (args.dim - args.n_heads * args.head_dim),
         "q_proj is dim x (n_heads x head_dim) and o_proj (n_heads x head_dim) x dim; head_dim is a field of "
         "its own, not always dim / n_heads"),
    ]
    for delta, hint in slips:
        if delta and got - want == delta:
            return hint
    return ("add up: embedding (vocab_size x dim); per layer q/k/v/o projections (with n_kv_heads for k and v, "
            "and biases if set), three SwiGLU matrices and two norms; the final norm; and the head if untied")


def verify_gb1(ask: Ask, maybe: Ask, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Parameter count, weight bytes, and weights + KV bytes, case by case; the first wrong one fails with a hint.

    Every expected count is the parameters of the model really built from that configuration (the
    checker proves its formula on each one)."""
    for case in cases:
        function, inputs, want = case["function"], case["inputs"], case["expected"]
        args = ModelArgs(**inputs["args"])
        got = as_int(ask(function, inputs), function)
        if got == want:
            continue
        if function == "parameter_count":
            raise CheckFailed(f"parameter_count({case['config']}) = {got:,}, but the model built from this config has "
                              f"{want:,} parameters ({got - want:+,}): {_parameter_hint(args, got, want)}",
                              config=case["config"], got=got, expected=want)
        if function == "weight_bytes":
            element = case["facts"]["element_size"]
            hint = (f"use the element size of {inputs['dtype']} ({element} bytes): bytes_per_element(dtype)"
                    if got % case["facts"]["count"] == 0 else
                    "weight bytes = parameter_count(args) x bytes per element")
            raise CheckFailed(f"{_call(case)} = {got:,}, expected {want:,}: {hint}",
                              config=case["config"], got=got, expected=want)
        weights, kv = case["facts"]["weights"], case["facts"]["kv"]
        batch, context = inputs["batch_size"], inputs["context_len"]
        if got == weights:
            hint = "add the KV cache: the weights alone are not all a server must hold"
        elif got == weights + kv * args.n_heads // args.n_kv_heads:
            hint = "the KV cache holds n_kv_heads heads per layer, not n_heads"
        elif got in (weights + kv // batch, weights + kv // context):
            hint = "the KV cache grows with both the batch size and the context length"
        else:
            hint = ("memory = weight bytes + 2 (K and V) x n_layers x n_kv_heads x head_dim x bytes per element "
                    "x context_len x batch_size")
        raise CheckFailed(f"{_call(case)} = {got:,}, expected {want:,}: {hint}",
                          config=case["config"], got=got, expected=want)
    return {"cases": len(cases)}


def check_gb1(count_fn: Any, bytes_fn: Any, memory_fn: Any) -> dict[str, Any]:
    """GB1 self-check: parameter_count, weight_bytes and memory_needed on the public configurations."""
    ask, maybe = local_answers({"parameter_count": count_fn, "weight_bytes": bytes_fn, "memory_needed": memory_fn})
    return verify_gb1(ask, maybe, stored("GB1")["cases"])


# ------------------------------------------------------------------------------------------------ GB2

def _builds_on_count(case: dict[str, Any], got: int, maybe: Ask) -> str | None:
    """When weights_read_per_forward is off by exactly as much as the learner's parameter_count is: say so."""
    count = case["facts"]["count"]
    theirs = maybe("parameter_count", {"args": case["inputs"]["args"]})
    if not isinstance(theirs, int) or isinstance(theirs, bool) or theirs == count:
        return None
    if got - case["expected"] != theirs - count:
        return None
    return (f"it follows from your parameter_count, which gives {theirs:,} for this config where the model has "
            f"{count:,}: make GB1's parameter_count right first (its self-check says how)")


def verify_gb2(ask: Ask, maybe: Ask, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Weights read per forward, its FLOPs, and FLOPs per byte, for prefill (many tokens) and decode (one)."""
    for case in cases:
        function, inputs, want = case["function"], case["inputs"], case["expected"]
        args = ModelArgs(**inputs["args"])
        if function == "weights_read_per_forward":
            got = as_int(ask(function, inputs), function)
            if got == want:
                continue
            embedding = case["facts"]["embedding"]
            hint = _builds_on_count(case, got, maybe)
            if hint is None and not args.tie_embeddings and got == want + embedding:
                hint = ("the embedding table is untied here: a forward reads only the rows of its tokens (a rounding "
                        "error), so leave the table out; the output head, read in full, stays in")
            elif hint is None and args.tie_embeddings and got == want - embedding:
                hint = ("with tied embeddings the output head is the embedding table, and the head reads all of it "
                        "every forward: count it (once)")
            elif hint is None:
                hint = "start from the parameter count and drop what a forward does not read in full"
            raise CheckFailed(f"weights_read_per_forward({case['config']}) = {got:,}, expected {want:,}: {hint}",
                              config=case["config"], got=got, expected=want)
        batch, tokens = inputs["batch_size"], inputs["n_tokens"]
        if function == "forward_flops":
            got = as_int(ask(function, inputs), function)
            if got == want:
                continue
            hint = {want // 2: "a multiply-add is 2 FLOPs: FLOPs = 2 x weights read x tokens",
                    want // batch: "every sequence of the batch does the work: multiply by batch_size",
                    want // tokens: "every token does the work: multiply by n_tokens"}.get(
                got, "FLOPs = 2 x weights read per forward x batch_size x n_tokens")
            raise CheckFailed(f"{_call(case)} = {got:,}, expected {want:,}: {hint}",
                              config=case["config"], got=got, expected=want)
        got = as_float(ask(function, inputs), function)
        if close(got, want):
            continue
        element = case["facts"]["element_size"]
        if close(got * batch, want) and batch > 1:
            hint = ("a forward reads each weight once for the whole batch: the bytes do not grow with "
                    "batch_size (that is why batching helps decode)")
        elif close(got * element, want * 4) and element != 4:
            hint = f"{inputs['dtype']} weights take {element} bytes each, not 4"
        elif close(got * tokens, want) and tokens > 1:
            hint = "a forward reads each weight once for all its tokens: the bytes do not grow with n_tokens"
        else:
            hint = "intensity = forward FLOPs / (weights read x bytes per element)"
        raise CheckFailed(f"{_call(case)} = {got:.6g} FLOP/byte, expected {want:.6g}: {hint}",
                          config=case["config"], got=got, expected=want)
    return {"cases": len(cases)}


def check_gb2(read_fn: Any, flops_fn: Any, intensity_fn: Any, count_fn: Any = None) -> dict[str, Any]:
    """GB2 self-check: weights read, FLOPs and intensity on the public inputs. `count_fn`, your GB1
    parameter_count, is asked only to explain a wrong weights read."""
    functions = {"weights_read_per_forward": read_fn, "forward_flops": flops_fn, "arithmetic_intensity": intensity_fn}
    if count_fn is not None:
        functions["parameter_count"] = count_fn
    ask, maybe = local_answers(functions)
    return verify_gb2(ask, maybe, stored("GB2")["cases"])


# ------------------------------------------------------------------------------------------------ GB3: the formula

def verify_gb3_formula(ask: Ask, maybe: Ask, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The roofline for real and random configs, dtypes and bandwidths, at batch 1 and above."""
    for case in cases:
        inputs, want = case["inputs"], case["expected"]
        got = as_float(ask("predict_decode_tokens_per_s", inputs), "predict_decode_tokens_per_s")
        if close(got, want):
            continue
        ratio, batch = got / want, inputs["batch_size"]
        element, weights_read = case["facts"]["element_size"], case["facts"]["weights_read"]
        theirs = number(maybe("weights_read_per_forward", {"args": inputs["args"]}))
        if theirs and theirs != weights_read and close(got * theirs, want * weights_read, 1e-4):
            hint = (f"your prediction follows the roofline, but from your weights_read_per_forward, which gives "
                    f"{theirs:,.0f} for this config where a forward reads {weights_read:,}: make GB2's "
                    "weights_read_per_forward right first")
        else:
            hints = [(2**30 / 1e9, "a GB/s of bandwidth is 1e9 bytes per second here, as in datasheets, not 2**30"),
                     (1e9 / 2**30, "a GB/s of bandwidth is 1e9 bytes per second here, as in datasheets, not 2**30"),
                     (element, f"divide by the bytes of every weight read: {inputs['dtype']} weights take "
                               f"{element} bytes each"),
                     (1 / batch, "one decode step reads the weights once and gives one token for each of the "
                                 "batch_size sequences: multiply by batch_size")]
            hint = next((h for r, h in hints if r != 1 and close(ratio, r, 1e-3)),
                        "tokens/s = batch_size x bandwidth (bytes/s) / bytes of weights read per decode step")
        raise CheckFailed(f"predict_decode_tokens_per_s({case['config']}, {inputs['dtype']}, bandwidth_gb_s="
                          f"{inputs['bandwidth_gb_s']:.1f}, batch_size={batch}) = {got:.6g}, expected {want:.6g} "
                          f"({ratio:.3g}x): {hint}", config=case["config"], got=got, expected=want)
    return {"cases": len(cases)}


# ------------------------------------------------------------------------------------------------ GB3: the stopwatch

class StandInDecoder(torch.nn.Module):
    """Stands in for a model whose decode step takes `step_s` seconds: a slow first call (cold caches, lazy
    initialisation) and an occasional hiccup (another process), so only a warmed-up median reads the steady rate.
    It records the shape of the tokens of every call, and when each call began."""

    def __init__(self, step_s: float, first_s: float, hiccup_s: float, hiccup_every: int):
        super().__init__()
        self.args = ModelArgs.from_name("tiny-draft")
        self.embed_tokens = torch.nn.Embedding(1, 1)  # a parameter, so its device and dtype can be read
        self.step_s, self.first_s, self.hiccup_s, self.hiccup_every = step_s, first_s, hiccup_s, hiccup_every
        self.calls: list[tuple[int, ...]] = []
        self.began: list[float] = []

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: Any = None,
                attention_mask: Any = None) -> torch.Tensor:
        self.began.append(time.perf_counter())
        self.calls.append(tuple(tokens.shape))
        n = len(self.calls)
        time.sleep(self.first_s if n == 1 else self.hiccup_s if n % self.hiccup_every == 0 else self.step_s)
        return torch.zeros(*tokens.shape, 8)  # [B, T, 8]: the values do not matter to a stopwatch

    def steady_period_s(self) -> float:
        """The median time from the start of a steady call (not the first, not a hiccup) to the start of the next.

        That is the steady step as the caller sees it: `step_s` plus whatever it costs to reach the model (for
        the autograder, a round trip between the learner's process and its own, a few ms on a busy machine)."""
        periods = [after - before for n, (before, after) in enumerate(zip(self.began, self.began[1:]), 1)
                   if n != 1 and n % self.hiccup_every]
        return statistics.median(periods) if periods else self.step_s


STAND_IN_STEPS = 6


def stand_in(seed: int) -> StandInDecoder:
    """The stand-in of a seed: a step of 35-50 ms, long enough that a busy scheduler adds little."""
    rng = np.random.default_rng(seed)
    step_s = float(rng.uniform(0.035, 0.05))
    return StandInDecoder(step_s, first_s=6 * step_s, hiccup_s=4 * step_s, hiccup_every=int(rng.integers(4, 6)))


def judge_stand_in(got: Any, model: StandInDecoder, steps: int, calls: list[tuple[int, ...]] | None = None
                   ) -> dict[str, Any]:
    """The learner's stopwatch read the stand-in's steady rate, feeding it one token per call, `steps` times or more.

    The steady rate is what the stand-in saw where it runs (for the autograder, in its own process): the
    time between the starts of its steady calls. `calls`, the shape of the tokens of every call, is
    counted there too (the checker's count of a served model); by default the stand-in's own record."""
    got = as_float(got, "measure_decode_tokens_per_s")
    calls = model.calls if calls is None else calls
    shapes = sorted({tuple(c) for c in calls if tuple(c) != (1, 1)})
    if shapes:
        raise CheckFailed(f"measure_decode_tokens_per_s fed the model tokens of shape {list(shapes[0])}: a decode step "
                          "is one new token for one sequence, tokens of shape [1, 1]")
    if len(calls) < steps:
        raise CheckFailed(f"measure_decode_tokens_per_s called the model {len(calls)} times with steps={steps}: "
                          "warm up first, then time `steps` steps one by one and take the median")
    step_s = model.steady_period_s()
    want = 1 / step_s
    # A warmed-up median reads 0.9-1.05x of the steady rate seen from the stand-in's side, a busy machine's
    # round trips included; the nearest wrong method, a mean after a warm-up, reads 0.67x (one hiccup in six
    # steps), no warm-up 0.45x or less.
    if not 0.8 * want <= got <= 1.2 * want:
        if close(got, step_s, 0.15) or close(got, 1e3 * step_s, 0.15):
            hint = "return tokens per second (1 / seconds per step), not the time of a step"
        elif got < want:
            hint = ("a slow first call or an occasional hiccup pulled your number down: do one untimed warm-up "
                    "step, then time each step separately and take the median, not the mean or the total")
        else:
            hint = "time each step separately (one token per step) and return 1 / median step time"
        raise CheckFailed(f"measure_decode_tokens_per_s read {got:.4g} tokens/s from a model whose steady decode "
                          f"step takes {step_s * 1e3:.1f} ms ({want:.4g} tokens/s; its first call and every few "
                          f"steps are slower): {hint}", got=got, expected=want)
    return {"stand_in_tok_s": round(got, 1), "stand_in_steady_tok_s": round(want, 1), "stand_in_calls": len(calls)}


# ------------------------------------------------------------------------------------------------ GB3: a real model

def roofline_setting() -> tuple[str, torch.dtype]:
    """Where GB3 measures: bf16 on a GPU; fp32 on a CPU, whose bf16 matrix-vector kernels reach less of the
    bandwidth (9 against 13 GB/s of a 31 GB/s probe on the lab's machine) and would blur the comparison."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def random_llama(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Transformer:
    """A random-weight model, built fast: allocated without the default init, then filled in place."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    if args.tie_embeddings:  # to_empty gives the embedding and the head separate storage again
        model.lm_head.weight = model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=gen)  # any finite values do: decode speed does not depend on them
    model.reset_rope()
    return model.to(dtype).eval()


@contextmanager
def one_cpu_thread(device: str | torch.device):
    """Measure on one CPU thread. On a shared machine a second thread waits for whichever core is busy
    elsewhere, which slows matrix-vector products far more than the probe (4x against 2x on the lab's
    2-core machine); one thread gives a steady ratio, and the grader runs one per submission anyway."""
    if torch.device(device).type != "cpu":
        yield
        return
    with one_torch_thread():
        yield


MEASURE_ROUNDS, MEASURE_STEPS = 3, 3  # the learner's stopwatch and the grader's, alternating; steps per stopwatch


@torch.no_grad()
def grader_stopwatch(model: Transformer, steps: int) -> float:
    """The grader's own stopwatch: the model's decode tokens/s, 1 / median of `steps` one-token steps."""
    from inferlab.bench import time_once

    device = model.embed_tokens.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)  # [B=1, T=1]
    position = torch.zeros(1, dtype=torch.long, device=device)  # [T=1]
    return 1 / statistics.median(time_once(lambda: model(token, position), device) for _ in range(steps))


def bandwidth_now(device: str | torch.device, array_mb: int = 128) -> float:
    """This machine's triad bandwidth in GB/s, from a short probe (3 arrays of `array_mb`, best of 3)."""
    from inferlab.bench import memory_bandwidth

    return memory_bandwidth(array_mb=array_mb, repeats=3, device=str(device)).triad_gb_s


@torch.no_grad()
def warm_up(model: Transformer) -> None:
    device = model.embed_tokens.weight.device
    for _ in range(2):  # first calls pay for lazy initialisation and cold pages
        model(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))


def interleaved(learner_round: Callable[[], Any], model: Transformer, rounds: int = MEASURE_ROUNDS,
                steps: int = MEASURE_STEPS) -> dict[str, list[float]]:
    """Rounds of (the grader's bandwidth probe, the learner's stopwatch, the grader's stopwatch): the two stopwatches
    of a round run back to back, so that a neighbour who slows the machine slows both alike."""
    warm_up(model)
    device = model.embed_tokens.weight.device
    yours, ours, bandwidths = [], [], []
    for _ in range(rounds):
        bandwidths.append(bandwidth_now(device))
        yours.append(as_float(learner_round(), "measure_decode_tokens_per_s"))
        ours.append(grader_stopwatch(model, steps))
    return {"yours": yours, "ours": ours, "bandwidths": bandwidths}


class Disturbed(CheckFailed):
    """The grader's own measurement disagrees with the roofline beyond the calibrated band: the machine, not the
    learner's code, is what the measurement shows. The autograder does not score it (a grader error: regrade)."""


def judge_measurement(run: dict[str, list[float]], predicted: list[float], band: dict[str, Any],
                      params: int, dtype: torch.dtype) -> dict[str, Any]:
    """The learner's decode rate against the grader's, round by round, and both against the roofline.

    `predicted[i]` is the roofline from round i's bandwidth. Three ratios, each a median over rounds:
    grader / predicted must lie in the band calibrated for this machine (else the machine was
    disturbed: `Disturbed`); yours / grader in the agreement band (a number that is not a measurement of
    this model, or in the wrong unit, fails); yours / predicted in the roofline band (no measurement
    beats the memory)."""
    yours, ours = run["yours"], run["ours"]
    if min(yours) <= 0:
        raise CheckFailed(f"measure_decode_tokens_per_s returned {min(yours)}: a rate must be positive")
    ours_over_predicted = statistics.median(o / p for o, p in zip(ours, predicted))
    yours_over_ours = statistics.median(y / o for y, o in zip(yours, ours))
    yours_over_predicted = statistics.median(y / p for y, p in zip(yours, predicted))
    lo, hi = band["min_measured_over_predicted"], band["max_measured_over_predicted"]
    agree_lo, agree_hi = band["min_yours_over_grader"], band["max_yours_over_grader"]
    name = str(dtype).removeprefix("torch.")
    measured = {"params_M": round(params / 1e6, 1), "dtype": name,
                "bandwidth_gb_s": round(statistics.median(run["bandwidths"]), 1),
                "predicted_tok_s": round(statistics.median(predicted), 1),
                "grader_measured_tok_s": round(statistics.median(ours), 1),
                "your_measured_tok_s": round(statistics.median(yours), 1),
                "grader_over_predicted": round(ours_over_predicted, 2), "yours_over_grader": round(yours_over_ours, 2),
                "yours_over_predicted": round(yours_over_predicted, 2), "band": [lo, hi],
                "agreement_band": [agree_lo, agree_hi], "rounds": len(yours), "profile": band["profile"]}
    if not lo <= ours_over_predicted <= hi:
        # The formula already passed, so the machine, not the algebra, disagrees with the roofline.
        raise Disturbed(f"the grader's own stopwatch read {measured['grader_measured_tok_s']} tokens/s on a "
                        f"{measured['params_M']}M-parameter {name} model, against a roofline of "
                        f"{measured['predicted_tok_s']} from {measured['bandwidth_gb_s']} GB/s: a ratio of "
                        f"{ours_over_predicted:.2f}, outside the band [{lo}, {hi}] calibrated for the "
                        f"{band['profile']} profile. The machine was disturbed (much busier than at calibration) or "
                        "this hardware needs its own profile: run the check again, and tell your instructor if it "
                        "keeps failing", **measured)
    if not agree_lo <= yours_over_ours <= agree_hi:
        # Seconds (or milliseconds) per step instead of tokens per second: yours x grader's is then about 1 (1000).
        product = statistics.median(y * o for y, o in zip(yours, ours))
        if 0.2 <= product <= 5 or 200 <= product <= 5000:
            hint = "return tokens per second (1 / seconds per step), not the time of a step"
        else:
            hint = ("time the model you are given: feed one token of shape [1, 1] per step to model(tokens, "
                    "input_pos), after a warm-up step, and return 1 / median step seconds")
        raise CheckFailed(f"your measure_decode_tokens_per_s read {measured['your_measured_tok_s']} tokens/s on a "
                          f"random {measured['params_M']}M-parameter model; the grader's stopwatch, alternating with "
                          f"yours, read {measured['grader_measured_tok_s']}: {yours_over_ours:.2f}x, outside "
                          f"[{agree_lo}, {agree_hi}]: {hint}", **measured)
    if not lo <= yours_over_predicted <= hi:
        raise CheckFailed(f"your measure_decode_tokens_per_s read {measured['your_measured_tok_s']} tokens/s, "
                          f"{yours_over_predicted:.2f}x the roofline of {measured['predicted_tok_s']}: outside "
                          f"[{lo}, {hi}] (above 1 a step would read the weights faster than the memory delivers "
                          "them): time one-token steps of the model you are given", **measured)
    return measured


def check_gb3(predict_fn: Any, measure_fn: Any, read_fn: Any = None, profile: str | None = None) -> dict[str, Any]:
    """GB3 self-check: the roofline formula on the public inputs; your stopwatch on a stand-in of known speed;
    then a random-weight Llama of 100-250M parameters, measured by your stopwatch and the check's in turn,
    against the roofline from a fresh bandwidth probe. `read_fn`, your GB2 weights_read_per_forward, is asked
    only to explain a wrong prediction."""
    from ...perf import threshold

    functions = {"predict_decode_tokens_per_s": predict_fn}
    if read_fn is not None:
        functions["weights_read_per_forward"] = read_fn
    ask, maybe = local_answers(functions)
    public = stored("GB3")
    verify_gb3_formula(ask, maybe, public["cases"])
    model = stand_in(PUBLIC_SEED)
    with torch.no_grad():
        got = plain(measure_fn(model, STAND_IN_STEPS))
    measured = judge_stand_in(got, model, STAND_IN_STEPS)
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {**measured, "timing": "by the autograder, on a model of its own"}
    band = threshold(LAB, "GB3", profile)
    device, dtype = roofline_setting()
    args = ModelArgs(**public["decode_model"]["args"])
    built = random_llama(args, public["decode_model"]["seed"], dtype, device)
    with one_cpu_thread(device):
        run = interleaved(lambda: plain(measure_fn(built, MEASURE_STEPS)), built)
    params, built = built.num_parameters, None  # 0.7 GB in fp32: given back before the next cell
    predicted = [as_float(plain(predict_fn(ModelArgs(**args.to_dict()), dtype, bandwidth, 1)),
                          "predict_decode_tokens_per_s") for bandwidth in run["bandwidths"]]
    return {**measured, **judge_measurement(run, predicted, band, params, dtype)}


# ------------------------------------------------------------------------------------------------ GB4

def verify_gb4(ask: Ask, maybe: Ask, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s at batch 1 from a datasheet's bandwidth, and whether weights + KV at the context fit in memory."""
    for case in cases:
        inputs, facts = case["inputs"], case["facts"]
        want_tok_s, want_fits = case["expected"]
        answer = ask("predict_on_hardware", inputs)
        if not isinstance(answer, list) or len(answer) != 2:
            raise CheckFailed(f"predict_on_hardware must return a pair (tokens_per_s, fits); got {_shown(answer)}")
        tok_s = as_float(answer[0], "predict_on_hardware (tokens_per_s)")
        if not isinstance(answer[1], bool):
            raise CheckFailed(f"predict_on_hardware's second value must be a bool (fits); got {_shown(answer[1])}")
        fits, hardware = answer[1], inputs["hardware"]
        spec = (f"{case['config']}, {inputs['dtype']}, bandwidth_gb_s={hardware['bandwidth_gb_s']}, "
                f"memory_gb={hardware['memory_gb']:.6g}, context_len={inputs['context_len']}")
        if not close(tok_s, want_tok_s):
            theirs = number(maybe("predict_decode_tokens_per_s", {"args": inputs["args"], "dtype": inputs["dtype"],
                                                                 "bandwidth_gb_s": hardware["bandwidth_gb_s"],
                                                                 "batch_size": 1}))
            if theirs is not None and close(tok_s, theirs) and not close(theirs, want_tok_s):
                hint = ("these are your predict_decode_tokens_per_s's tokens/s, and it is wrong for this input: make "
                        "GB3's prediction right first")
            else:
                hint = ("at batch 1, tokens/s = bandwidth / bytes of weights read per step (your "
                        "predict_decode_tokens_per_s)")
            raise CheckFailed(f"predict_on_hardware({spec}) predicts {tok_s:.6g} tokens/s, expected {want_tok_s:.6g}: "
                              f"{hint}", got=tok_s, expected=want_tok_s)
        if fits != want_fits:
            need = facts["need"]
            theirs = maybe("memory_needed", {"args": inputs["args"], "dtype": inputs["dtype"], "batch_size": 1,
                                             "context_len": inputs["context_len"]})
            theirs = theirs if isinstance(theirs, int) and not isinstance(theirs, bool) else None
            # A memory_needed that overstates the need explains a wrong "does not fit", one that understates it a
            # wrong "fits".
            if theirs is not None and theirs != need and (theirs > need) == want_fits:
                hint = (f"it follows from your memory_needed, which gives {theirs:,} bytes for one sequence of "
                        f"{inputs['context_len']} tokens where {need:,} are needed: make GB1's memory_needed right "
                        "first")
            else:
                hint = (f"it needs {need / GB:.6g} GB (weights + the KV cache of one sequence of context_len tokens, "
                        f"at {facts['element_size']} bytes per element) and has {hardware['memory_gb']:.6g} GB, "
                        "counting 1 GB = 1e9 bytes as datasheets do")
            raise CheckFailed(f"predict_on_hardware({spec}) says fits={fits}: {hint}", got=fits, expected=want_fits)
    return {"cases": len(cases)}


def check_gb4(predict_fn: Any, decode_fn: Any = None, memory_fn: Any = None) -> dict[str, Any]:
    """GB4 self-check: predict_on_hardware on the public configurations and made-up devices. `decode_fn` (your
    GB3 predict_decode_tokens_per_s) and `memory_fn` (your GB1 memory_needed) are asked only to explain a
    wrong answer."""
    functions = {"predict_on_hardware": predict_fn}
    if decode_fn is not None:
        functions["predict_decode_tokens_per_s"] = decode_fn
    if memory_fn is not None:
        functions["memory_needed"] = memory_fn
    ask, maybe = local_answers(functions)
    return verify_gb4(ask, maybe, stored("GB4")["cases"])
