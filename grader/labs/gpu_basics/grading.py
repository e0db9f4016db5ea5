"""grader.labs.gpu_basics.grading: the checker's side of the gpu_basics lab. Never in a sandbox nor a learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed process
reached through the probes) and a seed drawn at grading time, draws the inputs from it, computes
what is expected here, and judges with the `verify_*` functions of `public.py`.

  GB1, GB2, GB4  exact formulas on real and random configurations, dtypes, batch sizes, contexts and
      made-up devices drawn from the seed. The formulas live only in this file; the parameter count
      is proven on every configuration against the model the runtime builds from it.
  GB3 the roofline formula, exact; then the learner's stopwatch, in two parts:
      - on a stand-in of known step time that runs here (served): its first call and every few
        steps are slow, so only a warmed-up median reads the right rate, and every call and the
        shape of its tokens are counted here, where the learner's process cannot change them;
      - on a random-weight Llama of 100-250M parameters drawn from the seed, built in the
        learner's process (a served model cannot be timed) and here, with the same weights.
        The learner's `measure_decode_tokens_per_s` and the checker's own stopwatch take turns
        (theirs, ours, theirs, ...); the ratio of their medians must lie in a generous band
        calibrated in grader/thresholds/gpu_basics.json, and both under the roofline.
      What can be forged: the number the learner's process returns, and how it measured it. What
      cannot: the stand-in's step time and call count, and the checker's own measurement, which a
      forged number has to agree with on a model and machine it did not choose.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import statistics
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer

from ...perf import threshold
from .. import load
from . import SPEC
from .public import (DTYPE_NAMES, GB, MEASURE_ROUNDS, MEASURE_STEPS, STAND_IN_STEPS, Ask, Disturbed,
                     interleaved, judge_measurement, judge_stand_in, one_cpu_thread, random_llama,
                     roofline_setting, stand_in, verify_gb1, verify_gb2, verify_gb3_formula, verify_gb4)

LAB = SPEC.name
REAL_CONFIGS = ("llama-3-8b", "llama-3-70b", "qwen2.5-0.5b", "tiny")


def element_size(dtype: str) -> int:
    return torch.tensor([], dtype=getattr(torch, dtype)).element_size()


# ------------------------------------------------------------------------------------------------ the formulas

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


def expected_kv_bytes(args: ModelArgs, dtype: str, batch_size: int, context_len: int) -> int:
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * element_size(dtype) * context_len * batch_size


def expected_memory_needed(args: ModelArgs, dtype: str, batch_size: int, context_len: int) -> int:
    return expected_parameter_count(args) * element_size(dtype) + expected_kv_bytes(args, dtype, batch_size,
                                                                                    context_len)


def expected_weights_read(args: ModelArgs) -> int:
    """Every parameter but the embedding table, of which a forward reads one row per token (unless it is
    tied to the output head, which reads all of it)."""
    count = expected_parameter_count(args)
    return count if args.tie_embeddings else count - args.vocab_size * args.dim


def expected_forward_flops(args: ModelArgs, batch_size: int, n_tokens: int) -> int:
    return 2 * expected_weights_read(args) * batch_size * n_tokens


def expected_intensity(args: ModelArgs, dtype: str, batch_size: int, n_tokens: int) -> float:
    return expected_forward_flops(args, batch_size, n_tokens) / (expected_weights_read(args) * element_size(dtype))


def expected_decode_tokens_per_s(args: ModelArgs, dtype: str, bandwidth_gb_s: float, batch_size: int = 1) -> float:
    """The roofline at short context: each decode step reads every weight once and yields batch_size tokens."""
    return batch_size * bandwidth_gb_s * GB / (expected_weights_read(args) * element_size(dtype))


def built_parameter_count(args: ModelArgs) -> int:
    """What the model really has: built on the meta device (no memory), so even Llama-3-70B costs nothing."""
    with torch.device("meta"):
        return Transformer(args).num_parameters


# ------------------------------------------------------------------------------------------------ inputs from a seed

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


def describe(args: ModelArgs) -> str:
    return (f"vocab_size={args.vocab_size}, dim={args.dim}, n_layers={args.n_layers}, n_heads={args.n_heads}, "
            f"n_kv_heads={args.n_kv_heads}, head_dim={args.head_dim}, ffn_dim={args.ffn_dim}, "
            f"qkv_bias={args.qkv_bias}, out_bias={args.out_bias}, tie_embeddings={args.tie_embeddings}")


def config_cases(rng: np.random.Generator, n_random: int = 3) -> list[tuple[str, ModelArgs]]:
    """The real configurations, then random ones (always one tied and one untied)."""
    cases = [(name, ModelArgs.from_name(name)) for name in REAL_CONFIGS]
    randoms = [random_args(rng) for _ in range(n_random)]
    randoms[0].tie_embeddings, randoms[1].tie_embeddings = True, False
    return cases + [(f"a random config ({describe(a)})", a) for a in randoms]


def draw_dtype(rng: np.random.Generator) -> str:
    return DTYPE_NAMES[int(rng.integers(len(DTYPE_NAMES)))]


def question(function: str, config: str, inputs: dict[str, Any], expected: Any, **facts: Any) -> dict[str, Any]:
    """One call the check makes, with the answer it expects and the facts its hints need (plain data)."""
    return {"function": function, "config": config, "inputs": inputs, "expected": expected, "facts": facts}


def gb1_cases(seed: int) -> list[dict[str, Any]]:
    """Parameter counts of every configuration (each proven against the built model), then weight bytes in every
    dtype and weights + KV for a drawn dtype, batch and context, on newly drawn configurations."""
    rng = np.random.default_rng(seed)
    cases = []
    for name, args in config_cases(rng):
        want = expected_parameter_count(args)
        if want != built_parameter_count(args):  # the grader's own formula, proven on every config it grades
            raise RuntimeError(f"grader bug: expected_parameter_count disagrees with the model built for {name}")
        cases.append(question("parameter_count", name, {"args": args.to_dict()}, want))
    for name, args in config_cases(rng):
        count = expected_parameter_count(args)
        for dtype in DTYPE_NAMES:
            cases.append(question("weight_bytes", name, {"args": args.to_dict(), "dtype": dtype},
                                  count * element_size(dtype), count=count, element_size=element_size(dtype)))
        dtype = draw_dtype(rng)
        batch, context = int(rng.integers(1, 33)), int(rng.integers(1, 32_769))
        cases.append(question("memory_needed", name, {"args": args.to_dict(), "dtype": dtype, "batch_size": batch,
                                                      "context_len": context},
                              expected_memory_needed(args, dtype, batch, context),
                              weights=count * element_size(dtype), kv=expected_kv_bytes(args, dtype, batch, context)))
    return cases


def gb2_cases(seed: int) -> list[dict[str, Any]]:
    """Per configuration: the weights read, then FLOPs and intensity for decode (batch, 1 token), prefill (1, many)
    and a batch of prompts."""
    rng = np.random.default_rng(seed)
    cases = []
    for name, args in config_cases(rng):
        plain_args = args.to_dict()
        cases.append(question("weights_read_per_forward", name, {"args": plain_args}, expected_weights_read(args),
                              count=expected_parameter_count(args), embedding=args.vocab_size * args.dim))
        for batch, tokens in ((int(rng.integers(1, 65)), 1), (1, int(rng.integers(2, 4097))),
                              (int(rng.integers(2, 9)), int(rng.integers(2, 513)))):
            cases.append(question("forward_flops", name, {"args": plain_args, "batch_size": batch, "n_tokens": tokens},
                                  expected_forward_flops(args, batch, tokens)))
            dtype = draw_dtype(rng)
            cases.append(question("arithmetic_intensity", name, {"args": plain_args, "dtype": dtype,
                                                                 "batch_size": batch, "n_tokens": tokens},
                                  expected_intensity(args, dtype, batch, tokens), element_size=element_size(dtype)))
    return cases


def gb3_cases(seed: int) -> list[dict[str, Any]]:
    """The roofline for real and random configurations, drawn dtypes and bandwidths, at batch 1 and above."""
    rng = np.random.default_rng(seed)
    cases = []
    for i, (name, args) in enumerate(config_cases(rng, n_random=2)):
        dtype = draw_dtype(rng)
        bandwidth, batch = float(rng.uniform(5, 5000)), 1 if i % 2 == 0 else int(rng.integers(2, 65))
        cases.append(question("predict_decode_tokens_per_s", name,
                              {"args": args.to_dict(), "dtype": dtype, "bandwidth_gb_s": bandwidth,
                               "batch_size": batch},
                              expected_decode_tokens_per_s(args, dtype, bandwidth, batch),
                              weights_read=expected_weights_read(args), element_size=element_size(dtype)))
    return cases


def hardware_cases(rng: np.random.Generator, args: ModelArgs) -> list[tuple[str, int, dict[str, float]]]:
    """Made-up devices whose memory lands just where a slip changes the verdict, one of each kind:
    a tight fit in 16 bits (caught: 4 bytes per bf16 weight), memory between the weights alone and
    weights + KV (caught: forgetting the cache), just short of the need (caught: GB read as GiB), and
    a roomy or a hopeless one."""
    cases = []
    for kind in ("tight", "between", "short", "other"):
        dtype = ("bfloat16", "float16")[int(rng.integers(2))] if kind == "tight" else draw_dtype(rng)
        context = int(rng.integers(1, min(args.max_seq_len, 32_768) + 1))
        weights = expected_parameter_count(args) * element_size(dtype)
        total = expected_memory_needed(args, dtype, 1, context)
        memory = {"tight": total * rng.uniform(1.001, 1.05), "between": (weights + total) / 2,
                  "short": total * rng.uniform(0.94, 0.99),
                  "other": total * (rng.uniform(1.5, 3.0) if rng.random() < 0.5 else rng.uniform(0.1, 0.5))}[kind]
        cases.append((dtype, context, {"bandwidth_gb_s": round(float(rng.uniform(20, 8000)), 1),
                                       "memory_gb": float(memory) / GB}))
    return cases


def gb4_cases(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    cases = []
    for name, args in config_cases(rng, n_random=2):
        for dtype, context, hardware in hardware_cases(rng, args):
            need = expected_memory_needed(args, dtype, 1, context)
            cases.append(question("predict_on_hardware", name, {"args": args.to_dict(), "dtype": dtype,
                                                                "hardware": hardware, "context_len": context},
                                  [expected_decode_tokens_per_s(args, dtype, hardware["bandwidth_gb_s"], 1),
                                   need <= hardware["memory_gb"] * GB],
                                  need=need, element_size=element_size(dtype)))
    return cases


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


def public_expected() -> dict[str, Any]:
    """What `public_expected.json` must hold: the public seed's inputs and expected values of every self-check."""
    seed = SPEC.public_seed
    data = {"GB1": {"seed": seed, "cases": gb1_cases(seed)}, "GB2": {"seed": seed, "cases": gb2_cases(seed)},
            "GB3": {"seed": seed, "cases": gb3_cases(seed),
                    "decode_model": {"args": decode_model_args(seed).to_dict(), "seed": seed}},
            "GB4": {"seed": seed, "cases": gb4_cases(seed)}}
    return json.loads(json.dumps(data))  # exactly what the stored file reads back as


