"""grader.labs.speculative_sampling.grading: the checker's side of the lab. Never in a sandbox nor a learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed process
reached through the probes) and a seed drawn at grading time, and runs the same `verify_*` as the
self-checks, with every expected value computed here.

  SS1 the checker's model drives the learner's cache (`update` is a call into the learner's process, every
      reply checked), rolls it back through a probe, and compares logits and the cache's slots with a fresh
      prefill.
  SS2 the target and the draft model both run here. The drafter's proposals after a rejection must be the draft
      model's greedy continuation; speculative_generate must give the target's greedy tokens, and the target
      calls, counted here, must be about what this draft model allows: not one per token, and not fewer than the
      draft's own drafts allow (a draft that copies the target, loaded in the learner's process, shows that way).
  SS3 the checker draws a toy case (vocabulary 10, gamma 2 or 3, drawn temperature, top-k, top-p) and the draft
      tokens; the learner's process returns verify_drafts' outputs; the distribution test runs here.
  SS4 proposals on contexts chosen here; generation with the served target, calls counted here.
  SS5 first right on a timed prompt (as SS4), then timed by `grader.perf_stage`: prompt-lookup speculation against
      cached target-only greedy decoding and the reference, in one interleaved run; `judge_timing` gives the verdict.
"""

from __future__ import annotations

import functools
from typing import Any


from inferlab import ModelArgs, Transformer

from ...check_stage import RemoteCache
from ...checks import CheckFailed
from ...perf import bar_between, fraction_of_reference_verdict, threshold
from .public import (SS5_GAMMA, SS5_NEW_TOKENS, NoDrafter, timed_prompts, timed_round_robin, verify_lookup,
                     verify_rollback, verify_sampler, verify_speculative, verify_timed_ready)

LAB = "speculative_sampling"


@functools.lru_cache(maxsize=1)
def models() -> tuple[Transformer, Transformer]:
    from inferlab import load_model

    return load_model("tiny"), load_model("tiny-draft")


class RemoteRollbackCache(RemoteCache):
    """The learner's RollbackKVCache seen from here: update, rollback and length are calls into their process."""

    def rollback(self, length: int) -> None:
        self.learner.call("rollback", cache=self.handle, length=length)

    @property
    def length(self) -> Any:
        return self.learner.call("cache_length", cache=self.handle)


def _hidden_ss1(learner, seed: int) -> dict[str, Any]:
    def new_cache(args: ModelArgs, batch: int, max_len: int) -> RemoteRollbackCache:
        handle = learner.call("new_cache", args=args.to_dict(), batch_size=batch, max_seq_len=max_len)
        if not isinstance(handle, int):
            raise CheckFailed("RollbackKVCache could not be created")
        return RemoteRollbackCache(learner, handle, args)
    return verify_rollback(new_cache, seed)


def served(learner) -> tuple[dict, dict]:
    """The target and the draft model, each served from here (their calls are counted here)."""
    if not hasattr(learner, "_speculative_models"):
        target, draft = models()
        learner._speculative_models = (learner.serve(target), learner.serve(draft))
    return learner._speculative_models


def remote_generate(learner, new_drafter):
    target_spec, _ = served(learner)

    def generate(prompt: list[int], n: int, gamma: int) -> tuple[Any, int]:
        drafter = new_drafter()
        before = len(learner.served(target_spec).calls)
        out = learner.call("generate", target=target_spec, drafter=drafter, prompt=prompt, max_new_tokens=n,
                           gamma=gamma)
        return out, len(learner.served(target_spec).calls) - before
    return generate


def remote_proposer(learner, drafter: int):
    return lambda tokens, gamma: learner.call("propose", drafter=drafter, tokens=list(tokens), gamma=gamma)


def _hidden_ss2(learner, seed: int) -> dict[str, Any]:
    target, draft = models()
    _, draft_spec = served(learner)
    new_drafter = lambda: learner.call("new_model_drafter", draft=draft_spec)  # noqa: E731
    return verify_speculative(remote_generate(learner, new_drafter), lambda: remote_proposer(learner, new_drafter()),
                              seed, target, draft)


def _hidden_ss3(learner, seed: int) -> dict[str, Any]:
    def sample(case: dict[str, Any]) -> Any:
        return learner.call("sample_verify", drafts=case["drafts"], draft_logits=case["draft_logits"],
                            target_logits=case["target_logits"], temperature=case["temperature"],
                            top_k=case["top_k"], top_p=case["top_p"], seed=case["sampler_seed"])

    def greedy(drafts, draft_logits, target_logits, *_):
        return learner.call("verify_greedy", drafts=list(drafts), draft_logits=draft_logits,
                            target_logits=target_logits)
    return verify_sampler(sample, greedy, seed)


