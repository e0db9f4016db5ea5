"""grader.labs.speculative_sampling.public: the speculative_sampling lab's checks (book ch. 8), tasks SS1 to SS4.

The notebook imports this module as `checks`. Each `check_ssN` runs the learner's code here, on
the public seed, against values it computes from the runtime alone: the models' own greedy tokens
(`naive_generate`), `filtered_probs` for the distribution a sampler must reproduce, and logits
recomputed from scratch. No speculative algorithm lives here.

The autograder runs the same `verify_*` functions in its own process, on seeds drawn at grading
time, with the learner's code in a sandboxed process (`grading.py`, `grader.check_stage`); there,
the target and draft models run in the grader, which counts every target call itself.

The learner's surface, fixed by the notebook:
  SS1 `RollbackKVCache(args, batch_size, max_seq_len, dtype=torch.float32, device="cpu")`: the
      `inferlab.KVCache` protocol, plus `length` (positions held) and `rollback(length)`.
  SS2 `DraftModelDrafter(model, max_seq_len)` with `propose(tokens, gamma) -> list[int]`, and
      `speculative_generate(target, drafter, prompt, max_new_tokens, gamma, eos_id=None) -> list[int]`
      (greedy), which may only call the target and read `target.args` and its parameters' device and dtype.
  SS3 `verify_drafts(draft_tokens, draft_logits, target_logits, temperature=0.0, top_k=None, top_p=None,
      generator=None) -> list[int]`: the accepted drafts, then one token from the target's side.
  SS4 `PromptLookupDrafter(max_ngram=3)` with `propose(tokens, gamma) -> list[int]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from inferlab import Transformer, naive_generate
from inferlab.generate import filtered_probs
from inferlab.model import sdpa_attention

from ...checks import CheckFailed
from ..common import as_tokens, random_args, random_model

LAB = "speculative_sampling"
PUBLIC_SEED = 0
GAMMAS = (2, 3, 4, 5)
NEW_TOKENS = 24  # per generation in SS2 and SS4


def held_out_prompts(seed: int, n: int, min_tokens: int = 16, max_tokens: int = 96) -> list[list[int]]:
    from inferlab import load_tokenizer
    from inferlab.workloads import prompts

    return prompts(load_tokenizer("tiny"), n, seed=seed, min_tokens=min_tokens, max_tokens=max_tokens)


# ------------------------------------------------------------------------------------------------ SS1

class KVRecorder:
    """An attention function that keeps each layer's keys and values: what a fresh prefill puts in a cache."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def __call__(self, q, k, v, mask, *, scale, **context):
        self.k[context["layer"]], self.v[context["layer"]] = k.clone(), v.clone()  # [B, Hkv, S, D]
        return sdpa_attention(q, k, v, mask, scale=scale, **context)


def _length(cache: Any, what: str) -> int:
    value = cache.length
    try:
        return int.__index__(value) if isinstance(value, int) else int(value)
    except (TypeError, ValueError):
        raise CheckFailed(f"{what}: cache.length must be an int, got {type(value).__name__}") from None


