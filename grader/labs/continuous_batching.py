"""grader.labs.continuous_batching: the checks of the continuous_batching lab (book ch. 6), tasks C1 to C4.

Each check takes the learner's code and the inputs to try. The notebook's self-checks call
them with `PUBLIC_SEED`; the hidden tests call them with a seed drawn at grading time, which
changes the prompts, lengths, batch sizes, budgets, priorities and arrival times.

The learner's surface, fixed by the notebook:
  C1 `static_batch_generate(model, prompts, max_new_tokens, eos_id=None) -> list[list[int]]`, greedy,
     `max_new_tokens` an int or one int per prompt.
  C2 `ContinuousBatcher(model, max_batch_size, token_budget, priority=False, eos_id=None)` with
     `add_request(request_id, prompt, max_new_tokens, priority=0)`, `step() -> {request_id: token}`
     and the property `has_unfinished`.
  C3 `serve_trace(model, trace, mode, max_batch_size, token_budget, eos_id=None) -> dict` for
     mode "static" or "continuous": tokens, seconds, tokens_per_s, latencies_s, p50_s, p99_s.
  C4 the throughput of `ContinuousBatcher` over static batching on a mixed-length workload.

Correctness is judged against one-at-a-time greedy generation without recomputing it token by
token: one forward pass over prompt + generated tokens gives the logits every generated token
was chosen from, and each must be the largest (`greedy_mismatch`), which is `naive_generate`'s
greedy rule; the lengths must follow max_new_tokens and eos (`first_non_greedy`). A token whose
logit is within `GREEDY_TOLERANCE` (relative) of the largest also counts: float rounding differs
between batch shapes, and at such a near tie either choice is one-at-a-time greedy generation on
some machine. In the calibration runs no token needed it. (This module holds no cache
and no batching code: it ships to learners before the kv_cache and continuous_batching labs.)
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from inferlab import Transformer, naive_generate

from ..checks import CheckFailed
from ..perf import ClockTampered, TimedTask, fraction_of_reference_verdict, threshold
from .common import model_fingerprint, random_args, random_model

LAB = "continuous_batching"
PUBLIC_SEED = 0
TASKS = {"C1": "static batching with left padding and an attention mask, equal to one-at-a-time generation",
         "C2": "an iteration-level scheduler: requests join and leave every step, under a batch size and a "
               "token budget, with priorities",
         "C3": "throughput and p50/p99 latency of static and continuous batching on a request trace",
         "C4": "throughput over static batching on a mixed-length workload"}
GREEDY_TOLERANCE = 1e-4  # relative: a token is greedy if its logit is within 1e-4 * (1 + |top logit|) of the top


def _tiny() -> Transformer:
    from inferlab import load_model

    return load_model("tiny")


@functools.lru_cache(maxsize=1)
def _tokenizer():  # one object, so the workloads' cache of tokenized held-out text is reused
    from inferlab import load_tokenizer

    return load_tokenizer("tiny")


def as_tokens(tokens: Any, what: str) -> list[int]:
    """Plain ints: an int subclass that claims to equal anything must not pass a comparison."""
    try:
        return [int.__index__(t) if isinstance(t, int) else int(t) for t in tokens]
    except (TypeError, ValueError) as err:
        raise CheckFailed(f"{what} must be a list of token ids (ints); got {type(tokens).__name__} ({err})") from None


@torch.no_grad()
def greedy_mismatch(model: Transformer, prompt: list[int], tokens: list[int]) -> str:
    """'' if every token is the greedy choice after the prompt and the tokens before it; else the first that is not."""
    if not tokens:
        return ""
    if max(tokens) >= model.args.vocab_size or min(tokens) < 0:
        return f"token ids must be in 0..{model.args.vocab_size - 1}"
    seq = torch.tensor([list(prompt) + tokens[:-1]], device=model.embed_tokens.weight.device)  # [1, p + n - 1]
    logits = model(seq)[0, len(prompt) - 1:]  # [n, V]: the logits each new token was chosen from
    top = logits.max(dim=-1).values  # [n]
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]  # [n]
    wrong = (top - chosen > GREEDY_TOLERANCE * (1 + top.abs())).nonzero()
    if len(wrong):
        i = int(wrong[0])
        return f"new token {i} is {tokens[i]} where greedy generation gives {int(logits[i].argmax())}"
    return ""


def first_non_greedy(model: Transformer, prompt: list[int], tokens: list[int], max_new_tokens: int,
                     eos_id: int | None) -> str:
    """'' if `tokens` is what one-at-a-time greedy generation gives after `prompt`; else what is wrong."""
    if not tokens:
        return "no tokens were generated"
    if len(tokens) > max_new_tokens:
        return f"{len(tokens)} tokens were generated for max_new_tokens={max_new_tokens}"
    if eos_id is not None and eos_id in tokens[:-1]:
        return (f"generation went on after eos_id={eos_id} (new token {tokens.index(eos_id)}): "
                "stop right after emitting it")
    mismatch = greedy_mismatch(model, prompt, tokens)
    if mismatch:
        return mismatch
    if len(tokens) < max_new_tokens and (eos_id is None or tokens[-1] != eos_id):
        return (f"only {len(tokens)} of max_new_tokens={max_new_tokens} tokens were generated"
                + (f" and the last is not eos_id={eos_id}" if eos_id is not None else "")
                + ": keep generating until max_new_tokens (or right after eos)")
    return ""


def _check_model_untouched(model: Transformer, before: tuple, what: str) -> None:
    if model_fingerprint(model) != before:
        raise CheckFailed(f"{what} changed the model it was given: generation must leave the model's layers and "
                          "weights as they were")


# ------------------------------------------------------------------------------------------------ C1

def _c1_cases(seed: int, model: Transformer) -> list[dict[str, Any]]:
    """Batches of prompts of different lengths: the bundled model on held-out text, and a random model
    (whose logits react strongly to any padding mistake), with per-row lengths and an eos that stops rows early."""
    from inferlab.workloads import prompts

    rng = np.random.default_rng(seed)
    text = prompts(_tokenizer(), int(rng.integers(3, 6)), seed=seed, min_tokens=4, max_tokens=40)
    text.append(text[0][: int(rng.integers(1, 4))])  # a very short prompt: the most padding
    new = [int(n) for n in rng.integers(3, 14, len(text))]
    noisy = random_model(random_args(rng), seed)
    vocab = noisy.args.vocab_size
    rand = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, 24, int(rng.integers(2, 5)))]
    # An eos that the longest prompt's greedy continuation emits early: rows stop at different steps.
    eos = naive_generate(model, text[0], 4)[-1]
    return [dict(model=model, which="the bundled model", prompts=text, max_new_tokens=new, eos_id=None),
            dict(model=model, which="the bundled model", prompts=text, max_new_tokens=12, eos_id=eos),
            dict(model=noisy, which="a random model", prompts=rand, max_new_tokens=int(rng.integers(4, 12)),
                 eos_id=None)]


@torch.no_grad()
def check_c1(generate_fn: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None) -> dict[str, Any]:
    """static_batch_generate gives every row what one-at-a-time greedy generation gives its prompt."""
    model = model if model is not None else _tiny()
    rows = 0
    for case in _c1_cases(seed, model):
        net, prompts, new, eos = case["model"], case["prompts"], case["max_new_tokens"], case["eos_id"]
        before = model_fingerprint(net)
        got = generate_fn(net, [list(p) for p in prompts], new if isinstance(new, int) else list(new), eos_id=eos)
        _check_model_untouched(net, before, "static_batch_generate")
        if not isinstance(got, (list, tuple)) or len(got) != len(prompts):
            raise CheckFailed(f"static_batch_generate must return one list of new tokens per prompt "
                              f"({len(prompts)}), got {type(got).__name__} of length "
                              f"{len(got) if hasattr(got, '__len__') else '?'}")
        width = max(len(p) for p in prompts)
        per_row = new if isinstance(new, list) else [new] * len(prompts)
        failures = []
        for b, (prompt, tokens, n) in enumerate(zip(prompts, got, per_row)):
            problem = first_non_greedy(net, prompt, as_tokens(tokens, f"row {b}"), n, eos)
            if problem:
                failures.append((b, len(prompt), problem))
        if failures:
            b, length, problem = failures[0]
            padded = [f for f in failures if f[1] < width]
            if "generated" in problem or "eos" in problem:
                hint = ("each row stops on its own, after its max_new_tokens or right after eos: keep running the "
                        "batch until every row is done, but collect no more tokens for a finished row")
            elif len(padded) == len(failures) and len(failures) < len(prompts):
                hint = ("only rows with padding are wrong: put the padding on the left, pass attention_mask "
                        "(False on pad slots) to every forward call, and extend it by one True column per decode step")
            else:
                hint = ("pad on the left so every row's last prompt token is in the last column, take the next token "
                        "from logits[:, -1], and feed all rows one token per step at the same new position")
            raise CheckFailed(
                f"with {case['which']}, row {b} (a {length}-token prompt padded to {width}"
                f"{f', eos_id={eos}' if eos is not None else ''}) is not one-at-a-time greedy generation: "
                f"{problem}. {len(failures)} of {len(prompts)} rows differ: {hint}",
                rows_wrong=len(failures))
        rows += len(prompts)
    return {"rows_compared": rows}


# ------------------------------------------------------------------------------------------------ C2

def _c2_workload(seed: int, model: Transformer, small: bool = False) -> list[dict[str, Any]]:
    """Request traces in *steps*: when each request is added, its priority, and the scheduler's limits."""
    from inferlab.workloads import LengthDist, request_trace

    rng = np.random.default_rng(seed + 7919)
    n = 6 if small else int(rng.integers(9, 13))
    trace = request_trace(_tokenizer(), n, seed=seed, rate_per_s=4.0, cv=1.5,
                          prompt_len=LengthDist(median=16, sigma=0.8, min=2, max=40),
                          output_len=LengthDist(median=8, sigma=0.9, min=1, max=24))
    steps_per_s = float(rng.uniform(3, 8))  # how many scheduler steps pass per second of the trace
    batch = int(rng.integers(2, 5))
    longest = max(r.prompt_len for r in trace)
    first = dict(model=model, which="the bundled model", max_batch_size=batch,
                 # tight: the longest prompt waits until the batch has nearly drained (and nobody overtakes it)
                 token_budget=longest + int(rng.integers(0, batch + 1)), priority=True, eos_id=None,
                 requests=[dict(id=int(1000 + 7 * i), prompt=list(r.prompt), max_new_tokens=r.max_new_tokens,
                                priority=int(rng.integers(0, 3)), at_step=int(r.arrival_s * steps_per_s))
                           for i, r in enumerate(trace)])
    if small:
        return [first]
    noisy = random_model(random_args(rng), seed)
    m = int(rng.integers(5, 9))
    rand = [dict(id=i, prompt=rng.integers(0, noisy.args.vocab_size, int(rng.integers(1, 20))).tolist(),
                 max_new_tokens=int(rng.integers(1, 14)), priority=int(rng.integers(0, 3)),
                 at_step=int(rng.integers(0, 12))) for i in range(m)]
    rand.sort(key=lambda r: r["at_step"])
    eos = naive_generate(noisy, rand[0]["prompt"], 3)[-1]
    second = dict(model=noisy, which="a random model", max_batch_size=int(rng.integers(2, 5)),
                  token_budget=max(len(r["prompt"]) for r in rand) + int(rng.integers(0, 4)), priority=False,
                  eos_id=eos, requests=rand)
    return [first, second, _c2_rules_case(rng, noisy)]