# ------------------------------------------------------------------------------------------------ the learner, remotely

def remote_answers(learner) -> tuple[Ask, Ask]:
    """(ask, maybe) over the learner's functions in their sandboxed process (the `answer` probe)."""
    from ...check_stage import LearnerRaised

    def ask(function: str, inputs: dict[str, Any]) -> Any:
        return learner.call("answer", function=function, inputs=inputs)

    def maybe(function: str, inputs: dict[str, Any]) -> Any:
        try:
            return ask(function, inputs)
        except LearnerRaised:  # a diagnosis only: an earlier function that fails explains nothing
            return None
    return ask, maybe


def hidden_gb1(learner, seed: int) -> dict[str, Any]:
    measured = verify_gb1(*remote_answers(learner), gb1_cases(seed))
    seventy = ModelArgs.from_name("llama-3-70b")
    return {**measured, "llama_3_70b_params": expected_parameter_count(seventy),
            "llama_3_70b_bf16_GB": round(expected_parameter_count(seventy) * 2 / GB, 1)}


def hidden_gb2(learner, seed: int) -> dict[str, Any]:
    measured = verify_gb2(*remote_answers(learner), gb2_cases(seed))
    eight = ModelArgs.from_name("llama-3-8b")
    return {**measured, "llama_3_8b_decode_intensity_bf16": expected_intensity(eight, "bfloat16", 1, 1),
            "llama_3_8b_prefill_512_intensity_bf16": expected_intensity(eight, "bfloat16", 1, 512)}