@torch.no_grad()
def verify_rollback(new_cache: Callable[..., Any], seed: int) -> dict[str, Any]:
    """Prefill, a verify pass over gamma + 1 positions, a rollback to what was accepted, then new tokens: the
    logits equal recomputing, and the cache then holds exactly what a fresh prefill of the kept tokens holds."""
    rng = np.random.default_rng(seed)
    args = random_args(rng)
    model = random_model(args, seed)
    cases = 0
    for _ in range(2):
        batch, prompt_len = int(rng.integers(1, 3)), int(rng.integers(3, 20))
        gamma = int(rng.choice(GAMMAS))
        kept = prompt_len + int(rng.integers(0, gamma + 1))  # the prompt, the verify pass's first token, k drafts
        more = int(rng.integers(1, 5))
        first = torch.from_numpy(rng.integers(0, args.vocab_size, (batch, prompt_len + gamma + 1)))
        after = torch.from_numpy(rng.integers(0, args.vocab_size, (batch, more)))
        cache = new_cache(args, batch, args.max_seq_len)
        model(first[:, :prompt_len], torch.arange(prompt_len), cache)
        if _length(cache, "after the prefill") != prompt_len:
            raise CheckFailed(f"after a prefill of {prompt_len} positions cache.length is {cache.length}; it must be "
                              "the number of positions the cache holds")
        model(first[:, prompt_len:], torch.arange(prompt_len, prompt_len + gamma + 1), cache)  # the verify pass
        if _length(cache, "after the verify pass") != prompt_len + gamma + 1:
            raise CheckFailed(f"after feeding positions {prompt_len}..{prompt_len + gamma}, cache.length is "
                              f"{cache.length}; expected {prompt_len + gamma + 1}")
        cache.rollback(kept)
        if _length(cache, "after rollback") != kept:
            raise CheckFailed(f"after rollback({kept}) cache.length is {cache.length}; expected {kept}: rollback "
                              "must forget every position from `length` on")
        got = model(after, torch.arange(kept, kept + more), cache)  # [B, more, V]
        sequence = torch.cat([first[:, :kept], after], dim=1)
        recorder = KVRecorder()
        model.set_attention(recorder)
        try:
            want = model(sequence)[:, kept:]  # a fresh prefill of the kept tokens and the new ones
        finally:
            model.set_attention(sdpa_attention)
        err = float((got - want).abs().max())
        if err > 1e-4:
            raise CheckFailed(
                f"after a verify pass over positions {prompt_len}..{prompt_len + gamma} and rollback({kept}), the "
                f"logits for positions {kept}..{kept + more - 1} differ from recomputing by {err:.3g}: after a "
                "rollback the next tokens go at positions length, length + 1, ... and must see only the kept "
                "positions", max_abs_error=err)
        total = kept + more
        if _length(cache, "after the tokens that follow a rollback") != total:
            raise CheckFailed(f"after rollback({kept}) and {more} new positions, cache.length is {cache.length}; "
                              f"expected {total}")
        # The cache's state, read through its own API: one more position's update returns every slot it holds.
        for layer in range(args.n_layers):
            zeros = torch.zeros(batch, args.n_kv_heads, 1, args.head_dim)
            k_all, v_all = cache.update(layer, torch.tensor([total]), zeros, zeros)[:2]
            for name, mine, fresh in (("keys", k_all, recorder.k[layer]), ("values", v_all, recorder.v[layer])):
                if tuple(mine.shape[:2]) != (batch, args.n_kv_heads) or mine.shape[2] <= total - 1:
                    raise CheckFailed(f"update returned {name} of shape {tuple(mine.shape)}; expected "
                                      f"[{batch}, {args.n_kv_heads}, S > {total}, {args.head_dim}]")
                gap = float((mine[:, :, :total] - fresh).abs().max())
                if gap > 1e-5:
                    raise CheckFailed(f"after rollback({kept}) the cache's layer-{layer} {name} at slots "
                                      f"0..{total - 1} "
                                      f"differ from a fresh prefill's by {gap:.3g}: slot j must hold position j")
        cases += 1
    return {"rollbacks_checked": cases}