def _c2_rules_case(rng: np.random.Generator, model: Transformer) -> dict[str, Any]:
    """A queue built so that each rule is tested on every seed: while a long request runs, a prompt as
    large as the whole budget waits at the head of the queue with a small one behind it (which must not
    overtake it, and admitting the large one would break the budget), and an urgent request arrives
    behind a less urgent one (and must start first)."""
    budget, vocab = int(rng.integers(12, 24)), model.args.vocab_size

    def request(i, prompt_len, new, priority, at_step):
        return dict(id=100 + i, prompt=rng.integers(0, vocab, prompt_len).tolist(), max_new_tokens=new,
                    priority=priority, at_step=at_step)

    requests = [request(0, int(rng.integers(2, 5)), int(rng.integers(10, 14)), 1, 0),  # runs a while
                request(1, budget, int(rng.integers(2, 5)), 1, 1),  # fits only when nothing else runs
                request(2, int(rng.integers(1, 4)), int(rng.integers(2, 5)), 1, 1),  # small, behind the large one
                request(3, int(rng.integers(1, 4)), int(rng.integers(2, 5)), 2, 2),  # not urgent
                request(4, int(rng.integers(1, 4)), int(rng.integers(2, 5)), 0, 3)]  # urgent, arrives last
    return dict(model=model, which="a random model (a queue built to test the rules)", max_batch_size=2,
                token_budget=budget, priority=True, eos_id=None, requests=requests)


