"""grader.labs.kv_cache.public: the kv_cache lab's checks (book ch. 5), tasks KV1 to KV4, as a notebook sees them.

The notebook imports this module as `checks`. Each `check_kvN` runs the learner's code here, on
the public seed, and compares with values it may compute or read: logits recomputed by the
runtime's model, `naive_generate`'s tokens, and, where a value would answer a task (the bytes of
KV3), values stored in `public_expected.json`. This module holds no formula that answers a task.

The autograder runs the same `verify_*` functions in its own process, on seeds drawn at grading
time, against the learner's code in a sandboxed process (`grading.py`, `grader.check_stage`).

The learner's surface, fixed by the notebook:
  KV1 `ContiguousKVCache(args, batch_size, max_seq_len, dtype=torch.float32, device="cpu")` with
      `update(layer, input_pos, k, v)` (the `inferlab.KVCache` protocol) and `nbytes`.
  KV2 `cached_generate(model, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
      seed=None, eos_id=None) -> list[int]`, which may only call the model, and read `model.args` and
      the device and dtype of its parameters.
  KV3 `kv_cache_bytes(args, batch_size, seq_len, dtype) -> int`.
  KV4 the speedup of `cached_generate` over `naive_generate` at long context.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferlab import ModelArgs, Transformer, naive_generate

from ...checks import CheckFailed
from ..common import PositionCounter, as_tokens, random_args, random_model, tensor_bytes_held

LAB = "kv_cache"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")

# Generate(model, prompt, n, **sampling) -> (new tokens, positions the model processed, the positions fed in order).
Generate = Callable[..., tuple[list[int], int, list[int]]]


# ------------------------------------------------------------------------------------------------ KV1

@torch.no_grad()
def verify_cache(new_cache: Callable[[ModelArgs, int, int], Any], seed: int) -> dict[str, Any]:
    """Prefill, then one-position decode steps through the learner's cache, give the recompute logits."""
    rng = np.random.default_rng(seed)
    args = random_args(rng)
    model = random_model(args, seed)
    batch, prefill, total = int(rng.integers(1, 4)), int(rng.integers(3, 20)), 40
    tokens = torch.from_numpy(rng.integers(0, args.vocab_size, (batch, total)))
    expected = model(tokens)  # [B, total, V], every position recomputed from scratch

    cache = new_cache(args, batch, args.max_seq_len)
    got = [model(tokens[:, :prefill], torch.arange(prefill), cache)]
    for pos in range(prefill, total):
        got.append(model(tokens[:, pos:pos + 1], torch.tensor([pos]), cache))
    got = torch.cat(got, dim=1)

    k_all, _ = cache.update(0, torch.tensor([total]), torch.zeros(batch, args.n_kv_heads, 1, args.head_dim),
                            torch.zeros(batch, args.n_kv_heads, 1, args.head_dim))[:2]
    shape = tuple(k_all.shape)
    if shape[:2] != (batch, args.n_kv_heads) or shape[3] != args.head_dim or shape[2] <= total:
        raise CheckFailed(
            f"update returned keys of shape {shape}; expected [batch={batch}, n_kv_heads={args.n_kv_heads}, "
            f"S > {total}, head_dim={args.head_dim}]: store the n_kv_heads key/value heads you are given "
            "(grouped-query attention shares them; do not repeat them to n_heads)")
    err = (got - expected).abs().amax(dim=(0, 2))  # [total]: worst error per position
    bad = (err > 1e-4).nonzero()
    if len(bad):
        pos = int(bad[0])
        phase = "the prefill" if pos < prefill else f"decode step at position {pos}"
        raise CheckFailed(
            f"logits from {phase} differ from recomputing the whole sequence by {float(err[pos]):.3g} "
            f"(n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, batch={batch}, prefill={prefill}): "
            "write the new keys/values at slots input_pos and return slots 0..max(input_pos)",
            max_abs_error=float(err.max()))
    return {"max_abs_error": float(err.max()), "positions": total}


