"""grader.labs.speculative_sampling.probes: what the checker may ask of a learner's answers, in their sandboxed process.

Each probe calls the learner's code on inputs the checker sent and returns plain data. None of
them holds an expected value or decides anything: `grading.py`, in the checker, does that. The
models the learner's code drives (target and draft) run in the checker, which counts their calls.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from inferlab import ModelArgs
from inferlab.generate import make_generator

from .public import SS5_GAMMA, SS5_NEW_TOKENS, NoDrafter


def _tokens(out: Any, what: str) -> list[int]:
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    try:
        return [operator.index(t) for t in out]
    except TypeError:
        raise TypeError(f"{what} must be a list of token ids (ints), got {type(out).__name__}") from None


def new_cache(session, args: dict, batch_size: int, max_seq_len: int) -> int:
    """SS1: a new RollbackKVCache; the checker then drives its `update` layer by layer."""
    return session.handle(session.answer("RollbackKVCache")(ModelArgs(**args), batch_size, max_seq_len))


def rollback(session, cache: int, length: int) -> None:
    session.objects[cache].rollback(length)


def cache_length(session, cache: int) -> Any:
    value = session.objects[cache].length
    return operator.index(value) if hasattr(value, "__index__") else str(value)


def new_model_drafter(session, draft: dict) -> int:
    """SS2: a DraftModelDrafter over the draft model the checker serves."""
    model = session.model(draft)
    return session.handle(session.answer("DraftModelDrafter")(model, model.args.max_seq_len))


def new_lookup_drafter(session, max_ngram: int) -> int:
    """SS4: a PromptLookupDrafter."""
    return session.handle(session.answer("PromptLookupDrafter")(max_ngram))


def propose(session, drafter: int, tokens: list[int], gamma: int) -> list[int]:
    with torch.inference_mode():
        return _tokens(session.objects[drafter].propose(list(tokens), gamma), "propose's result")


def generate(session, target: dict, drafter: int, prompt: list[int], max_new_tokens: int, gamma: int) -> list[int]:
    """SS2/SS4: speculative_generate with the target the checker serves (which counts its calls)."""
    fn = session.answer("speculative_generate")
    with torch.inference_mode():
        out = fn(session.model(target), session.objects[drafter], list(prompt), max_new_tokens, gamma)
    return _tokens(out, "speculative_generate's result")


def sample_verify(session, drafts: torch.Tensor, draft_logits: torch.Tensor, target_logits: torch.Tensor,
                  temperature: float, top_k: int | None, top_p: float | None, seed: int) -> torch.Tensor:
    """SS3: verify_drafts once per row of `drafts` [trials, gamma] (drafts the checker drew); [trials, gamma + 1],
    -1 after each pass's last token."""
    fn = session.answer("verify_drafts")
    gen = make_generator(seed)
    trials, gamma = drafts.shape
    out = torch.full((trials, gamma + 1), -1, dtype=torch.long)
    for t in range(trials):
        got = _tokens(fn(drafts[t].tolist(), draft_logits.clone(), target_logits.clone(), temperature, top_k, top_p,
                         gen), "verify_drafts' result")
        if not 1 <= len(got) <= gamma + 1:
            raise ValueError(f"verify_drafts returned {len(got)} tokens for {gamma} drafts; expected 1 to {gamma + 1}")
        out[t, :len(got)] = torch.tensor(got)
    return out


def verify_greedy(session, drafts: list[int], draft_logits: torch.Tensor, target_logits: torch.Tensor) -> list[int]:
    return _tokens(session.answer("verify_drafts")(list(drafts), draft_logits, target_logits, 0.0, None, None, None),
                   "verify_drafts' result")


PROBES = {"new_cache": new_cache, "rollback": rollback, "cache_length": cache_length,
          "new_model_drafter": new_model_drafter, "new_lookup_drafter": new_lookup_drafter, "propose": propose,
          "generate": generate, "sample_verify": sample_verify, "verify_greedy": verify_greedy}


def perf_contenders(role: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """What a timing worker (`grader.perf_worker`) runs for SS5, built from the cells it executed: prompt-lookup
    speculation, and (in the clean process) the baseline, cached target-only greedy decoding: the reference's
    speculative_generate with a drafter that proposes nothing, one target call per token.

    The model is loaded here, not taken from the notebook's namespace, so both processes time the same untouched
    weights."""
    from inferlab import load_model

    generate, drafter_cls = namespace.get("speculative_generate"), namespace.get("PromptLookupDrafter")
    if not callable(generate) or not callable(drafter_cls):
        raise NameError("speculative_generate (SS2) and PromptLookupDrafter (SS4) must be defined by their answer "
                        "cells")
    model = load_model("tiny")
    torch.set_grad_enabled(False)

    def lookup(prompt: list[int]) -> list[int]:
        out = generate(model, drafter_cls(3), prompt, SS5_NEW_TOKENS, SS5_GAMMA)
        return _tokens(out, "speculative_generate's result")
    if role == "submission":
        return {"candidate": lookup}
    return {"baseline": lambda prompt: _tokens(generate(model, NoDrafter(), prompt, SS5_NEW_TOKENS, SS5_GAMMA),
                                               "speculative_generate's result"),
            "reference": lookup}
