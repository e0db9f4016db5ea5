"""grader.labs.gpu_basics: the checks of the gpu_basics lab (book ch. 3), tasks G1 to G4.

Each check takes the learner's functions and the inputs to try. The notebook's self-checks
call them with `PUBLIC_SEED`; the hidden tests call them with a seed drawn at grading time,
which changes the random configurations, dtypes, batch sizes, bandwidths and hardware specs.

The learner's surface, fixed by the notebook:
  G1 `parameter_count(args) -> int`, `weight_bytes(args, dtype) -> int`,
     `memory_needed(args, dtype, batch_size, context_len) -> int` (weights + KV cache).
  G2 `weights_read_per_forward(args) -> int`, `forward_flops(args, batch_size, n_tokens) -> int`,
     `arithmetic_intensity(args, dtype, batch_size, n_tokens) -> float` (FLOPs per byte of weights read).
  G3 `predict_decode_tokens_per_s(args, dtype, bandwidth_gb_s, batch_size=1) -> float` (the roofline)
     and `measure_decode_tokens_per_s(model, steps=10) -> float`; the grader measures a random-weight
     Llama of 100-250M parameters and the machine's bandwidth, and the measured/predicted ratio must
     lie in the band of `grader/thresholds/gpu_basics.json` for this hardware profile.
  G4 `predict_on_hardware(args, dtype, hardware, context_len) -> (tokens_per_s, fits)` for a
     datasheet entry `{"bandwidth_gb_s": ..., "memory_gb": ...}`.

Only G3's band depends on the machine, and only through a ratio of two things measured in the
same process, round by round: the decode rate and the bandwidth probe. Everything else is exact.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer

from ..checks import CheckFailed
from ..perf import threshold

LAB = "gpu_basics"
PUBLIC_SEED = 0
TASKS = {"G1": "parameter count, weight bytes and memory needed",
         "G2": "FLOPs, bytes and arithmetic intensity of prefill and decode",
         "G3": "roofline prediction of decode tokens/s, checked against a measurement",
         "G4": "datasheet predictions: tokens/s and fit in memory"}
DEFINING_CELLS = ("setup",)

REAL_CONFIGS = ("llama-3-8b", "llama-3-70b", "qwen2.5-0.5b", "tiny")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GB = 1e9  # datasheets count bandwidth and memory in decimal gigabytes


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


# ---------------------------------------------------------------- the formulas the answers must follow

def expected_parameter_count(args: ModelArgs) -> int:
    """Embedding + per layer (attention with GQA, SwiGLU MLP, two norms) + final norm + untied head."""
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    attention = args.dim * q_out + 2 * args.dim * kv_out + q_out * args.dim
    if args.qkv_bias:
        attention += q_out + 2 * kv_out
    if args.out_bias:
        attention += args.dim
    mlp = 3 * args.dim * args.ffn_dim
    per_layer = attention + mlp + 2 * args.dim
    head = 0 if args.tie_embeddings else args.vocab_size * args.dim
    return args.vocab_size * args.dim + args.n_layers * per_layer + args.dim + head


def expected_kv_bytes(args: ModelArgs, dtype: torch.dtype, batch_size: int, context_len: int) -> int:
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * element_size(dtype) * context_len * batch_size


def expected_memory_needed(args: ModelArgs, dtype: torch.dtype, batch_size: int, context_len: int) -> int:
    return expected_parameter_count(args) * element_size(dtype) + expected_kv_bytes(args, dtype, batch_size,
                                                                                    context_len)


def expected_weights_read(args: ModelArgs) -> int:
    """Every parameter but the embedding table, of which a forward reads one row per token (unless it is
    tied to the output head, which reads all of it)."""
    count = expected_parameter_count(args)
    return count if args.tie_embeddings else count - args.vocab_size * args.dim


def expected_forward_flops(args: ModelArgs, batch_size: int, n_tokens: int) -> int:
    return 2 * expected_weights_read(args) * batch_size * n_tokens


def expected_intensity(args: ModelArgs, dtype: torch.dtype, batch_size: int, n_tokens: int) -> float:
    return expected_forward_flops(args, batch_size, n_tokens) / (expected_weights_read(args) * element_size(dtype))


def expected_decode_tokens_per_s(args: ModelArgs, dtype: torch.dtype, bandwidth_gb_s: float,
                                 batch_size: int = 1) -> float:
    """The roofline at short context: each decode step reads every weight once and yields batch_size tokens."""
    return batch_size * bandwidth_gb_s * GB / (expected_weights_read(args) * element_size(dtype))


# ---------------------------------------------------------------- inputs drawn from a seed

def random_args(rng: np.random.Generator) -> ModelArgs:
    """A small random architecture: GQA or MHA, head_dim not always dim / n_heads, biases, tied or not."""
    n_kv = int(rng.choice([1, 2, 4]))
    n_heads = n_kv * int(rng.choice([1, 2, 4]))
    head_dim = int(rng.choice([8, 16, 32]))
    dim = n_heads * head_dim if rng.random() < 0.5 else int(rng.choice([48, 64, 96]))
    return ModelArgs(vocab_size=int(rng.integers(50, 500)), dim=dim, n_layers=int(rng.integers(1, 5)),
                     n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=int(rng.integers(16, 200)),
                     max_seq_len=128, qkv_bias=bool(rng.random() < 0.5), out_bias=bool(rng.random() < 0.3),
                     tie_embeddings=bool(rng.random() < 0.5))


def config_cases(rng: np.random.Generator, n_random: int = 3) -> list[tuple[str, ModelArgs]]:
    """The real configurations, then random ones (always one tied and one untied)."""
    cases = [(name, ModelArgs.from_name(name)) for name in REAL_CONFIGS]
    randoms = [random_args(rng) for _ in range(n_random)]
    randoms[0].tie_embeddings, randoms[1].tie_embeddings = True, False
    return cases + [(f"a random config ({describe(a)})", a) for a in randoms]


def describe(args: ModelArgs) -> str:
    return (f"vocab_size={args.vocab_size}, dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
            f"n_kv_heads={args.n_kv_heads}, head_dim={args.head_dim}, ffn_dim={args.ffn_dim}, "
            f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}, tie_embeddings={args.tie_embeddings}")


def built_parameter_count(args: ModelArgs) -> int:
    """What the model really has: built on the meta device (no memory), so even Llama-3-70B costs nothing."""
    with torch.device("meta"):
        return Transformer(args).num_parameters


def decode_model_args(seed: int) -> ModelArgs:
    """A Llama of 100-250M parameters: far larger than any CPU cache, so decode streams it from memory."""
    rng = np.random.default_rng(seed)
    while True:
        n_heads = int(rng.choice([12, 14, 16, 18]))
        n_kv = int(rng.choice([k for k in (1, 2, 3, 4, 6) if n_heads % k == 0]))
        dim = 64 * n_heads
        args = ModelArgs(vocab_size=int(rng.integers(16_000, 50_000)), dim=dim, n_layers=int(rng.integers(8, 17)),
                         n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=128 * int(dim * rng.uniform(2.5, 3.5) / 128),
                         max_seq_len=64, tie_embeddings=bool(rng.random() < 0.5))
        if 100e6 <= expected_parameter_count(args) <= 250e6:
            return args


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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def roofline_setting() -> tuple[str, torch.dtype]:
    """Where G3 measures: bf16 on a GPU; fp32 on a CPU, whose bf16 matrix-vector kernels reach less of the
    bandwidth (9 against 13 GB/s of a 31 GB/s probe on the lab's machine) and would blur the comparison."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


# ---------------------------------------------------------------- answer plumbing

def as_int(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CheckFailed(f"{what} must return an int (a count of parameters, FLOPs or bytes); "
                          f"got {type(value).__name__} {value!r}")
    return int.__index__(int(value))


def as_float(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CheckFailed(f"{what} must return a number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise CheckFailed(f"{what} returned {value}: it must be a finite number")
    return value


def close(got: float, want: float, rel: float = 1e-6) -> bool:
    return abs(got - want) <= rel * abs(want)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- G1

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


def check_g1(count_fn: Any, bytes_fn: Any, memory_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """Parameter count, weight bytes and weights + KV bytes for real and random configs; the count must also
    equal the parameters of the model actually built from each config."""
    rng = np.random.default_rng(seed)
    for name, args in config_cases(rng):
        want = expected_parameter_count(args)
        if want != built_parameter_count(args):  # the grader's own formula, proven on every config it grades
            raise RuntimeError(f"grader bug: expected_parameter_count disagrees with the model built for {name}")
        got = as_int(count_fn(copy.copy(args)), "parameter_count")
        if got != want:
            raise CheckFailed(f"parameter_count({name}) = {got:,}, but the model built from this config has "
                              f"{want:,} parameters ({got - want:+,}): {_parameter_hint(args, got, want)}",
                              config=name, got=got, expected=want)
    for name, args in config_cases(rng):
        for dtype in DTYPES:
            want = expected_parameter_count(args) * element_size(dtype)
            got = as_int(bytes_fn(copy.copy(args), dtype), "weight_bytes")
            if got != want:
                hint = (f"use the element size of {_name(dtype)} ({element_size(dtype)} bytes): "
                        "bytes_per_element(dtype)" if got % expected_parameter_count(args) == 0
                        else "weight bytes = parameter_count(args) x bytes per element")
                raise CheckFailed(f"weight_bytes({name}, {_name(dtype)}) = {got:,}, expected {want:,}: {hint}",
                                  config=name, got=got, expected=want)
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        batch, context = int(rng.integers(1, 33)), int(rng.integers(1, 32_769))
        want = expected_memory_needed(args, dtype, batch, context)
        got = as_int(memory_fn(copy.copy(args), dtype, batch, context), "memory_needed")
        if got != want:
            weights, kv = expected_parameter_count(args) * element_size(dtype), expected_kv_bytes(args, dtype, batch,
                                                                                                  context)
            if got == weights:
                hint = "add the KV cache: the weights alone are not all a server must hold"
            elif got == weights + kv * args.n_heads // args.n_kv_heads:
                hint = "the KV cache holds n_kv_heads heads per layer, not n_heads"
            elif got in (weights + kv // batch, weights + kv // context):
                hint = "the KV cache grows with both the batch size and the context length"
            else:
                hint = ("memory = weight bytes + 2 (K and V) x n_layers x n_kv_heads x head_dim x bytes per element "
                        "x context_len x batch_size")
            raise CheckFailed(f"memory_needed({name}, {_name(dtype)}, batch_size={batch}, context_len={context}) = "
                              f"{got:,}, expected {want:,}: {hint}", config=name, got=got, expected=want)
    seventy = ModelArgs.from_name("llama-3-70b")
    return {"llama_3_70b_params": expected_parameter_count(seventy),
            "llama_3_70b_bf16_GB": round(expected_parameter_count(seventy) * 2 / GB, 1)}


# ---------------------------------------------------------------- G2

def check_g2(read_fn: Any, flops_fn: Any, intensity_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """Weights read per forward, its FLOPs, and FLOPs per byte, for prefill (many tokens) and decode (one)."""
    rng = np.random.default_rng(seed)
    for name, args in config_cases(rng):
        want = expected_weights_read(args)
        got = as_int(read_fn(copy.copy(args)), "weights_read_per_forward")
        if got != want:
            embedding = args.vocab_size * args.dim
            if not args.tie_embeddings and got == want + embedding:
                hint = ("the embedding table is untied here: a forward reads only the rows of its tokens (a rounding "
                        "error), so leave the table out; the output head, read in full, stays in")
            elif args.tie_embeddings and got == want - embedding:
                hint = ("with tied embeddings the output head is the embedding table, and the head reads all of it "
                        "every forward: count it (once)")
            else:
                hint = "start from the parameter count and drop what a forward does not read in full"
            raise CheckFailed(f"weights_read_per_forward({name}) = {got:,}, expected {want:,}: {hint}",
                              config=name, got=got, expected=want)
        for batch, tokens in ((int(rng.integers(1, 65)), 1), (1, int(rng.integers(2, 4097))),
                              (int(rng.integers(2, 9)), int(rng.integers(2, 513)))):
            want = expected_forward_flops(args, batch, tokens)
            got = as_int(flops_fn(copy.copy(args), batch, tokens), "forward_flops")
            if got != want:
                hint = {want // 2: "a multiply-add is 2 FLOPs: FLOPs = 2 x weights read x tokens",
                        want // batch: "every sequence of the batch does the work: multiply by batch_size",
                        want // tokens: "every token does the work: multiply by n_tokens"}.get(
                    got, "FLOPs = 2 x weights read per forward x batch_size x n_tokens")
                raise CheckFailed(f"forward_flops({name}, batch_size={batch}, n_tokens={tokens}) = {got:,}, expected "
                                  f"{want:,}: {hint}", config=name, got=got, expected=want)
            dtype = DTYPES[int(rng.integers(len(DTYPES)))]
            want = expected_intensity(args, dtype, batch, tokens)
            got = as_float(intensity_fn(copy.copy(args), dtype, batch, tokens), "arithmetic_intensity")
            if not close(got, want):
                elem = element_size(dtype)
                if close(got * batch, want) and batch > 1:
                    hint = ("a forward reads each weight once for the whole batch: the bytes do not grow with "
                            "batch_size (that is why batching helps decode)")
                elif close(got * elem, want * 4) and elem != 4:
                    hint = f"{_name(dtype)} weights take {elem} bytes each, not 4"
                elif close(got * tokens, want) and tokens > 1:
                    hint = "a forward reads each weight once for all its tokens: the bytes do not grow with n_tokens"
                else:
                    hint = "intensity = forward FLOPs / (weights read x bytes per element)"
                raise CheckFailed(f"arithmetic_intensity({name}, {_name(dtype)}, batch_size={batch}, n_tokens={tokens})"
                                  f" = {got:.6g} FLOP/byte, expected {want:.6g}: {hint}",
                                  config=name, got=got, expected=want)
    eight = ModelArgs.from_name("llama-3-8b")
    return {"llama_3_8b_decode_intensity_bf16": expected_intensity(eight, torch.bfloat16, 1, 1),
            "llama_3_8b_prefill_512_intensity_bf16": expected_intensity(eight, torch.bfloat16, 1, 512)}


# ---------------------------------------------------------------- G3

class _FakeDecoder(torch.nn.Module):
    """Stands in for a model whose decode step takes `step_s` seconds: a slow first call (cold caches, lazy
    initialisation) and an occasional hiccup (another process), so only a warmed-up median reads `step_s`."""

    def __init__(self, args: ModelArgs, step_s: float, first_s: float, hiccup_s: float, hiccup_every: int):
        super().__init__()
        self.args = args
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so next(model.parameters()) gives a device and dtype
        self.step_s, self.first_s, self.hiccup_s, self.hiccup_every = step_s, first_s, hiccup_s, hiccup_every
        self.calls = 0
        self.tokens_seen: list[int] = []

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: Any = None,
                attention_mask: Any = None) -> torch.Tensor:
        self.calls += 1
        self.tokens_seen.append(int(tokens.numel()))
        if self.calls == 1:
            delay = self.first_s
        elif self.calls % self.hiccup_every == 0:
            delay = self.hiccup_s
        else:
            delay = self.step_s
        time.sleep(delay)
        return torch.zeros(*tokens.shape, self.args.vocab_size)


def check_g3_formula(predict_fn: Any, seed: int = PUBLIC_SEED) -> None:
    """The roofline for real and random configs, drawn dtypes and bandwidths, at batch 1 and above."""
    rng = np.random.default_rng(seed)
    for i, (name, args) in enumerate(config_cases(rng, n_random=2)):
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        bandwidth, batch = float(rng.uniform(5, 5000)), 1 if i % 2 == 0 else int(rng.integers(2, 65))
        want = expected_decode_tokens_per_s(args, dtype, bandwidth, batch)
        got = as_float(predict_fn(copy.copy(args), dtype, bandwidth, batch), "predict_decode_tokens_per_s")
        if not close(got, want):
            ratio = got / want
            hints = [(2**30 / 1e9, "a GB/s of bandwidth is 1e9 bytes per second here, as in datasheets, not 2**30"),
                     (1e9 / 2**30, "a GB/s of bandwidth is 1e9 bytes per second here, as in datasheets, not 2**30"),
                     (element_size(dtype), f"divide by the bytes of every weight read: {_name(dtype)} weights take "
                                           f"{element_size(dtype)} bytes each"),
                     (1 / batch, "one decode step reads the weights once and gives one token for each of the "
                                 "batch_size sequences: multiply by batch_size")]
            hint = next((h for r, h in hints if r != 1 and close(ratio, r, 1e-3)),
                        "tokens/s = batch_size x bandwidth (bytes/s) / bytes of weights read per decode step")
            raise CheckFailed(f"predict_decode_tokens_per_s({name}, {_name(dtype)}, bandwidth_gb_s={bandwidth:.1f}, "
                              f"batch_size={batch}) = {got:.6g}, expected {want:.6g} ({ratio:.3g}x): {hint}",
                              config=name, got=got, expected=want)


def check_g3_measure(measure_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """The learner's stopwatch on a stand-in model of known step time; it must read the steady-state rate."""
    rng = np.random.default_rng(seed)
    step_s = float(rng.uniform(0.035, 0.05))  # long enough that a busy scheduler adds little; ms != tokens/s
    fake = _FakeDecoder(ModelArgs.from_name("tiny-draft"), step_s, first_s=6 * step_s, hiccup_s=4 * step_s,
                        hiccup_every=int(rng.integers(4, 6)))
    want = 1 / step_s
    with torch.no_grad():
        got = as_float(measure_fn(fake, 8), "measure_decode_tokens_per_s")
    if max(fake.tokens_seen, default=0) > 1:
        raise CheckFailed(f"measure_decode_tokens_per_s fed {max(fake.tokens_seen)} tokens in one call: a decode step "
                          "is one new token for one sequence, tokens of shape [1, 1]")
    if fake.calls < 4:
        raise CheckFailed(f"measure_decode_tokens_per_s called the model {fake.calls} times: warm up first, then time "
                          "several steps (`steps` of them) and take the median")
    if not 0.85 * want <= got <= 1.15 * want:
        if close(got, step_s, 0.1) or close(got, 1e3 * step_s, 0.1):
            hint = "return tokens per second (1 / seconds per step), not the time of a step"
        elif got < want:
            hint = ("a slow first call or an occasional hiccup pulled your number down: do one untimed warm-up "
                    "step, then time each step separately and take the median, not the mean or the total")
        else:
            hint = "time each step separately (one token per step) and return 1 / median step time"
        raise CheckFailed(f"measure_decode_tokens_per_s read {got:.4g} tokens/s from a model whose steady decode "
                          f"step takes {step_s * 1e3:.1f} ms ({want:.4g} tokens/s; its first call and every few "
                          f"steps are slower): {hint}", got=got, expected=want)
    return {"stand_in_tok_s": round(got, 1)}


@torch.no_grad()
def roofline_measurement(model: Transformer, predict_fn: Any, rounds: int = 5, steps: int = 3,
                         array_mb: int = 128) -> dict[str, Any]:
    """Interleaved rounds of (bandwidth probe, decode steps): a ratio per round pairs numbers taken
    moments apart, so a neighbour that slows the machine slows both; the median ratio is the verdict."""
    from inferlab.bench import memory_bandwidth, time_once

    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    token, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(2):  # warm-up: first calls pay for lazy initialisation and cold pages
        model(token, pos)
    ratios, rates, bandwidths = [], [], []
    for _ in range(rounds):
        bandwidth = memory_bandwidth(array_mb=array_mb, repeats=3, device=str(device)).triad_gb_s
        step = statistics.median(time_once(lambda: model(token, pos), device) for _ in range(steps))
        predicted = as_float(predict_fn(copy.copy(model.args), dtype, bandwidth, 1), "predict_decode_tokens_per_s")
        if predicted <= 0:
            raise CheckFailed(f"predict_decode_tokens_per_s returned {predicted}: a rate must be positive")
        rates.append(1 / step)
        bandwidths.append(bandwidth)
        ratios.append(1 / step / predicted)
    return {"ratio": statistics.median(ratios), "ratios": ratios, "measured_tok_s": statistics.median(rates),
            "bandwidth_gb_s": statistics.median(bandwidths)}


def check_g3(predict_fn: Any, measure_fn: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None,
             profile: str | None = None) -> dict[str, Any]:
    """The roofline formula on drawn inputs; the learner's stopwatch on a stand-in; then a random-weight Llama
    of 100-250M parameters (the seed's, or `model`), measured here, must decode at a rate within the
    calibrated band of the prediction."""
    check_g3_formula(predict_fn, seed)
    measured = check_g3_measure(measure_fn, seed)
    if model is not None and os.environ.get("INFERLAB_AUTOGRADE"):
        # The notebook's self-check under the autograder: the hidden test measures a model of its own anyway.
        return {**measured, "timing": "by the hidden test, on a model of its own"}
    band = threshold(LAB, "G3", profile)
    if model is None:
        device, dtype = roofline_setting()
        args = decode_model_args(seed)
        built = random_llama(args, seed, dtype, device)
    else:  # the notebook's own model: it frees it itself
        built, args = model, model.args
        device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    try:
        with one_cpu_thread(device):
            run = roofline_measurement(built, predict_fn)
            yours = as_float(measure_fn(built, 5), "measure_decode_tokens_per_s")
    finally:
        del built
        if model is None:
            gc.collect()
    predicted = as_float(predict_fn(copy.copy(args), dtype, run["bandwidth_gb_s"], 1),
                         "predict_decode_tokens_per_s")
    lo, hi = band["min_measured_over_predicted"], band["max_measured_over_predicted"]
    measured.update(params_M=round(expected_parameter_count(args) / 1e6, 1), dtype=_name(dtype),
                    bandwidth_gb_s=round(run["bandwidth_gb_s"], 1), predicted_tok_s=round(predicted, 1),
                    measured_tok_s=round(run["measured_tok_s"], 1), your_measured_tok_s=round(yours, 1),
                    measured_over_predicted=round(run["ratio"], 2), band=[lo, hi], profile=band["profile"])
    if not lo <= run["ratio"] <= hi:
        # The formula already passed, so the machine, not the algebra, disagrees with the roofline.
        raise CheckFailed(f"a {measured['params_M']}M-parameter {_name(dtype)} model decoded at "
                          f"{run['measured_tok_s']:.1f} tokens/s against a prediction of {predicted:.1f} from "
                          f"{run['bandwidth_gb_s']:.1f} GB/s: a ratio of {run['ratio']:.2f}, outside the band "
                          f"[{lo}, {hi}] calibrated for the {band['profile']} profile. Your formula is right, so the "
                          "measurement was disturbed (a much busier machine than at calibration) or this hardware "
                          "needs its own profile: run the check again, and tell your instructor if it keeps failing",
                          **measured)
    if not 0.25 <= yours / run["measured_tok_s"] <= 4.0:
        # Loose on purpose: two stopwatches a second apart on a shared machine differ by up to 2x; a wrong
        # unit or a wrong input is off by far more. The stand-in above already checked the method.
        raise CheckFailed(f"your measure_decode_tokens_per_s read {yours:.1f} tokens/s on the random model, the "
                          f"grader's measurement {run['measured_tok_s']:.1f}: feed one token of shape [1, 1] per step "
                          "to model(tokens, input_pos) and return 1 / median step seconds", **measured)
    return measured


# ---------------------------------------------------------------- G4

def hardware_cases(rng: np.random.Generator, args: ModelArgs) -> list[tuple[torch.dtype, int, dict[str, float]]]:
    """Made-up devices whose memory lands just where a slip changes the verdict, one of each kind:
    a tight fit in 16 bits (caught: 4 bytes per bf16 weight), memory between the weights alone and
    weights + KV (caught: forgetting the cache), just short of the need (caught: GB read as GiB), and
    a roomy or a hopeless one."""
    cases = []
    for kind in ("tight", "between", "short", "other"):
        dtype = (torch.bfloat16, torch.float16)[int(rng.integers(2))] if kind == "tight" else \
            DTYPES[int(rng.integers(len(DTYPES)))]
        context = int(rng.integers(1, min(args.max_seq_len, 32_768) + 1))
        weights = expected_parameter_count(args) * element_size(dtype)
        total = expected_memory_needed(args, dtype, 1, context)
        memory = {"tight": total * rng.uniform(1.001, 1.05), "between": (weights + total) / 2,
                  "short": total * rng.uniform(0.94, 0.99),
                  "other": total * (rng.uniform(1.5, 3.0) if rng.random() < 0.5 else rng.uniform(0.1, 0.5))}[kind]
        cases.append((dtype, context, {"bandwidth_gb_s": round(float(rng.uniform(20, 8000)), 1),
                                       "memory_gb": float(memory) / GB}))
    return cases


def check_g4(predict_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """Tokens/s at batch 1 from a datasheet's bandwidth, and whether weights + KV at the context fit in memory."""
    rng = np.random.default_rng(seed)
    checked = 0
    for name, args in config_cases(rng, n_random=2):
        for dtype, context, hardware in hardware_cases(rng, args):
            answer = predict_fn(copy.copy(args), dtype, dict(hardware), context)
            if not isinstance(answer, (tuple, list)) or len(answer) != 2:
                raise CheckFailed(f"predict_on_hardware must return a pair (tokens_per_s, fits); got {answer!r}")
            tok_s = as_float(answer[0], "predict_on_hardware (tokens_per_s)")
            if not isinstance(answer[1], (bool, np.bool_)):
                raise CheckFailed(f"predict_on_hardware's second value must be a bool (fits); got {answer[1]!r}")
            fits = bool(answer[1])
            want_tok_s = expected_decode_tokens_per_s(args, dtype, hardware["bandwidth_gb_s"], 1)
            need = expected_memory_needed(args, dtype, 1, context)
            want_fits = need <= hardware["memory_gb"] * GB
            spec = (f"{name}, {_name(dtype)}, bandwidth_gb_s={hardware['bandwidth_gb_s']}, "
                    f"memory_gb={hardware['memory_gb']:.6g}, context_len={context}")
            if not close(tok_s, want_tok_s):
                raise CheckFailed(f"predict_on_hardware({spec}) predicts {tok_s:.6g} tokens/s, expected "
                                  f"{want_tok_s:.6g}: at batch 1, tokens/s = bandwidth / bytes of weights read per "
                                  "step (your predict_decode_tokens_per_s)", got=tok_s, expected=want_tok_s)
            if fits != want_fits:
                hint = (f"it needs {need / GB:.6g} GB (weights + the KV cache of one sequence of context_len tokens, "
                        f"at {element_size(dtype)} bytes per element) and has {hardware['memory_gb']:.6g} GB, "
                        "counting 1 GB = 1e9 bytes as datasheets do")
                raise CheckFailed(f"predict_on_hardware({spec}) says fits={fits}: {hint}", got=fits, expected=want_fits)
            checked += 1
    return {"cases": checked}


__all__ = ["LAB", "PUBLIC_SEED", "TASKS", "check_g1", "check_g2", "check_g3", "check_g4", "random_llama",
           "decode_model_args", "roofline_measurement", "calibrate"]


# ---------------------------------------------------------------- calibration of G3's band

def calibrate(seed: int = PUBLIC_SEED, runs: int = 10) -> dict[str, Any]:
    """Measure the reference formula's measured/predicted ratio `runs` times, on the models of seeds
    seed..seed+runs-1, and propose the band.

    Rule: the roofline is an upper bound, so the band's top is 1.25 (the probe's own noise on top of
    1.0). Its bottom is half the lowest ratio seen, a multiplicative margin of 2 for a busy machine.
    Run it twice at once as well (two autograde workers measure at the same time) and take the lowest
    of all runs: the committed cpu profile records both sets.
    """
    ratios, details = [], []
    device, dtype = roofline_setting()
    for i in range(runs):
        args = decode_model_args(seed + i)
        model = random_llama(args, seed + i, dtype, device)
        with one_cpu_thread(device):
            run = roofline_measurement(model, expected_decode_tokens_per_s)
        del model
        gc.collect()
        ratios.append(round(run["ratio"], 3))
        details.append({"params_M": round(expected_parameter_count(args) / 1e6, 1),
                        "bandwidth_gb_s": round(run["bandwidth_gb_s"], 1),
                        "measured_tok_s": round(run["measured_tok_s"], 1), "ratio": round(run["ratio"], 3)})
    low = math.floor(50 * min(ratios)) / 100
    return {"G3": {
        "min_measured_over_predicted": low, "max_measured_over_predicted": 1.25,
        "calibration": {
            "ratios": ratios, "median_ratio": round(statistics.median(ratios), 3), "runs": details,
            "dtype": _name(dtype), "cpu_threads": 1 if device == "cpu" else None,
            "note": (f"{runs} runs of the reference prediction (triad bandwidth of the probe) against the measured "
                     f"decode rate of random-weight Llamas of 100-250M parameters ({_name(dtype)}), ratios "
                     f"{min(ratios):.2f}-{max(ratios):.2f}, median {statistics.median(ratios):.2f}; band = "
                     f"[half the lowest, 1.25]")}}}
