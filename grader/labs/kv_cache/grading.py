"""grader.labs.kv_cache.grading: the checker's side of the kv_cache lab. Never in a sandbox nor a learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed
process reached through the probes) and a seed drawn at grading time, computes what is
expected here, and raises `CheckFailed` with what to do next when the answer is wrong.

  KV1 the checker's model drives the learner's cache, layer by layer (`update` is a call into
      the learner's process; every reply is checked) and compares logits with recomputation.
  KV2 the learner's cached_generate drives a model that runs here, so the positions it
      processes are counted here: right tokens with about one position per new token.
  KV3 kv_cache_bytes against the formula, which lives only in this file.
  KV4 first right on a long prompt (as KV2), then timed by `grader.perf_stage` against the
      baseline and the reference in the same run; `judge_timing` gives the verdict.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from inferlab import ModelArgs, Transformer, naive_generate

from ...checks import CheckFailed
from ...perf import bar_between, fraction_of_reference_verdict, threshold
from .. import load
from . import SPEC
from .public import (KV4_NEW_TOKENS, KV4_PROMPT_TOKENS, DTYPES, Generate, byte_cases, long_prompts, verify_bytes,
                     verify_cache, verify_generate, verify_ready)

LAB = SPEC.name


@functools.lru_cache(maxsize=1)
def bundled() -> Transformer:
    from inferlab import load_model

    return load_model("tiny")


def expected_kv_bytes(args: ModelArgs, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes per element, per token, per sequence."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem * seq_len * batch_size


def expected_bytes(cases: list[dict[str, Any]]) -> list[int]:
    return [expected_kv_bytes(ModelArgs(**c["args"]), c["batch_size"], c["seq_len"], DTYPES[c["dtype"]])
            for c in cases]


def public_expected() -> dict[str, Any]:
    """What `public_expected.json` must hold: the expected values of the self-checks' public inputs."""
    seed = SPEC.public_seed
    return {"KV3": {"seed": seed, "bytes": expected_bytes(byte_cases(seed))}}


# ------------------------------------------------------------------------------------------------ the learner, remotely

def remote_generate(learner) -> Generate:
    """cached_generate in the learner's process, driving a model served from here; returns (tokens, positions
    processed, positions fed in order), all counted here."""
    served: dict[int, dict] = {}

    def generate(model: Transformer, prompt: list[int], n: int, **sampling: Any) -> tuple[list[int], int, list[int]]:
        if id(model) not in served:
            served[id(model)] = learner.serve(model)
        spec = served[id(model)]
        before, fed_before = learner.served(spec).positions, len(learner.served(spec).fed)
        tokens = learner.call("generate", model=spec, prompt=list(prompt), max_new_tokens=n, sampling=sampling)
        return tokens, learner.served(spec).positions - before, learner.served(spec).fed[fed_before:]
    return generate


def hidden_kv1(learner, seed: int) -> dict[str, Any]:
    def new_cache(args: ModelArgs, batch: int, max_len: int):
        handle = learner.call("new_cache", args=args.to_dict(), batch_size=batch, max_seq_len=max_len)
        if not isinstance(handle, int):
            raise CheckFailed("ContiguousKVCache could not be created")
        return learner.cache(handle, args)
    return verify_cache(new_cache, seed)


def hidden_kv2(learner, seed: int) -> dict[str, Any]:
    return verify_generate(remote_generate(learner), seed, bundled())


def hidden_kv3(learner, seed: int) -> dict[str, Any]:
    cases = byte_cases(seed)

    def kv_bytes(args: ModelArgs, batch: int, seq: int, dtype: torch.dtype) -> Any:
        return learner.call("kv_bytes", args=args.to_dict(), batch_size=batch, seq_len=seq,
                            dtype=str(dtype).removeprefix("torch."))

    def cache_bytes(args: ModelArgs, batch: int, seq: int) -> tuple[Any, int]:
        claimed, held = learner.call("cache_bytes", args=args.to_dict(), batch_size=batch, seq_len=seq)
        return claimed, held
    measured = verify_bytes(kv_bytes, cache_bytes, cases, expected_bytes(cases))
    seventy_b = expected_kv_bytes(ModelArgs.from_name("llama-3-70b"), 1, 1, torch.bfloat16)
    return {**measured, "llama_3_70b_bytes_per_token_bf16": seventy_b}


def hidden_kv4(learner, seed: int) -> dict[str, Any]:
    return verify_ready(remote_generate(learner), seed, bundled())


HIDDEN_CHECKS = {"KV1": hidden_kv1, "KV2": hidden_kv2, "KV3": hidden_kv3, "KV4": hidden_kv4}


# ------------------------------------------------------------------------------------------------ KV4, timed

def perf_prompts(seed: int, n: int) -> list[list[int]]:
    """A different held-out prompt for every round: a result cached by input is worth nothing."""
    return long_prompts(seed, n)


def judge_timing(result: Any, tampered: list[str], profile: str | None = None) -> dict[str, Any]:
    """The KV4 verdict from one interleaved run (every timed result already checked against the baseline's):
    the learner's speedup as a fraction of the reference's."""
    bar = threshold(LAB, "KV4", profile)

    def too_slow(speedup: float, reference: float, fraction: float) -> str:
        return (f"cached_generate is {speedup:.2f}x as fast as recompute for {KV4_NEW_TOKENS} tokens after a "
                f"{KV4_PROMPT_TOKENS}-token prompt, {fraction:.0%} of the reference's {reference:.2f}x in the same "
                f"run; the bar is {bar['min_fraction_of_reference']:.0%} on the {bar['profile']} profile: prefill "
                "once, then process one token per step and attend only over the filled slots")
    return fraction_of_reference_verdict(result, tampered, bar, "naive", too_slow)


def calibrate(seed: int = 0) -> dict[str, Any]:
    """Measure the reference and a correct-but-recomputing answer against the baseline, in one interleaved run.

    Rule for the bars: `grader.perf.bar_between`, the geometric mean of the reference's speedup and the slow one's
    (recompute counted as at least 1x); graded as a fraction of the reference timed in the same run, the notebook's
    self-check uses the mean itself.
    """
    from inferlab.bench import compare

    ref = load(LAB).reference_namespace()["cached_generate"]
    model = bundled()
    prompt = long_prompts(seed, 1)[0]

    def recompute(model, prompt, n):  # what the 'slow' sample does: correct, no cache
        return naive_generate(model, prompt, n)

    result = compare({"naive": lambda: naive_generate(model, prompt, KV4_NEW_TOKENS),
                      "reference": lambda: ref(model, list(prompt), KV4_NEW_TOKENS),
                      "recompute": lambda: recompute(model, list(prompt), KV4_NEW_TOKENS)},
                     baseline="naive", warmup=2, min_rounds=10, max_rounds=30, rel_ci=0.05)
    reference, slow = result.speedup("reference"), result.speedup("recompute")
    bar, fraction = bar_between(reference, slow, digits=1)
    return {"KV4": {
        "min_fraction_of_reference": fraction,
        "min_speedup_vs_naive": bar,
        "calibration": {
            "reference_speedup_vs_naive": round(reference, 2), "recompute_speedup_vs_naive": round(slow, 2),
            "rounds": result.rounds, "prompt_tokens": KV4_PROMPT_TOKENS, "new_tokens": KV4_NEW_TOKENS,
            "note": (f"reference {reference:.2f}x and recompute {slow:.2f}x over naive_generate, interleaved, "
                     f"{result.rounds} rounds; bar = geometric mean of the two = {bar}x = {fraction:.0%} of the reference"),
        }}}