def check_ss1(cache_cls: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """SS1 self-check: your RollbackKVCache, driven by a model, rolls back to exactly what a fresh prefill holds."""
    return verify_rollback(lambda args, batch, max_len: cache_cls(args, batch, max_len), seed)


# ------------------------------------------------------------------------------------------------ SS2

def greedy_drafts(draft: Transformer, tokens: list[int], gamma: int) -> tuple[list[int], list[float]]:
    """The draft model's own greedy continuation, recomputed from scratch, and each step's top-2 logit gap
    (a near tie may go either way in another but correct computation)."""
    seq, out, gaps = list(tokens), [], []
    with torch.no_grad():
        for _ in range(gamma):
            logits = draft(torch.tensor([seq]))[0, -1]
            top = torch.topk(logits, 2).values
            out.append(int(logits.argmax()))
            gaps.append(float(top[0] - top[1]))
            seq.append(out[-1])
    return out, gaps


def same_drafts(got: list[int], want: list[int], gaps: list[float]) -> bool:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return gaps[i] < 1e-4  # a near tie: both are the draft model's greedy choice
    return len(got) == len(want)


def drafter_rounds(rng: np.random.Generator, draft: Transformer, prompt: list[int], gamma: int,
                   propose: Callable[[list[int], int], Any]) -> int:
    """Four rounds on one drafter, as speculative_generate drives it: the target rejects early (its own token
    follows the accepted drafts, so at least two drafts are thrown away), accepts everything (its bonus token
    follows), then rejects early again. Each proposal must be the draft model's greedy continuation of what it
    was given, recomputed from scratch: a drafter that keeps rejected drafts in its cache proposes from a context
    that is not the one it was given."""
    tokens, happened = list(prompt), "a fresh drafter"
    for next_round in ("reject", "accept", "reject", None):
        got = as_tokens(propose(list(tokens), gamma), "propose's result")
        want, gaps = greedy_drafts(draft, tokens, gamma)
        if not same_drafts(got, want, gaps):
            raise CheckFailed(
                f"after {happened}, propose(tokens, {gamma}) gave {got}, but the draft model's greedy continuation of "
                f"those {len(tokens)} tokens is {want}: roll the draft cache back to the longest common prefix of "
                "what it holds and the tokens it is given, feed the rest at their positions, then draft")
        if next_round == "reject":  # the target's own token replaces an early draft; the drafts after it go
            keep = int(rng.integers(0, gamma - 1))
            other = (got[keep] + 1 + int(rng.integers(0, draft.args.vocab_size - 1))) % draft.args.vocab_size
            tokens += got[:keep] + [other]
            happened = "a round that rejected some drafts"
        elif next_round == "accept":  # every draft accepted, plus the target's bonus token
            tokens += got + [int(rng.integers(0, draft.args.vocab_size))]
            happened = "a round that accepted every draft"
    return 4


def reference_target_calls(target_tokens: list[int], draft: Transformer, prompt: list[int], gamma: int,
                           n: int) -> dict[str, Any]:
    """What greedy speculative decoding with this draft model must cost: the rounds it takes, replayed on the
    target's own greedy tokens (known) and the draft model's greedy drafts. One prefill call, then one verify
    call per round; each round accepts the longest matching prefix and adds the target's token."""
    done, rounds, proposed, accepted = 1, 0, 0, 0  # the prefill gives the first token
    while done < n:
        g = min(gamma, n - done - 1)
        drafts = greedy_drafts(draft, list(prompt) + target_tokens[:done], g)[0] if g else []
        k = 0
        while k < g and drafts[k] == target_tokens[done + k]:
            k += 1
        rounds, proposed, accepted, done = rounds + 1, proposed + g, accepted + k, done + k + 1
    return {"calls": 1 + rounds, "rounds": rounds, "proposed": proposed, "accepted": accepted}


def most_target_calls(reference_calls: int) -> int:
    """The bar on target calls: the replayed count, plus room for another correct end game (a last round that
    drafts fewer tokens, a bonus token taken one round later)."""
    return reference_calls + max(2, math.ceil(0.1 * reference_calls))


def fewest_target_calls(reference_calls: int) -> int:
    """Below this, the drafts agreed with the target more often than the draft model's own greedy drafts can:
    they came from elsewhere (a copy of the target, say)."""
    return reference_calls - max(2, math.ceil(0.1 * reference_calls))


# Generate(prompt, n, gamma) -> (new tokens, target forward calls); NewProposer() -> propose(tokens, gamma).
Generate = Callable[[list[int], int, int], tuple[Any, int]]


def verify_speculative(generate: Generate, new_proposer: Callable[[], Callable[[list[int], int], Any]], seed: int,
                       target: Transformer, draft: Transformer) -> dict[str, Any]:
    """SS2: the drafter rolls back right; speculative_generate gives the target's greedy tokens with about as
    few target calls as this draft model allows, and no fewer."""
    rng = np.random.default_rng(seed)
    prompts = held_out_prompts(seed, 2)
    drafter_rounds(rng, draft, prompts[0], int(rng.choice(GAMMAS)), new_proposer())
    calls = tokens_made = accepted = proposed = 0
    for prompt in prompts[1:]:
        gamma = int(rng.choice(GAMMAS))
        want = naive_generate(target, prompt, NEW_TOKENS)
        out, target_calls = generate(list(prompt), NEW_TOKENS, gamma)
        got = as_tokens(out, "speculative_generate's result")
        if got != want:
            where = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise CheckFailed(
                f"speculative_generate (gamma={gamma}) differs from the target's greedy tokens at new token {where} "
                f"(got {got[where:where + 3]}, expected {want[where:where + 3]}, {len(got)} tokens for {NEW_TOKENS} "
                "asked): keep the longest prefix of drafts that equal the target's argmax, then the target's own "
                "token, and roll the target's cache back to the tokens kept", first_mismatch=where)
        ref = reference_target_calls(want, draft, prompt, gamma, NEW_TOKENS)
        most, fewest = most_target_calls(ref["calls"]), fewest_target_calls(ref["calls"])
        if target_calls > most:
            raise CheckFailed(
                f"the tokens are right, but the target was called {target_calls} times for {NEW_TOKENS} tokens "
                f"(gamma={gamma}); with this draft model, greedy speculative decoding takes {ref['calls']} calls "
                f"(at most {most} are allowed): verify all gamma drafts in ONE target call over gamma + 1 "
                "positions, and keep every accepted draft", target_calls=target_calls, reference_calls=ref["calls"])
        if target_calls < fewest:
            raise CheckFailed(
                f"the target was called only {target_calls} times for {NEW_TOKENS} tokens (gamma={gamma}), fewer "
                f"than the {ref['calls']} that the draft model's greedy drafts allow (at least {fewest}): draft "
                "with the drafter's model, not another copy of the target", target_calls=target_calls,
                reference_calls=ref["calls"])
        calls, tokens_made = calls + target_calls, tokens_made + len(got)
        accepted, proposed = accepted + ref["accepted"], proposed + ref["proposed"]
    return {"target_calls_per_token": round(calls / tokens_made, 3),
            "draft_acceptance": round(accepted / max(proposed, 1), 3)}


class CallCounter:
    """Counts a model's forward calls, in-process (the autograder counts on its own side, where the model runs)."""

    def __init__(self, model: Transformer):
        self.calls = 0
        self._hook = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def close(self) -> None:
        self._hook.remove()


def counted(generate_fn: Callable[..., Any], target: Transformer, drafter_factory: Callable[[], Any]) -> Generate:
    def generate(prompt: list[int], n: int, gamma: int) -> tuple[Any, int]:
        counter = CallCounter(target)
        try:
            return generate_fn(target, drafter_factory(), prompt, n, gamma), counter.calls
        finally:
            counter.close()
    return generate


def check_ss2(drafter_cls: Any, generate_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """SS2 self-check: the draft model's drafter rolls back right, and greedy speculative decoding gives the
    target's tokens with the calls this draft model allows."""
    from inferlab import load_model

    target, draft = load_model("tiny"), load_model("tiny-draft")
    new = lambda: drafter_cls(draft, draft.args.max_seq_len)  # noqa: E731
    return verify_speculative(counted(generate_fn, target, new), lambda: new().propose, seed, target, draft)


# ------------------------------------------------------------------------------------------------ SS3

VOCAB = 10  # the toy setting: a vocabulary small enough to test every probability
TRIALS = 2000  # verify passes per distribution test
FALSE_ALARM = 1e-3  # the chance that an exact sampler fails one test (then a second, fresh test decides)


def sampler_case(seed: int) -> dict[str, Any]:
    """A toy draft/target pair for one distribution test: logits for gamma draft positions and gamma + 1 target
    positions over VOCAB tokens, the sampling settings, and draft tokens drawn from the draft's distribution."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    gamma = int(rng.choice([2, 3]))
    target_logits = torch.randn(gamma + 1, VOCAB, generator=gen) * 1.5  # [gamma + 1, V]
    draft_logits = 0.5 * target_logits[:gamma] + torch.randn(gamma, VOCAB, generator=gen) * 1.2  # [gamma, V]
    temperature = float(rng.choice([0.7, 1.0, 1.4]))
    top_k = [None, 7][int(rng.integers(0, 2))]
    top_p = [None, 0.9][int(rng.integers(0, 2))]
    q = filtered_probs(draft_logits / temperature, top_k, top_p)  # [gamma, V]: what drafts are drawn from
    drafts = torch.multinomial(q, TRIALS, replacement=True, generator=gen).T.contiguous()  # [TRIALS, gamma]
    return {"gamma": gamma, "draft_logits": draft_logits, "target_logits": target_logits, "drafts": drafts,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "sampler_seed": int(rng.integers(0, 2**31))}


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of counts to probs: the chi-square test's p-value, bins with fewer than 5 expected merged.
    A count where the probability is 0 cannot happen: p-value 0."""
    counts, probs = counts.double(), probs.double()
    expected = probs / probs.sum() * counts.sum()
    if bool(((expected == 0) & (counts > 0)).any()):
        return 0.0
    keep = expected > 0
    counts, expected = counts[keep], expected[keep]
    merged_c, merged_e, c, e = [], [], 0.0, 0.0
    for j in torch.argsort(expected).tolist():  # smallest first, so small bins merge with each other
        c, e = c + float(counts[j]), e + float(expected[j])
        if e >= 5:
            merged_c.append(c), merged_e.append(e)
            c = e = 0.0
    if e > 0:
        if merged_c:
            merged_c[-1], merged_e[-1] = merged_c[-1] + c, merged_e[-1] + e
        else:
            merged_c.append(c), merged_e.append(e)
    if len(merged_c) < 2:
        return 1.0
    observed, wanted = torch.tensor(merged_c, dtype=torch.float64), torch.tensor(merged_e, dtype=torch.float64)
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    dof = len(merged_c) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def distribution_test(case: dict[str, Any], out: torch.Tensor) -> dict[str, Any]:
    """Whether verify passes' outputs (`out` [TRIALS, gamma + 1], -1 after each pass's last token) have the exact
    distribution: the token at index i (when a pass reaches it) follows the target's p_i, and the number of
    accepted drafts follows prod(beta_j for j < k) * (1 - beta_k), beta_j = sum_x min(p_j(x), q_j(x)).

    gamma + 2 chi-square tests, each at FALSE_ALARM / (gamma + 2) (Bonferroni), so an exact sampler fails the
    whole test with probability at most FALSE_ALARM. Returns the p-values and whether every one passed."""
    gamma, T = case["gamma"], case["temperature"]
    p = filtered_probs(case["target_logits"] / T, case["top_k"], case["top_p"]).double()  # [gamma + 1, V]
    q = filtered_probs(case["draft_logits"] / T, case["top_k"], case["top_p"]).double()  # [gamma, V]
    lengths = (out >= 0).sum(dim=1)  # [TRIALS]: accepted drafts + 1
    beta = torch.minimum(p[:gamma], q).sum(dim=-1)  # [gamma]: the chance each draft is accepted
    length_probs, reach = torch.zeros(gamma + 1, dtype=torch.float64), 1.0
    for k in range(gamma):
        length_probs[k], reach = reach * (1 - beta[k]), reach * beta[k]
    length_probs[gamma] = reach
    p_values = {"accepted": chi_square_p(torch.bincount(lengths - 1, minlength=gamma + 1), length_probs)}
    for i in range(gamma + 1):
        tokens = out[lengths > i, i]
        p_values[f"token_{i}"] = (chi_square_p(torch.bincount(tokens, minlength=VOCAB), p[i])
                                  if len(tokens) else 1.0)
    bar = FALSE_ALARM / len(p_values)
    return {"passed": all(v >= bar for v in p_values.values()), "p_values": p_values, "bar": bar,
            "mean_accepted": float((lengths - 1).double().mean()),
            "expected_mean_accepted": float(sum(k * length_probs[k] for k in range(gamma + 1)))}


def check_outputs(case: dict[str, Any], out: Any) -> torch.Tensor:
    """The learner's outputs as [TRIALS, gamma + 1] with -1 padding, each pass's accepted part equal to its drafts."""
    gamma, drafts = case["gamma"], case["drafts"]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (TRIALS, gamma + 1):
        raise CheckFailed(f"expected one result per verify pass; got {getattr(out, 'shape', type(out).__name__)}")
    out = out.long()
    lengths = (out >= 0).sum(dim=1)
    if bool((lengths < 1).any()) or bool((out[:, 1:] >= 0).logical_and(out[:, :-1] < 0).any()):
        raise CheckFailed("verify_drafts must return between 1 and gamma + 1 tokens: the accepted drafts, then one "
                          "token from the target's side (the resampled one, or the bonus token)")
    if bool((out >= VOCAB).any()):
        raise CheckFailed(f"verify_drafts returned a token outside the vocabulary of {VOCAB}")
    accepted = torch.arange(gamma)[None, :] < (lengths - 1)[:, None]  # [TRIALS, gamma]: the accepted drafts' places
    wrong = (accepted & (out[:, :gamma] != drafts)).any(dim=1)
    if bool(wrong.any()):
        t = int(wrong.nonzero()[0])
        raise CheckFailed(f"verify_drafts({drafts[t].tolist()}, ...) returned {out[t, :int(lengths[t])].tolist()}: all "
                          "tokens but the last must be the accepted drafts, in order")
    return out


def verify_greedy_step(verify_fn: Callable[..., Any], seed: int) -> None:
    """temperature 0: the longest prefix of drafts equal to the target's argmax, then the target's argmax."""
    gen = torch.Generator().manual_seed(seed + 1)
    for gamma in (1, 3):
        target_logits = torch.randn(gamma + 1, VOCAB, generator=gen)
        choice = target_logits.argmax(-1).tolist()
        for keep in range(gamma + 1):
            drafts = choice[:keep] + [(c + 1) % VOCAB for c in choice[keep:gamma]]
            got = as_tokens(verify_fn(drafts, torch.randn(gamma, VOCAB, generator=gen), target_logits.clone(),
                                      0.0, None, None, None), "verify_drafts' result")
            want = choice[:keep + 1]
            if got != want:
                raise CheckFailed(f"greedy (temperature 0): verify_drafts({drafts}, ...) returned {got}; the target's "
                                  f"argmax is {choice}, so the answer is {want}: the matching prefix, then the "
                                  "target's own token")


# Sample(case) -> out [TRIALS, gamma + 1] (-1 padded): the learner's verify_drafts on every pass of the case.
Sample = Callable[[dict[str, Any]], Any]


def verify_sampler(sample_fn: Sample, verify_greedy: Callable[..., Any], seed: int) -> dict[str, Any]:
    """SS3: greedy is the matching prefix; sampled, the outputs pass the distribution test (a second, fresh test
    decides when the first fails, so an exact sampler fails with probability FALSE_ALARM squared)."""
    verify_greedy_step(verify_greedy, seed)
    results = []
    for attempt in range(2):
        case = sampler_case(seed * 2 + attempt)
        result = distribution_test(case, check_outputs(case, sample_fn(case)))
        results.append(result)
        if result["passed"]:
            return {"tests": attempt + 1, "smallest_p_value": round(min(result["p_values"].values()), 4),
                    "mean_accepted": round(result["mean_accepted"], 3),
                    "expected_mean_accepted": round(result["expected_mean_accepted"], 3)}
    worst = min(results[-1]["p_values"].items(), key=lambda kv: kv[1])
    case = sampler_case(seed * 2 + 1)
    said = (f"the number of accepted drafts (mean {results[-1]['mean_accepted']:.2f}, the exact rule gives "
            f"{results[-1]['expected_mean_accepted']:.2f})" if worst[0] == "accepted" else
            f"the token at index {worst[0].split('_')[1]}")
    raise CheckFailed(
        f"over {TRIALS} verify passes (gamma={case['gamma']}, temperature={case['temperature']}, top_k="
        f"{case['top_k']}, top_p={case['top_p']}), {said} does not follow the target's distribution (chi-square "
        f"p-value {worst[1]:.2g}, below {results[-1]['bar']:.2g}; two tests in a row): accept draft x with "
        "probability min(1, p(x)/q(x)); on a rejection, draw from max(0, p - q) renormalised; when every draft is "
        "accepted, draw a bonus token from the last p; and apply temperature, top_k and top_p to both p and q",
        p_value=worst[1], tests=2)


def run_sampler(verify_fn: Callable[..., Any], case: dict[str, Any]) -> torch.Tensor:
    """verify_drafts on every draft of a case, in this process: [TRIALS, gamma + 1], -1 padded."""
    from inferlab.generate import make_generator

    gen = make_generator(case["sampler_seed"])
    out = torch.full((TRIALS, case["gamma"] + 1), -1, dtype=torch.long)
    for t in range(TRIALS):
        got = as_tokens(verify_fn(case["drafts"][t].tolist(), case["draft_logits"].clone(),
                                  case["target_logits"].clone(), case["temperature"], case["top_k"], case["top_p"],
                                  gen), "verify_drafts' result")
        if not 1 <= len(got) <= case["gamma"] + 1:
            raise CheckFailed(f"verify_drafts returned {len(got)} tokens for {case['gamma']} drafts; expected 1 to "
                              f"{case['gamma'] + 1}")
        out[t, :len(got)] = torch.tensor(got)
    return out


def check_ss3(verify_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """SS3 self-check: verify_drafts is exact: its outputs follow the target's distribution."""
    return verify_sampler(lambda case: run_sampler(verify_fn, case), verify_fn, seed)


# ------------------------------------------------------------------------------------------------ SS4

def lookup_sources(tokens: list[int], proposal: list[int], max_ngram: int) -> bool:
    """Whether a proposal continues an earlier occurrence of one of the context's last 1..max_ngram tokens."""
    if not proposal:
        return True
    n_tokens = len(tokens)
    for n in range(1, max_ngram + 1):
        suffix = tokens[n_tokens - n:]
        for start in range(0, n_tokens - n):
            end = start + n
            if tokens[start:end] == suffix and tokens[end:end + len(proposal)] == proposal:
                return True
    return False


LOOKUP_SAVING = 0.9  # on repetitive code the target must be called for at most 90% of the tokens (one per token fails)
LOOKUP_TOKENS = 32


def most_repetitive(prompts: list[list[int]]) -> list[int]:
    """The prompt whose 3-grams repeat most: code with repetition, the workload prompt lookup is for."""
    def repeats(tokens: list[int]) -> float:
        grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
        return 1 - len(set(grams)) / max(len(grams), 1)
    return max(prompts, key=repeats)


def verify_lookup(generate: Generate, new_proposer: Callable[[], Callable[[list[int], int], Any]],
                  seed: int, target: Transformer, max_ngram: int = 3) -> dict[str, Any]:
    """SS4: proposals continue an earlier occurrence of the context's last n-gram (or are empty when there is
    none); with the target's greedy tokens on held-out code, fewer target calls than tokens."""
    rng = np.random.default_rng(seed)
    propose = new_proposer()
    vocab = target.args.vocab_size
    unique = rng.choice(vocab, 40, replace=False).tolist()
    cut, gamma = int(rng.integers(5, 20)), int(rng.choice(GAMMAS))
    repeated = unique + unique[cut - 3:cut]  # its last 3 tokens occurred once before, followed by unique[cut:]
    got = as_tokens(propose(list(repeated), gamma), "propose's result")
    want = unique[cut:cut + gamma]
    if not got or got != want[:len(got)]:
        raise CheckFailed(f"the context's last 3 tokens {repeated[-3:]} occurred before, followed by {want}; "
                          f"propose(tokens, {gamma}) gave {got}: find the last n-gram earlier in the context and "
                          "propose the tokens that followed it")
    if len(got) > gamma:
        raise CheckFailed(f"propose(tokens, {gamma}) gave {len(got)} tokens; at most gamma")
    fresh = as_tokens(propose(unique[:30], gamma), "propose's result")
    if fresh:
        raise CheckFailed(f"no token of this context repeats, yet propose gave {fresh}: propose nothing ([]) when "
                          "no n-gram matches")
    calls = tokens_made = 0
    for prompt in [most_repetitive(held_out_prompts(seed + 1, 6, 96, 160))]:
        gamma = int(rng.choice(GAMMAS[1:]))
        want = naive_generate(target, prompt, LOOKUP_TOKENS)
        for context in (prompt, prompt + want[:LOOKUP_TOKENS // 2]):
            proposal = as_tokens(propose(list(context), gamma), "propose's result")
            if len(proposal) > gamma or not lookup_sources(context, proposal, max_ngram):
                raise CheckFailed(f"propose gave {proposal} for a context ending in {context[-3:]}: that is not what "
                                  f"followed an earlier occurrence of the context's last 1 to {max_ngram} tokens")
        out, target_calls = generate(list(prompt), LOOKUP_TOKENS, gamma)
        got = as_tokens(out, "speculative_generate's result")
        if got != want:
            raise CheckFailed("with PromptLookupDrafter, speculative_generate differs from the target's greedy "
                              "tokens: make SS2 pass first")
        calls, tokens_made = calls + target_calls, tokens_made + len(got)
    if calls > LOOKUP_SAVING * tokens_made:
        raise CheckFailed(f"on held-out code the target was called {calls} times for {tokens_made} tokens; prompt "
                          f"lookup saves more than that (at most {LOOKUP_SAVING:.0%} of the tokens): propose up to "
                          "gamma tokens whenever the last n-gram occurred before", target_calls=calls)
    return {"target_calls_per_token": round(calls / tokens_made, 3)}


def check_ss4(drafter_cls: Any, generate_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """SS4 self-check: PromptLookupDrafter proposes what followed the last n-gram, and saves target calls."""
    from inferlab import load_model

    target = load_model("tiny")
    return verify_lookup(counted(generate_fn, target, lambda: drafter_cls(3)), lambda: drafter_cls(3).propose,
                         seed, target)


# ------------------------------------------------------------------------------------------------ SS5

SS5_NEW_TOKENS = 48  # per timed generation
SS5_GAMMA = 4


class NoDrafter:
    """Proposes nothing: speculative_generate is then cached target-only greedy decoding, one target call per token
    (the baseline SS5 is timed against)."""

    def propose(self, tokens: list[int], gamma: int) -> list[int]:
        return []


def timed_prompts(seed: int, n: int) -> list[list[int]]:
    """Held-out code with repetition, a different prompt for every timed round (a result cached by input is worth
    nothing): each the most repetitive of four drawn prompts."""
    pool = held_out_prompts(seed, 4 * n, 96, 160)
    return [most_repetitive(pool[4 * i:4 * i + 4]) for i in range(n)]


def verify_timed_ready(generate: Generate, seed: int, target: Transformer) -> dict[str, Any]:
    """SS5 times speculative_generate with PromptLookupDrafter, so it must first be right on a timed prompt, with
    fewer target calls than tokens (the autograder also requires SS4 to have passed: `requires` in the spec)."""
    prompt = timed_prompts(seed, 1)[0]
    want = naive_generate(target, prompt, SS5_NEW_TOKENS)
    out, calls = generate(list(prompt), SS5_NEW_TOKENS, SS5_GAMMA)
    if as_tokens(out, "speculative_generate's result") != want:
        raise CheckFailed(f"SS5 times speculative_generate with PromptLookupDrafter (gamma={SS5_GAMMA}), so it must "
                          f"first give the target's greedy tokens on held-out code ({SS5_NEW_TOKENS} tokens after a "
                          f"{len(prompt)}-token prompt): make SS2 and SS4 pass first")
    if calls > LOOKUP_SAVING * len(want):
        raise CheckFailed(f"on the timed prompt the target was called {calls} times for {len(want)} tokens: SS5 times "
                          "prompt-lookup speculation, so make SS4 pass first", target_calls=calls)
    return {"target_calls_per_token": round(calls / len(want), 3)}


def timed_round_robin(fn: Callable[[list[int]], Any], prompts: list[list[int]]) -> Callable[[], Any]:
    """fn on the next prompt at each call: every contender's i-th call gets the i-th prompt, as the grader times."""
    calls = iter(range(10**9))
    return lambda: fn(list(prompts[next(calls) % len(prompts)]))


@torch.no_grad()
def check_ss5(drafter_cls: Any, generate_fn: Any, seed: int = PUBLIC_SEED,
              profile: str | None = None) -> dict[str, Any]:
    """SS5 self-check: speculative_generate with PromptLookupDrafter against your own cached target-only decoding
    (a drafter that proposes nothing), interleaved in this process, against the bar.

    The graded measure is taken by the autograder in its own processes, against the grader's cached decoding and
    the reference in the same run; under the autograder this self-check only checks correctness."""
    import os

    from inferlab import load_model

    from ...perf import ClockTampered, self_check_speed, speedup_over_baseline, threshold

    target = load_model("tiny")
    ready = verify_timed_ready(counted(generate_fn, target, lambda: drafter_cls(3)), seed, target)
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {"timing": "by the autograder, against the reference in the same run"}
    bar = threshold(LAB, "SS5", profile)
    reference = bar["calibration"]["reference_speedup_vs_cached"]
    prompts = timed_prompts(seed, 4)
    try:
        result = speedup_over_baseline(
            timed_round_robin(lambda p: generate_fn(target, drafter_cls(3), p, SS5_NEW_TOKENS, SS5_GAMMA), prompts),
            timed_round_robin(lambda p: generate_fn(target, NoDrafter(), p, SS5_NEW_TOKENS, SS5_GAMMA), prompts),
            rounds=(8, 24))
    except ClockTampered as err:
        raise CheckFailed(f"the clock was tampered with ({', '.join(err.names)}): performance cannot be measured; "
                          "remove any code that replaces timing functions", tampering=", ".join(err.names)) from None
    speedup = result.speedup("candidate")
    low, high = result.ratios["candidate"]["ci_low"], result.ratios["candidate"]["ci_high"]
    measured = {"speedup_vs_cached": round(speedup, 2), "ci95": [round(low, 2), round(high, 2)],
                "threshold": bar["min_speedup_vs_cached"], **ready,
                "calibrated_reference_speedup_vs_cached": reference,  # measured once, on the calibration machine
                "profile": bar["profile"], "rounds": result.rounds}
    too_slow = (
        f"prompt-lookup speculation is {speedup:.2f}x as fast as your cached target-only decoding for "
        f"{SS5_NEW_TOKENS} tokens (gamma={SS5_GAMMA}); the bar is {bar['min_speedup_vs_cached']}x on the "
        f"{bar['profile']} profile (the reference reaches about {reference}x): keep the verify pass to one target "
        "call over gamma + 1 positions with the cache, and keep propose and the bookkeeping around it cheap")
    return self_check_speed(speedup, (low, high), bar["min_speedup_vs_cached"], measured, too_slow)