class _ForwardLog:
    """Counts what the model is fed, call by call, while the learner's scheduler runs."""

    def __init__(self, model: Transformer):
        self.calls: list[tuple[int, int]] = []  # (batch rows, tokens per row) of each forward call
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens")
        self.calls.append(tuple(tokens.shape))

    def close(self) -> None:
        self.handle.remove()


def run_schedule(batcher_cls: Any, case: dict[str, Any]) -> dict[str, Any]:
    """Drive the learner's scheduler through a case step by step, checking its rules at every step.

    Returns every request's tokens, the number of steps, and the step at which each request started."""
    model, requests = case["model"], case["requests"]
    order = {r["id"]: i for i, r in enumerate(requests)}  # the order the requests are added in
    run = {"tokens": {r["id"]: [] for r in requests}, "added_at": {}, "started_at": {}, "finished": set(), "steps": 0}
    batcher = batcher_cls(model, case["max_batch_size"], case["token_budget"], priority=case["priority"],
                          eos_id=case["eos_id"])
    log = _ForwardLog(model)
    try:
        _drive(batcher, case, order, run, log)
    except CheckFailed:
        # A broken rule is often the echo of wrong tokens (a request that lost its first token looks
        # like one that never ends): report the first wrong token instead, when there is one.
        for r in requests:
            problem = greedy_mismatch(model, r["prompt"], run["tokens"][r["id"]])
            if problem:
                raise _token_failure(case, r, problem, run["started_at"].get(r["id"])) from None
        raise
    finally:
        log.close()
    by_id = {r["id"]: r for r in requests}
    key = (lambda rid: (by_id[rid]["priority"], order[rid])) if case["priority"] else (lambda rid: order[rid])
    _check_order(run["started_at"], run["added_at"], key, case["priority"])
    return run