def hidden_gb3(learner, seed: int, profile: str | None = None) -> dict[str, Any]:
    """The formula, the stopwatch on a served stand-in, then the stopwatch on a random Llama against the checker's."""
    from ...check_stage import Starved

    verify_gb3_formula(*remote_answers(learner), gb3_cases(seed))
    known = stand_in(seed)
    served = learner.serve(known)
    got = learner.call("measure_served", model=served, steps=STAND_IN_STEPS)
    measured = judge_stand_in(got, known, STAND_IN_STEPS, learner.served(served).calls)
    band = threshold(LAB, "GB3", profile)
    device, dtype = roofline_setting()
    args = decode_model_args(seed)
    recipe = {"args": args.to_dict(), "seed": seed, "dtype": str(dtype).removeprefix("torch."), "device": device}
    model = random_llama(args, seed, dtype, device)

    def learner_round() -> Any:
        rate = learner.call("measure_built", recipe=recipe, steps=MEASURE_STEPS)
        if isinstance(rate, dict) and "unavailable" in rate:  # the sandbox lacks the checker's device
            raise RuntimeError(f"GB3 cannot be measured: {rate['unavailable']} (give the sandbox the GPU)")
        return rate
    try:
        with one_cpu_thread(device):
            run = interleaved(learner_round, model)
        predicted = [expected_decode_tokens_per_s(args, recipe["dtype"], b) for b in run["bandwidths"]]
        measured.update(judge_measurement(run, predicted, band, expected_parameter_count(args), dtype))
    except Disturbed as err:  # the machine, not the learner's code: no score either way
        raise Starved(f"GB3: {err.message}; regrade when the machine is quieter") from None
    finally:
        del model
        gc.collect()
    learner.call("drop_built")
    return measured


