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
"""

from __future__ import annotations

import functools
from typing import Any

from inferlab import ModelArgs, Transformer

from ...check_stage import RemoteCache
from ...checks import CheckFailed
from .public import verify_lookup, verify_rollback, verify_sampler, verify_speculative


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


HIDDEN_CHECKS = {"SS1": _hidden_ss1, "SS2": _hidden_ss2, "SS3": _hidden_ss3, "SS4": _hidden_ss4}