def _token_failure(case: dict[str, Any], request: dict[str, Any], problem: str, started: int | None) -> CheckFailed:
    return CheckFailed(
        f"with {case['which']}, request {request['id']} ({len(request['prompt'])}-token prompt, started at step "
        f"{started}) is not one-at-a-time greedy generation: {problem}. Prefill each request alone in its "
        "lane at positions 0..p-1 and return its first token (from the last prompt position) in that step; then "
        "decode every running request in one batch, each at its own position len(prompt) + tokens so far - 1",
        request=request["id"])


def _drive(batcher: Any, case: dict[str, Any], order: dict[int, int], run: dict[str, Any], log: _ForwardLog) -> None:
    """Add requests when their step comes, call step() while there is work, check every step's rules."""
    requests, max_batch, budget, eos = case["requests"], case["max_batch_size"], case["token_budget"], case["eos_id"]
    by_id = {r["id"]: r for r in requests}
    tokens, added_at, started_at, finished = run["tokens"], run["added_at"], run["started_at"], run["finished"]
    pending = sorted(requests, key=lambda r: (r["at_step"], order[r["id"]]))
    limit = sum(r["max_new_tokens"] for r in requests) + len(requests) + max(r["at_step"] for r in requests) + 10
    step = 0
    while pending or batcher.has_unfinished:
        if step > limit:
            raise CheckFailed(f"after {step} steps, requests {sorted(set(by_id) - finished)[:5]} have not finished: "
                              "every step must decode all running requests and admit waiting ones when a lane "
                              "and the token budget allow (and has_unfinished must turn False when all are done)")
        while pending and pending[0]["at_step"] <= step:
            r = pending.pop(0)
            batcher.add_request(r["id"], list(r["prompt"]), r["max_new_tokens"], priority=r["priority"])
            added_at[r["id"]] = step
        if not batcher.has_unfinished:
            if not pending:
                break
            step = pending[0]["at_step"]  # idle until the next arrival
            continue
        calls_before = len(log.calls)
        produced = batcher.step()
        _check_step(step, produced, log.calls[calls_before:], max_batch, budget, tokens, added_at, finished)
        for rid, token in produced.items():
            if not tokens[rid]:
                started_at[rid] = step
            tokens[rid].append(token)
            if len(tokens[rid]) == by_id[rid]["max_new_tokens"] or token == eos:
                finished.add(rid)
        in_flight = len(started_at) - len(finished)
        if in_flight > max_batch:
            raise CheckFailed(f"after step {step}, {in_flight} requests have started and not finished with "
                              f"max_batch_size={max_batch}: admit a request only into a free lane, and at most "
                              "max_batch_size requests may run at once", running=in_flight)
        step += 1
    run["steps"] = step


def _check_step(step: int, produced: Any, calls: list[tuple], max_batch: int, budget: int,
                tokens: dict[int, list[int]], added_at: dict[int, int], finished: set[int]) -> None:
    if not isinstance(produced, dict):
        raise CheckFailed(f"step() must return a dict {{request_id: new token}}, got {type(produced).__name__}")
    for rid in list(produced):
        if rid not in tokens or rid not in added_at:
            raise CheckFailed(f"step {step} returned a token for request {rid!r}, which was never added")
        if rid in finished:
            raise CheckFailed(f"step {step} returned a token for request {rid}, which had already finished "
                              f"({len(tokens[rid])} tokens, or eos): free its lane when it finishes")
        produced[rid] = as_tokens([produced[rid]], f"the token of request {rid} in step()'s result")[0]
    widest = max((c[0] for c in calls), default=0)
    if widest > max_batch:
        raise CheckFailed(f"in step {step} a forward pass had {widest} rows with max_batch_size={max_batch}: "
                          "decode only the running requests, at most max_batch_size of them")
    fed = sum(int(np.prod(c)) for c in calls)
    if fed > budget:
        raise CheckFailed(f"step {step} fed the model {fed} tokens ({' + '.join(str(int(np.prod(c))) for c in calls)}) "
                          f"with token_budget={budget}: one token per running request, plus the prompts admitted in "
                          "this step, must fit the budget; stop admitting at the first prompt that does not fit",
                          tokens_in_step=fed)