def hidden_gb4(learner, seed: int) -> dict[str, Any]:
    return verify_gb4(*remote_answers(learner), gb4_cases(seed))


HIDDEN_CHECKS = {"GB1": hidden_gb1, "GB2": hidden_gb2, "GB3": hidden_gb3, "GB4": hidden_gb4}


# ------------------------------------------------------------------------------------------------ calibration of GB3

@functools.lru_cache(maxsize=1)
def _reference_measure():
    return load(LAB).reference_namespace()["measure_decode_tokens_per_s"]


def calibrate(seed: int = SPEC.public_seed, runs: int = 10) -> dict[str, Any]:
    """Measure, on the models of seeds seed..seed+runs-1, the grader's decode rate over the roofline and the
    reference stopwatch's rate over the grader's (alternating, as when grading), and propose both bands.

    Rules: the roofline is an upper bound, so the roofline band's top is 1.25 (the probe's own noise on
    top of 1.0) and its bottom half the lowest ratio seen, a multiplicative margin of 2 for a busy
    machine. The agreement band is [half the lowest, twice the highest] reference/grader ratio seen.
    Run it twice at once as well (two autograde workers measure at the same time) and take the widest
    of all runs: the committed cpu profile records both sets.
    """
    measure = _reference_measure()
    ratios, agreements, details = [], [], []
    device, dtype = roofline_setting()
    name = str(dtype).removeprefix("torch.")
    for i in range(runs):
        args = decode_model_args(seed + i)
        model = random_llama(args, seed + i, dtype, device)
        with one_cpu_thread(device):
            run = interleaved(lambda: measure(model, MEASURE_STEPS), model)
        model = None  # 0.7 GB: given back before the next model is built
        gc.collect()
        roofline = [o / expected_decode_tokens_per_s(args, name, b) for o, b in zip(run["ours"], run["bandwidths"])]
        ratio = statistics.median(roofline)
        agreement = statistics.median(y / o for y, o in zip(run["yours"], run["ours"]))
        ratios.append(round(ratio, 3))
        agreements.append(round(agreement, 3))
        details.append({"params_M": round(expected_parameter_count(args) / 1e6, 1),
                        "bandwidth_gb_s": round(statistics.median(run["bandwidths"]), 1),
                        "measured_tok_s": round(statistics.median(run["ours"]), 1), "ratio": round(ratio, 3),
                        "reference_over_grader": round(agreement, 3)})
    low = math.floor(50 * min(ratios)) / 100
    agree_lo, agree_hi = math.floor(50 * min(agreements)) / 100, math.ceil(200 * max(agreements)) / 100
    return {"GB3": {
        "min_measured_over_predicted": low, "max_measured_over_predicted": 1.25,
        "min_yours_over_grader": agree_lo, "max_yours_over_grader": agree_hi,
        "calibration": {
            "ratios": ratios, "median_ratio": round(statistics.median(ratios), 3),
            "reference_over_grader": agreements, "runs": details, "dtype": name,
            "cpu_threads": 1 if device == "cpu" else None,
            "rounds": MEASURE_ROUNDS, "steps": MEASURE_STEPS,
            "note": (f"{runs} runs of {MEASURE_ROUNDS} alternating rounds (the reference stopwatch, {MEASURE_STEPS} "
                     f"steps; the grader's bandwidth probe and stopwatch, {MEASURE_STEPS} steps) on random-weight "
                     f"Llamas of 100-250M parameters ({name}): grader/roofline {min(ratios):.2f}-{max(ratios):.2f}, "
                     f"reference/grader {min(agreements):.2f}-{max(agreements):.2f}; bands = [half the lowest, "
                     "1.25] and [half the lowest, twice the highest]")}}}