def check_kv1(cache_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """KV1 self-check: your ContiguousKVCache, driven by the model, gives the recompute logits."""
    return verify_cache(lambda args, batch, max_len: cache_cls(args, batch, max_len), seed)


# ------------------------------------------------------------------------------------------------ KV2

def tiny_prompts(seed: int, n: int, min_tokens: int = 8, max_tokens: int = 48) -> list[list[int]]:
    from inferlab import load_tokenizer
    from inferlab.workloads import prompts

    return prompts(load_tokenizer("tiny"), n, seed=seed, min_tokens=min_tokens, max_tokens=max_tokens)


def most_positions(prompt_len: int, new_tokens: int) -> int:
    """The most positions a cached generation may feed the model: the prompt once, then about one per new token.

    Exactly prompt_len + new_tokens - 1 with a cache (the last token is never fed); the bar leaves
    room for a different but cached loop. Recomputing costs about new_tokens x prompt_len."""
    return prompt_len + 2 * new_tokens


def generation_cases(seed: int, bundled: Transformer, new_tokens: int = 24) -> list[tuple[Transformer, list[int], dict, str]]:
    """(model, prompt, sampling, which) for KV2: held-out prompts on the bundled model and prompts on a random
    model of a drawn shape (whose logits react strongly to any position or cache mistake), greedy and sampled."""
    rng = np.random.default_rng(seed)
    sampling = [dict(temperature=0.0)] + [
        dict(temperature=float(rng.uniform(0.6, 1.2)), top_k=int(rng.integers(5, 60)),
             top_p=float(rng.uniform(0.8, 0.98)), seed=int(rng.integers(0, 2**31)))]
    noisy = random_model(random_args(rng), seed)
    trials = [(bundled, p, "the bundled model") for p in tiny_prompts(seed, 2)] + [
        (noisy, rng.integers(0, noisy.args.vocab_size, int(rng.integers(4, 24))).tolist(), "a random model")
        for _ in range(2)]
    # Greedy on one prompt of each model, sampled on the other: both modes on both models, four generations.
    return [(net, prompt, sampling[i % 2], which) for i, (net, prompt, which) in enumerate(trials)]


@torch.no_grad()
def verify_generate(generate: Generate, seed: int, bundled: Transformer, new_tokens: int = 24) -> dict[str, Any]:
    """cached_generate returns naive_generate's tokens (greedy, sampled with a seed, stopping at eos), and the
    model processed about one position per new token after the prompt: a cache did the work."""
    checked, worst = 0, 0.0
    cases = generation_cases(seed, bundled, new_tokens)
    for net, prompt, kw, which in cases:
        n = min(new_tokens, net.args.max_seq_len - len(prompt))
        want = naive_generate(net, prompt, n, **kw)
        tokens, positions, fed = generate(net, list(prompt), n, **kw)
        got = as_tokens(tokens, "cached_generate's result")
        fewest, most = len(prompt) + len(want) - 1, most_positions(len(prompt), len(want))
        if got != want:
            if positions <= most:  # a cached loop: a position fed out of order is the likeliest cause, and says where
                verify_fed(fed, len(prompt))
            where = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            mode = "greedy" if kw["temperature"] == 0 else f"sampled ({kw})"
            raise CheckFailed(
                f"{mode} generation with {which} differs from naive_generate at new token {where} "
                f"(got {got[where:where + 3]}, expected {want[where:where + 3]}, prompt of {len(prompt)} tokens): "
                "prefill the whole prompt once, then feed exactly one new token per step at position "
                "len(prompt) + i, and call sample() once per step with make_generator(seed)",
                first_mismatch=where)
        if positions > most:
            raise CheckFailed(
                f"the tokens are right, but the model processed {positions} positions to generate {len(want)} "
                f"tokens after a {len(prompt)}-token prompt; with a KV cache it takes {fewest} (at most {most} "
                "are allowed): prefill the prompt once into your ContiguousKVCache, then feed only the newest token "
                "each step, at its position", positions=positions, with_cache=fewest)
        if positions < fewest:
            raise CheckFailed(
                f"the model you were given processed only {positions} positions for {len(want)} new tokens after a "
                f"{len(prompt)}-token prompt (at least {fewest} are needed): generate with the model passed to "
                "cached_generate, not another copy", positions=positions)
        verify_fed(fed, len(prompt))
        worst = max(worst, positions / len(want))
        checked += 1
    model, prompt = cases[0][0], cases[0][1]
    eos = naive_generate(model, prompt, 1)[0]
    tokens, _, _ = generate(model, list(prompt), new_tokens, eos_id=eos)
    got = as_tokens(tokens, "cached_generate's result")
    if got != [eos]:
        raise CheckFailed(f"with eos_id={eos} generation should stop right after emitting it; got {len(got)} tokens")
    return {"generations_compared": checked + 1, "new_tokens": new_tokens,
            "most_positions_per_new_token": round(worst, 2)}


def verify_fed(fed: list[int], prompt_len: int) -> None:
    """A cached generation feeds each position once, in order: the prompt at 0..p-1 (at once or in pieces), then
    p, p+1, ... one per step. A skipped or repeated position leaves a hole in the cache or overwrites a slot,
    which the tokens do not always show (a hole's zero key still gets some attention)."""
    for i, position in enumerate(fed):
        if position != i:
            said = (f"position {position} where position {i} comes next" if i else f"position {position} first")
            raise CheckFailed(
                f"the model was fed {said} (after a {prompt_len}-token prompt at 0..{prompt_len - 1}): feed each "
                "position once and in order, the prompt first, then each new token at position len(prompt) + i, "
                "so that every slot of the cache holds the key and value of its position",
                position_fed=position, position_expected=i)


def counted(generate_fn: Callable[..., Any]) -> Generate:
    """A learner's cached_generate, in this process, with the positions the model processes counted."""
    def generate(model: Transformer, prompt: list[int], n: int, **kw: Any) -> tuple[list[int], int, list[int]]:
        counter = PositionCounter(model)
        try:
            return generate_fn(model, prompt, n, **kw), counter.positions, counter.fed
        finally:
            counter.close()
    return generate


def check_kv2(generate_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """KV2 self-check: cached_generate gives naive_generate's tokens, with a cache doing the work."""
    from inferlab import load_model

    return verify_generate(counted(generate_fn), seed, load_model("tiny"))


# ------------------------------------------------------------------------------------------------ KV3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def byte_cases(seed: int) -> list[dict[str, Any]]:
    """KV3's inputs: real and random configurations, batch sizes, lengths and dtypes (no answers)."""
    rng = np.random.default_rng(seed)
    configs = [("llama-3-70b", ModelArgs.from_name("llama-3-70b")),
               ("qwen2.5-0.5b", ModelArgs.from_name("qwen2.5-0.5b")), ("random", random_args(rng))]
    cases = []
    for name, args in configs:
        for dtype in ("float32", "bfloat16"):
            cases.append({"config": name, "args": args.to_dict(), "batch_size": int(rng.integers(1, 9)),
                          "seq_len": int(rng.integers(1, 4097)), "dtype": dtype})
    cache_args = random_args(rng)
    cases.append({"config": "cache", "args": cache_args.to_dict(), "batch_size": int(rng.integers(1, 4)),
                  "seq_len": int(rng.integers(16, 128)), "dtype": "float32"})
    return cases


def verify_bytes(bytes_fn: Callable[[ModelArgs, int, int, torch.dtype], Any],
                 cache_bytes: Callable[[ModelArgs, int, int], tuple[Any, int]], cases: list[dict[str, Any]],
                 expected: list[int]) -> dict[str, Any]:
    """kv_cache_bytes gives the expected bytes for every case; the cache holds exactly that many bytes.

    `cases` and `expected` come from the caller: the stored public values here, the checker's own
    computation when grading. The last case is the cache's."""
    for case, want in zip(cases[:-1], expected[:-1]):
        args = ModelArgs(**case["args"])
        got = bytes_fn(args, case["batch_size"], case["seq_len"], DTYPES[case["dtype"]])
        if not isinstance(got, int) or got != want:
            raise CheckFailed(
                f"kv_cache_bytes({case['config']}, batch_size={case['batch_size']}, seq_len={case['seq_len']}, "
                f"torch.{case['dtype']}) = {got!r}, expected {want}: count K and V, every layer, n_kv_heads "
                "(not n_heads) x head_dim, and the element size; return an int")
    case, formula = cases[-1], expected[-1]
    claimed, held = cache_bytes(ModelArgs(**case["args"]), case["batch_size"], case["seq_len"])
    if not isinstance(claimed, int) or claimed != held:
        raise CheckFailed(f"cache.nbytes says {claimed!r} bytes but its tensors hold {held}: "
                          "compute nbytes from the tensors you allocated", held=held)
    if held != formula:
        raise CheckFailed(f"the cache holds {held} bytes for batch {case['batch_size']} x {case['seq_len']} slots; "
                          f"kv_cache_bytes' formula gives {formula}: allocate [n_layers, batch, n_kv_heads, "
                          "max_seq_len, head_dim] for K and for V", held=held, formula=formula)
    return {"cases": len(cases), "cache_bytes": held}


def cache_bytes_of(cache_cls: Any) -> Callable[[ModelArgs, int, int], tuple[Any, int]]:
    """(what cache.nbytes claims, bytes its tensors hold) for a new cache, built in this process."""
    def measure(args: ModelArgs, batch: int, seq: int) -> tuple[Any, int]:
        cache = cache_cls(args, batch, seq)
        return cache.nbytes, tensor_bytes_held(cache)
    return measure


def public_expected() -> dict[str, Any]:
    """The stored expected values of the public inputs (written by the grader at release time)."""
    return json.loads(EXPECTED_PATH.read_text())


def check_kv3(bytes_fn: Any, cache_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """KV3 self-check: kv_cache_bytes against stored values for the public inputs, and the cache's own bytes."""
    stored = public_expected()["KV3"]
    if seed != stored["seed"]:
        raise ValueError(f"expected values are stored for seed {stored['seed']} only")
    return verify_bytes(bytes_fn, cache_bytes_of(cache_cls), byte_cases(seed), stored["bytes"])


# ------------------------------------------------------------------------------------------------ KV4

KV4_PROMPT_TOKENS, KV4_NEW_TOKENS = 384, 16  # long context: where recompute hurts most


def long_prompts(seed: int, n: int) -> list[list[int]]:
    return tiny_prompts(seed, n, KV4_PROMPT_TOKENS, KV4_PROMPT_TOKENS)


@torch.no_grad()
def verify_ready(generate: Generate, seed: int, bundled: Transformer) -> dict[str, Any]:
    """KV4 times cached_generate, so it must first be right, with a cache, on a long prompt (the autograder also
    requires KV2 to have passed: `requires` in the lab's spec)."""
    prompt = long_prompts(seed, 1)[0]
    want = naive_generate(bundled, prompt, KV4_NEW_TOKENS)
    tokens, positions, _ = generate(bundled, list(prompt), KV4_NEW_TOKENS)
    if as_tokens(tokens, "cached_generate's result") != want:
        raise CheckFailed("KV4 times cached_generate, so it must first return naive_generate's tokens "
                          f"for a {KV4_PROMPT_TOKENS}-token prompt: make KV2 pass first")
    if positions > most_positions(len(prompt), len(want)):
        raise CheckFailed(f"for a {KV4_PROMPT_TOKENS}-token prompt the model processed {positions} positions: "
                          "KV4 times a cached generation, so make KV2 pass first")
    return {"correct_at_prompt_tokens": KV4_PROMPT_TOKENS}


def check_kv4_measurement(measure_fn: Any, model: Transformer, prompt_lengths: list[int],
                          new_tokens: int) -> dict[str, Any]:
    """Your own measurement: one finite speedup per length, and a cache that pays off at long context.

    Nothing grades it: under the autograder it is skipped, and KV4 is timed by the grader itself."""
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {"skipped": "under the autograder, which times KV4 itself"}
    speedups = [float(s) for s in measure_fn(model, list(prompt_lengths), new_tokens)]
    if len(speedups) != len(prompt_lengths):
        raise CheckFailed(f"measure_speedups returned {len(speedups)} values for {len(prompt_lengths)} prompt lengths: "
                          "return one speedup per length, in order")
    if not all(np.isfinite(s) and s > 0 for s in speedups):
        raise CheckFailed(f"speedups must be positive numbers (naive seconds / cached seconds), got {speedups}")
    if speedups[-1] <= 1.0:
        raise CheckFailed(f"at {prompt_lengths[-1]} prompt tokens your cached_generate is not faster than recompute "
                          f"({speedups[-1]:.2f}x): check that decode steps feed one token, not the whole sequence",
                          speedups=speedups)
    if speedups[-1] <= speedups[0]:
        raise CheckFailed(f"the speedup does not grow with context ({speedups[0]:.2f}x at {prompt_lengths[0]} tokens, "
                          f"{speedups[-1]:.2f}x at {prompt_lengths[-1]}): time both implementations interleaved, "
                          "after a warm-up, and take a median of repeats", speedups=speedups)
    return {"speedups": [round(s, 2) for s in speedups]}


@torch.no_grad()
def check_kv4_speed(generate_fn: Any, seed: int = PUBLIC_SEED, profile: str | None = None) -> dict[str, Any]:
    """KV4 self-check: cached_generate against naive_generate, interleaved in this process, against the bar.

    The graded measure is taken by the autograder in its own processes, against the reference in
    the same run; under the autograder this self-check only checks correctness."""
    from inferlab import load_model

    from ...perf import ClockTampered, self_check_speed, speedup_over_baseline, threshold

    model = load_model("tiny")
    verify_ready(counted(generate_fn), seed, model)
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {"timing": "by the autograder, against the reference in the same run"}
    bar = threshold(LAB, "KV4", profile)
    reference = bar["calibration"]["reference_speedup_vs_naive"]
    prompt = long_prompts(seed, 1)[0]
    try:
        result = speedup_over_baseline(lambda: generate_fn(model, list(prompt), KV4_NEW_TOKENS),
                                       lambda: naive_generate(model, prompt, KV4_NEW_TOKENS))
    except ClockTampered as err:
        raise CheckFailed(f"the clock was tampered with ({', '.join(err.names)}): performance cannot be measured; "
                          "remove any code that replaces timing functions", tampering=", ".join(err.names)) from None
    speedup = result.speedup("candidate")
    low, high = result.ratios["candidate"]["ci_low"], result.ratios["candidate"]["ci_high"]
    measured = {"speedup_vs_naive": round(speedup, 2), "ci95": [round(low, 2), round(high, 2)],
                "threshold": bar["min_speedup_vs_naive"],
                "calibrated_reference_speedup_vs_naive": reference,  # measured once, on the calibration machine
                "profile": bar["profile"], "rounds": result.rounds}
    too_slow = (
        f"cached_generate is {speedup:.2f}x as fast as recompute for {KV4_NEW_TOKENS} tokens after a "
        f"{KV4_PROMPT_TOKENS}-token prompt; the bar is {bar['min_speedup_vs_naive']}x on the {bar['profile']} "
        f"profile (the reference reaches about {reference}x): prefill once, then process one token per step "
        "and attend only over the filled slots")
    return self_check_speed(speedup, (low, high), bar["min_speedup_vs_naive"], measured, too_slow)