def _check_order(started_at: dict[int, int], added_at: dict[int, int], key: Any, priority: bool) -> None:
    """No request starts while one ahead of it in the queue order was waiting and is left waiting."""
    rule = "lowest priority value first, then the order they were added" if priority else "the order they were added"
    for x, sx in started_at.items():
        for y, sy in started_at.items():
            if sx < sy and added_at[y] <= sx and key(y) < key(x):
                raise CheckFailed(
                    f"request {x} started at step {sx} while request {y}, ahead of it in the queue "
                    f"({rule}), was waiting since step {added_at[y]} and only started at step {sy}: admit waiting "
                    "requests strictly in queue order, and stop at the first one that does not fit (no overtaking)")


@torch.no_grad()
def check_c2(batcher_cls: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None,
             small: bool = False) -> dict[str, Any]:
    """Requests added step by step: every one gets one-at-a-time greedy generation's tokens, and the
    scheduler keeps its batch size, its token budget and its queue order at every step."""
    model = model if model is not None else _tiny()
    compared = steps = 0
    for case in _c2_workload(seed, model, small):
        before = model_fingerprint(case["model"])
        run = run_schedule(batcher_cls, case)
        _check_model_untouched(case["model"], before, "ContinuousBatcher")
        for r in case["requests"]:
            problem = first_non_greedy(case["model"], r["prompt"], run["tokens"][r["id"]], r["max_new_tokens"],
                                       case["eos_id"])
            if problem:
                raise _token_failure(case, r, problem, run["started_at"].get(r["id"]))
            compared += 1
        steps += run["steps"]
    return {"requests_compared": compared, "steps": steps}


# ------------------------------------------------------------------------------------------------ C3

C3_KEYS = ("tokens", "seconds", "tokens_per_s", "latencies_s", "p50_s", "p99_s")


def c3_trace(seed: int, n: int = 10, rate_per_s: float = 8.0):
    """A second or so of mixed-length requests, arriving about as fast as a CPU serves them."""
    from inferlab.workloads import LengthDist, request_trace

    return request_trace(_tokenizer(), n, seed=seed, rate_per_s=rate_per_s,
                         prompt_len=LengthDist(median=24, sigma=0.8, min=4, max=96),
                         output_len=LengthDist(median=12, sigma=0.9, min=2, max=64))


def check_c3(serve_fn: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None,
             n: int = 10) -> dict[str, Any]:
    """The learner's measurement, checked for sense: every request served, numbers that agree with each other."""
    model = model if model is not None else _tiny()
    trace = c3_trace(seed, n)
    want_tokens = sum(r.max_new_tokens for r in trace)
    measured = {}
    for mode in ("static", "continuous"):
        stats = serve_fn(model, list(trace), mode, 4, 128)
        if not isinstance(stats, dict) or not all(k in stats for k in C3_KEYS):
            raise CheckFailed(f"serve_trace(mode={mode!r}) must return a dict with keys {', '.join(C3_KEYS)}; got "
                              f"{sorted(stats) if isinstance(stats, dict) else type(stats).__name__}")
        lat = np.asarray(stats["latencies_s"], dtype=float)
        seconds, rate = float(stats["seconds"]), float(stats["tokens_per_s"])
        p50, p99 = float(stats["p50_s"]), float(stats["p99_s"])
        if len(lat) != len(trace):
            raise CheckFailed(f"{mode}: latencies_s has {len(lat)} values for {len(trace)} requests: one latency "
                              "(finish time - arrival time) per request")
        if int(stats["tokens"]) != want_tokens:
            raise CheckFailed(f"{mode}: {stats['tokens']} tokens counted, but the trace asks for {want_tokens}: count "
                              "every new token of every request")
        if (lat < 0).any():
            i = int(np.argmin(lat))
            raise CheckFailed(f"{mode}: request {trace[i].id} finished {-lat[i]:.2f} s before it arrived (arrival_s "
                              f"{trace[i].arrival_s:.2f}): serve a request only once time.perf_counter() - start >= "
                              "its arrival_s, and sleep until the next arrival when there is nothing to do")
        if not np.isfinite(lat).all() or (lat <= 0).any() or not 0 < seconds < 1e4:
            raise CheckFailed(f"{mode}: latencies and seconds must be positive and finite; got seconds={seconds} and "
                              f"latencies from {lat.min():.3g} to {lat.max():.3g}")
        last = trace[-1].arrival_s
        if seconds < last:
            raise CheckFailed(f"{mode}: all requests were served in {seconds:.2f} s, before the last one arrives at "
                              f"{last:.2f} s: admit a request only once time.perf_counter() - start >= its arrival_s")
        if (lat > seconds + 1e-3).any():
            raise CheckFailed(f"{mode}: a latency ({lat.max():.2f} s) is longer than the whole run ({seconds:.2f} s): "
                              "latency is finish time - arrival time, both measured from the start of the run")
        if abs(rate - want_tokens / seconds) > 0.02 * rate:
            raise CheckFailed(f"{mode}: tokens_per_s={rate:.1f} but tokens / seconds = {want_tokens / seconds:.1f}")
        lo50, hi50, lo99 = np.percentile(lat, 40), np.percentile(lat, 60), np.percentile(lat, 90)
        if not lo50 - 1e-9 <= p50 <= hi50 + 1e-9 or not lo99 - 1e-9 <= p99 <= lat.max() + 1e-9:
            raise CheckFailed(f"{mode}: p50_s={p50:.3g} and p99_s={p99:.3g} do not match the latencies (median "
                              f"{np.median(lat):.3g}, 99th percentile {np.percentile(lat, 99):.3g}): use "
                              "np.percentile(latencies, 50) and np.percentile(latencies, 99)")
        measured[mode] = {"tokens_per_s": round(rate, 1), "p50_s": round(p50, 3), "p99_s": round(p99, 3)}
    return {"static_tokens_per_s": measured["static"]["tokens_per_s"],
            "continuous_tokens_per_s": measured["continuous"]["tokens_per_s"],
            "static_p50_s": measured["static"]["p50_s"], "continuous_p50_s": measured["continuous"]["p50_s"],
            "static_p99_s": measured["static"]["p99_s"], "continuous_p99_s": measured["continuous"]["p99_s"]}