def _hidden_ss4(learner, seed: int) -> dict[str, Any]:
    target, _ = models()
    new_drafter = lambda: learner.call("new_lookup_drafter", max_ngram=3)  # noqa: E731
    return verify_lookup(remote_generate(learner, new_drafter), lambda: remote_proposer(learner, new_drafter()),
                         seed, target)


def _hidden_ss5(learner, seed: int) -> dict[str, Any]:
    target, _ = models()
    new_drafter = lambda: learner.call("new_lookup_drafter", max_ngram=3)  # noqa: E731
    return verify_timed_ready(remote_generate(learner, new_drafter), seed, target)


HIDDEN_CHECKS = {"SS1": _hidden_ss1, "SS2": _hidden_ss2, "SS3": _hidden_ss3, "SS4": _hidden_ss4, "SS5": _hidden_ss5}


# ------------------------------------------------------------------------------------------------ SS5, timed

def perf_prompts(seed: int, n: int) -> list[list[int]]:
    """Held-out code with repetition, a different prompt for every round."""
    return timed_prompts(seed, n)


def judge_timing(result: Any, tampered: list[str], profile: str | None = None) -> dict[str, Any]:
    """The SS5 verdict from one interleaved run (every timed result already checked against the baseline's): the
    learner's speedup over cached target-only decoding as a fraction of the reference's."""
    bar = threshold(LAB, "SS5", profile)

    def too_slow(speedup: float, reference: float, fraction: float) -> str:
        return (f"prompt-lookup speculation is {speedup:.2f}x as fast as cached target-only decoding for "
                f"{SS5_NEW_TOKENS} tokens (gamma={SS5_GAMMA}) on held-out code, {fraction:.0%} of the reference's "
                f"{reference:.2f}x in the same run; the bar is {bar['min_fraction_of_reference']:.0%} on the "
                f"{bar['profile']} profile: verify all drafts in one target call with the cache, roll it back "
                "instead of recomputing, and keep propose cheap")
    return fraction_of_reference_verdict(result, tampered, bar, "cached", too_slow)


def calibrate(seed: int = 0) -> dict[str, Any]:
    """Measure the reference and a correct answer that calls the target once per token against the baseline, in
    one interleaved run, each round on a different held-out code prompt (as grading times).

    Rule for the bars: `grader.perf.bar_between`, the geometric mean of the reference's speedup and the slow one's
    (one call per token counted as at least 1x); graded as a fraction of the reference timed in the same run, the
    notebook's self-check uses the mean itself."""
    import torch

    from inferlab.bench import compare

    from .. import load

    ns = load(LAB).reference_namespace()
    generate, lookup_cls = ns["speculative_generate"], ns["PromptLookupDrafter"]
    target, _ = models()
    prompts = timed_prompts(seed, 16)
    torch.set_grad_enabled(False)

    def with_drafter(make):
        return timed_round_robin(lambda p: generate(target, make(), p, SS5_NEW_TOKENS, SS5_GAMMA), prompts)
    result = compare({"cached": with_drafter(NoDrafter), "reference": with_drafter(lambda: lookup_cls(3)),
                      "per-token": with_drafter(NoDrafter)},  # what the 'target-per-token' sample costs: correct
                     baseline="cached", warmup=2, min_rounds=16, max_rounds=48, rel_ci=0.05)
    reference, slow = result.speedup("reference"), result.speedup("per-token")
    ci = result.ratios["reference"]
    bar, fraction = bar_between(reference, slow)
    return {"SS5": {
        "min_fraction_of_reference": fraction,
        "min_speedup_vs_cached": bar,
        "calibration": {
            "reference_speedup_vs_cached": round(reference, 2),
            "reference_ci95": [round(ci["ci_low"], 2), round(ci["ci_high"], 2)],
            "per_token_speedup_vs_cached": round(slow, 2),
            "rounds": result.rounds, "new_tokens": SS5_NEW_TOKENS, "gamma": SS5_GAMMA, "prompts": "held-out code",
            "note": (f"prompt-lookup reference {reference:.2f}x and one target call per token {slow:.2f}x over cached "
                     f"target-only greedy decoding, interleaved, {result.rounds} rounds on {len(prompts)} held-out "
                     f"code prompts; bar = geometric mean of the two = {bar}x = {fraction:.0%} of the reference"),
        }}}