# ------------------------------------------------------------------------------------------------ C4

# The graded workload: requests of mixed lengths, all waiting at once (offline throughput: the same
# work for both schedulers, so the ratio of their times is the ratio of their throughputs).
PERF_REQUESTS, PERF_MAX_BATCH, PERF_TOKEN_BUDGET = 32, 8, 256


def perf_trace(seed: int) -> list[list[int]]:
    """One timed round's requests, each as [max_new_tokens, *prompt] (JSON for the timing workers)."""
    from inferlab.workloads import LengthDist, request_trace

    trace = request_trace(_tokenizer(), PERF_REQUESTS, seed=seed,
                          prompt_len=LengthDist(median=32, sigma=0.8, min=8, max=128),
                          output_len=LengthDist(median=24, sigma=0.9, min=4, max=128))
    return [[r.max_new_tokens, *r.prompt] for r in trace]


def perf_prompts(seed: int, n: int) -> list[list[list[int]]]:
    """A different request trace for every round: a result cached by input is worth nothing."""
    return [perf_trace(seed * 1000 + i) for i in range(n)]


def run_batcher(batcher_cls: Any, model: Transformer, requests: list[list[int]],
                max_batch_size: int = PERF_MAX_BATCH, token_budget: int = PERF_TOKEN_BUDGET) -> list[list[int]]:
    """All requests added at once, then step() until every one is done; the tokens of each, in order."""
    batcher = batcher_cls(model, max_batch_size, token_budget)
    out: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    for i, (new, *prompt) in enumerate(requests):
        batcher.add_request(i, prompt, new)
    limit = sum(r[0] for r in requests) + len(requests) + 10
    for _ in range(limit):
        if not batcher.has_unfinished:
            break
        for rid, token in batcher.step().items():
            out[rid].append(token)
    return [out[i] for i in range(len(requests))]


def run_static(static_fn: Any, model: Transformer, requests: list[list[int]],
               max_batch_size: int = PERF_MAX_BATCH) -> list[list[int]]:
    """Static batching, the baseline: batches of max_batch_size requests in order, each run to its longest."""
    out = []
    for i in range(0, len(requests), max_batch_size):
        chunk = requests[i:i + max_batch_size]
        out += static_fn(model, [r[1:] for r in chunk], [r[0] for r in chunk])
    return out


def flatten(outputs: list[list[int]]) -> list[int]:
    """[len, *tokens] per request: one flat list of ints, what a timing worker sends back."""
    return [int(x) for tokens in outputs for x in (len(tokens), *tokens)]


def unflatten(flat: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(flat):
        out.append(list(flat[i + 1:i + 1 + flat[i]]))
        i += 1 + flat[i]
    return out


@torch.no_grad()
def check_c4_ready(batcher_cls: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None) -> dict[str, Any]:
    """C4 times ContinuousBatcher, so it must first be correct: C2 on this seed's inputs, and the timed workload."""
    model = model if model is not None else _tiny()
    try:
        check_c2(batcher_cls, seed, model, small=True)
    except CheckFailed as err:
        raise CheckFailed(f"C4 times ContinuousBatcher, so it must first be correct; C2 says: {err.message}") from None
    requests = perf_trace(seed)[:8]
    got = run_batcher(batcher_cls, model, requests)
    for i, ((new, *prompt), tokens) in enumerate(zip(requests, got)):
        problem = first_non_greedy(model, prompt, as_tokens(tokens, "a request's tokens"), new, None)
        if problem:
            raise CheckFailed(f"C4 times ContinuousBatcher on {len(requests)} requests added at once with "
                              f"max_batch_size={PERF_MAX_BATCH}, token_budget={PERF_TOKEN_BUDGET}; request {i}: "
                              f"{problem}: make C2 pass first")
    return {"correct_on_requests": len(requests)}


def check_c4_speed(static_fn: Any, batcher_cls: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None,
                   profile: str | None = None, rounds: tuple[int, int] = (3, 6)) -> dict[str, Any]:
    """For the notebook: ContinuousBatcher against static_batch_generate, interleaved in this process,
    against the calibrated bar. The graded measure is taken by the autograder instead, in separate
    processes, against the reference's static batching and the reference scheduler in the same run
    (`TIMED`, `grader.perf_stage`); under the autograder this self-check only checks correctness."""
    from ..perf import speedup_over_baseline

    model = model if model is not None else _tiny()
    check_c4_ready(batcher_cls, seed, model)
    bar = threshold(LAB, "C4", profile)
    reference = bar["calibration"]["reference_speedup_vs_static"]
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {"timing": "by the autograder, against the reference in the same run"}
    traces = iter(perf_prompts(seed + 1, rounds[1] + 2))
    queue: dict[str, list] = {"baseline": [], "candidate": []}

    def take(name):  # a new trace every round, the same one for both contenders
        if not queue[name]:
            t = next(traces)
            queue["baseline"].append(t)
            queue["candidate"].append(t)
        return queue[name].pop(0)

    try:
        result = speedup_over_baseline(lambda: run_batcher(batcher_cls, model, take("candidate")),
                                       lambda: run_static(static_fn, model, take("baseline")),
                                       rounds=rounds, max_seconds=40.0)
    except ClockTampered as err:
        raise CheckFailed(f"the clock was tampered with ({', '.join(err.names)}): performance cannot be measured; "
                          "remove any code that replaces timing functions", tampering=", ".join(err.names)) from None
    speedup, high = result.speedup("candidate"), result.ratios["candidate"]["ci_high"]
    measured = {"speedup_vs_static": round(speedup, 2),
                "ci95": [round(result.ratios["candidate"]["ci_low"], 2), round(high, 2)],
                "threshold": bar["min_speedup_vs_static"], "reference_speedup_vs_static": reference,
                "profile": bar["profile"], "rounds": result.rounds}
    # A few rounds in a busy notebook are noisy: this estimate fails only when the whole 95% interval
    # is below the bar. The graded measure is the autograder's, against the reference in the same run.
    if high < bar["min_speedup_vs_static"]:
        raise CheckFailed(
            f"ContinuousBatcher serves {PERF_REQUESTS} mixed-length requests {speedup:.2f}x as fast as your static "
            f"batching; the bar is {bar['min_speedup_vs_static']}x on the {bar['profile']} profile (the reference "
            f"reaches about {reference}x): admit waiting requests into freed lanes at every step, and decode all "
            "running requests in one forward pass", **measured)
    if speedup < bar["min_speedup_vs_static"]:
        measured["estimate"] = "below the bar, but within the noise of this run: run this cell again"
    return measured


# ---------------------------------------------------------------- C4 as the autograder times it

# Locked cells that define what the answers use; the clean re-run of the hidden tests runs them too.
DEFINING_CELLS = ("setup", "given", "lanes")
# A round (static batching, the reference and the learner's scheduler each serving 32 requests) takes
# about 7 s on one free core: keep room for a slow one before the stage's deadline.
TIMED = TimedTask("C4", gate="c4-hidden", cells=("setup", "given", "c1-solution", "lanes", "c2-solution"),
                  rounds=(5, 12), slack_s=30.0)


def perf_contenders(role: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """What a `grader.perf_worker` process can run, built from the cells it executed: each contender
    serves one round's requests and returns every request's tokens, flattened.

    The model is loaded here, not taken from the notebook's namespace, so both processes time
    the same untouched weights."""
    from inferlab import load_model

    batcher_cls = namespace.get("ContinuousBatcher")
    if not callable(batcher_cls):
        raise NameError("ContinuousBatcher is not defined by the C2 answer cell")
    model = load_model("tiny")
    torch.set_grad_enabled(False)
    if role == "submission":
        return {"candidate": lambda requests: flatten(run_batcher(batcher_cls, model, requests))}
    static_fn = namespace["static_batch_generate"]
    return {"baseline": lambda requests: flatten(run_static(static_fn, model, requests)),
            "reference": lambda requests: flatten(run_batcher(batcher_cls, model, requests))}


_VERIFY_MODEL: list[Transformer] = []


def timed_outputs_agree(requests: list[list[int]], got: list[int], want: list[int]) -> bool:
    """Called by the timing stage when a timed result differs from the baseline's: the same requests and
    lengths, and every request that differs is still greedy generation (a near tie that float rounding
    tipped the other way in another batch shape); in the grading process, on an untouched model."""
    got_rows, want_rows = unflatten(got), unflatten(want)
    if len(got_rows) != len(requests) or len(want_rows) != len(requests):
        return False
    if not _VERIFY_MODEL:
        _VERIFY_MODEL.append(_tiny())
    model = _VERIFY_MODEL[0]
    for (new, *prompt), mine, theirs in zip(requests, got_rows, want_rows):
        if mine != theirs and first_non_greedy(model, prompt, mine, new, None):
            return False
    return True


def judge_timing(result: Any, tampered: list[str], profile: str | None = None) -> dict[str, Any]:
    """The C4 verdict from one interleaved run (every timed result already checked against the
    baseline's): the learner's throughput over static batching as a fraction of the reference's."""
    bar = threshold(LAB, "C4", profile)

    def too_slow(speedup: float, reference: float, fraction: float) -> str:
        return (f"ContinuousBatcher serves {PERF_REQUESTS} mixed-length requests {speedup:.2f}x as fast as static "
                f"batching, {fraction:.0%} of the reference's {reference:.2f}x in the same run; the bar is "
                f"{bar['min_fraction_of_reference']:.0%} on the {bar['profile']} profile: admit waiting requests "
                "into freed lanes at every step, and decode all running requests in one forward pass")
    return fraction_of_reference_verdict(result, tampered, bar, "static", too_slow)


REFERENCE_CELLS = ["setup", "given", "c1-solution", "lanes", "c2-solution", "c3-solution"]


def reference_namespace() -> dict[str, Any]:
    """The reference answers, run from the one source that defines them: the solution notebook."""
    from .. import notebook
    from ..catalogue import REPO_ROOT

    return notebook.exec_cells(notebook.read(REPO_ROOT / "solutions" / LAB / f"{LAB}.ipynb"), REFERENCE_CELLS)


def calibrate(seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """Measure the reference scheduler and the 'slow' sample's (correct, but admits only into an empty
    batch: static batching behind the same interface) against static batching, in one interleaved run.

    Rule for the bars, as for kv_cache: the geometric mean of the two ratios, so a noisy run has the
    same multiplicative margin on both sides. The graded bar is that mean as a fraction of the
    reference (timed in the same run when grading); the notebook's self-check uses the mean itself.
    """
    from inferlab.bench import compare

    from ..samples import definitions

    ns = reference_namespace()
    slow_ns = dict(ns)
    exec(definitions(LAB)["slow"]["cells"]["c2-solution"], slow_ns)  # the slow sample's scheduler
    model = _tiny()
    torch.set_grad_enabled(False)
    traces = perf_prompts(seed + 1, 40)
    rounds = {"static": 0, "reference": 0, "slow": 0}

    def contender(name, fn):
        def call():
            requests = traces[rounds[name]]
            rounds[name] += 1
            return fn(requests)
        return call

    result = compare({"static": contender("static", lambda r: run_static(ns["static_batch_generate"], model, r)),
                      "reference": contender("reference", lambda r: run_batcher(ns["ContinuousBatcher"], model, r)),
                      "slow": contender("slow", lambda r: run_batcher(slow_ns["ContinuousBatcher"], model, r))},
                     baseline="static", warmup=1, min_rounds=10, max_rounds=30, rel_ci=0.05)
    reference, slow = result.speedup("reference"), result.speedup("slow")
    ref_ci = result.ratios["reference"]
    bar = round(float(np.sqrt(reference * max(slow, 1.0))), 2)
    fraction = round(bar / reference, 2)
    return {"C4": {
        "min_fraction_of_reference": fraction,
        "min_speedup_vs_static": bar,
        "calibration": {
            "reference_speedup_vs_static": round(reference, 2),
            "reference_ci95": [round(ref_ci["ci_low"], 2), round(ref_ci["ci_high"], 2)],
            "slow_speedup_vs_static": round(slow, 2), "rounds": result.rounds,
            "requests": PERF_REQUESTS, "max_batch_size": PERF_MAX_BATCH, "token_budget": PERF_TOKEN_BUDGET,
            "threads": torch.get_num_threads(),
            "note": (f"throughput over static batching (same {PERF_REQUESTS} mixed-length requests per round, "
                     f"all waiting at once, max_batch_size {PERF_MAX_BATCH}): reference {reference:.2f}x "
                     f"(95% CI {ref_ci['ci_low']:.2f}-{ref_ci['ci_high']:.2f}), slow sample (admits only into an "
                     f"empty batch) {slow:.2f}x, interleaved, {result.rounds} rounds, "
                     f"{torch.get_num_threads()} torch thread(s); bar = geometric mean of the two = {bar}x = "
                     f"{fraction:.0%} of the reference. The book's 3-10x is for GPUs, where a decode step costs "
                     "nearly the same for 1 or 64 rows; on this CPU a batch of 8 costs about twice a batch of 1"),
        }}}
