"""grader.labs.continuous_batching.public: the continuous_batching lab's checks (book ch. 6), tasks CB1 to CB4, as a
notebook sees them.

The notebook imports this module as `checks`. Each `check_cbN` runs the learner's code here, on the
public seed, and judges what comes back with what it may compute: the logits of the runtime's model
(teacher forcing: one forward pass over prompt + generated tokens gives the logits every generated
token was chosen from) and the model calls it counts. Nothing here answers a task: it pads no
batch, schedules no request and measures no trace (`run_static` and `run_batcher` only drive the
learner's own code, for the CB4 estimate and the timing workers).

The autograder runs the same `verify_*` functions in its own process, on seeds drawn at grading
time, against the learner's code in a sandboxed process (`grading.py`, `grader.check_stage`): the
model then runs in the checker, which counts every call (batch rows, tokens per row) itself.

The learner's surface, fixed by the notebook:
  CB1 `static_batch_generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0) -> list[list[int]]`, greedy,
      `max_new_tokens` an int or one int per prompt.
  CB2 `ContinuousBatcher(model, max_batch_size, token_budget, priority=False, eos_id=None)` with
      `add_request(request_id, prompt, max_new_tokens, priority=0)`, `step() -> {request_id: token}`
      and the property `has_unfinished`.
  CB3 `serve_trace(model, trace, mode, max_batch_size, token_budget, eos_id=None) -> dict` for
      mode "static" or "continuous": tokens, seconds, tokens_per_s, latencies_s, p50_s, p99_s.
  CB4 the throughput of `ContinuousBatcher` over static batching on a mixed-length workload.

Correctness is one-at-a-time greedy generation (`greedy_mismatch`, `first_non_greedy`). A token
whose logit is within `GREEDY_TOLERANCE` (relative) of the largest also counts: float rounding
differs between batch shapes, and at such a near tie either choice is one-at-a-time greedy
generation on some machine. In the calibration runs no token needed it.

Work is counted too, as the lab's text says: CB1 one forward call of the whole batch per step
(`most_static_calls`); CB2 one decode call per step, at most `max_batch_size` rows and
`token_budget` tokens per step, and no waiting request left out when a lane and the budget allow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from inferlab import Transformer, naive_generate

from ...checks import CheckFailed
from ..common import as_tokens, model_fingerprint, random_args, random_model

LAB = "continuous_batching"
PUBLIC_SEED = 0
GREEDY_TOLERANCE = 1e-4  # relative: a token is greedy if its logit is within 1e-4 * (1 + |top logit|) of the top

# (batch rows, tokens per row) of every forward call, in order: what the work rules read.
Calls = list[tuple[int, int]]


def tiny() -> Transformer:
    from inferlab import load_model

    return load_model("tiny")


@functools.lru_cache(maxsize=1)
def _tokenizer():  # one object, so the workloads' cache of tokenized held-out text is reused
    from inferlab import load_tokenizer

    return load_tokenizer("tiny")


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


@dataclasses.dataclass
class Call:
    at_s: float  # when the model was called, in seconds after the log started
    rows: int
    width: int  # tokens per row
    tokens: torch.Tensor | None = None  # [rows, width], kept only when asked (CB3 looks for a prompt in them)


class CallLog:
    """The model's forward calls, recorded where the model runs: in this process for a self-check, in the
    checker's process when grading (the learner's code then calls it from its sandbox)."""

    def __init__(self, model: Transformer, keep_tokens: bool = False):
        self.calls: list[Call] = []
        self.keep_tokens, self.start = keep_tokens, time.perf_counter()
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens")
        rows, width = tuple(tokens.shape) if tokens.dim() == 2 else (1, tokens.numel())  # [B, T] for this model
        self.calls.append(Call(time.perf_counter() - self.start, int(rows), int(width),
                               tokens.detach().clone() if self.keep_tokens else None))

    def shapes(self, since: int = 0) -> Calls:
        return [(c.rows, c.width) for c in self.calls[since:]]

    def close(self) -> None:
        self._hook.remove()


# ------------------------------------------------------------------------------------------------ CB1

# StaticGenerate(model, prompts, max_new_tokens, eos_id) -> (one token list per prompt, the model's calls)
StaticGenerate = Callable[[Transformer, list[list[int]], Any, Any], tuple[Any, Calls]]


def static_cases(seed: int, bundled: Transformer) -> list[dict[str, Any]]:
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
    eos = naive_generate(bundled, text[0], 4)[-1]
    return [dict(model=bundled, which="the bundled model", prompts=text, max_new_tokens=new, eos_id=None),
            dict(model=bundled, which="the bundled model", prompts=text, max_new_tokens=12, eos_id=eos),
            dict(model=noisy, which="a random model", prompts=rand, max_new_tokens=int(rng.integers(4, 12)),
                 eos_id=None)]


def most_static_calls(steps: int) -> int:
    """Static batching calls the model once for the whole batch's prefill, then once per decode step: at most
    `steps` calls for `steps` new tokens per row (the last token is never fed). One more is allowed for a loop
    that feeds it anyway; generating the prompts one at a time takes about one call per token of every row."""
    return steps + 1


def most_static_positions(rows: int, width: int, steps: int) -> int:
    """The positions static batching feeds: rows x (padded prompt + one per step); recomputing the whole batch at
    every step instead feeds about rows x width x steps."""
    return rows * (width + 2 * steps)


@torch.no_grad()
def verify_static(generate: StaticGenerate, seed: int, bundled: Transformer) -> dict[str, Any]:
    """static_batch_generate gives every row what one-at-a-time greedy generation gives its prompt, calling the
    model on the whole batch once per step (one prefill, then one [B, 1] column per decode step)."""
    rows, most_calls = 0, 0
    for case in static_cases(seed, bundled):
        net, prompts, new, eos = case["model"], case["prompts"], case["max_new_tokens"], case["eos_id"]
        before = model_fingerprint(net)
        got, calls = generate(net, [list(p) for p in prompts], new if isinstance(new, int) else list(new), eos)
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
        steps = max(per_row)
        positions = sum(r * t for r, t in calls)
        if len(calls) > most_static_calls(steps) or positions > most_static_positions(len(prompts), width, steps):
            widest = max((r for r, _ in calls), default=0)
            raise CheckFailed(
                f"the tokens are right, but for {len(prompts)} prompts (padded to {width} tokens) and at most {steps} "
                f"new tokens each, the model was called {len(calls)} times (at most {widest} rows at once) and "
                f"processed {positions} positions; static batching calls it at most {most_static_calls(steps)} times "
                f"and processes at most {most_static_positions(len(prompts), width, steps)}: prefill the whole "
                "left-padded batch [B, T] in one call into the cache, then feed one [B, 1] column of next tokens "
                "per decode step", calls=len(calls), most_calls=most_static_calls(steps), positions=positions)
        most_calls = max(most_calls, len(calls))
        rows += len(prompts)
    return {"rows_compared": rows, "most_calls_per_batch": most_calls}


def counted_static(generate_fn: Any) -> StaticGenerate:
    """A learner's static_batch_generate, in this process, with the model's calls recorded."""
    def generate(model: Transformer, prompts: list[list[int]], new: Any, eos: Any) -> tuple[Any, Calls]:
        log = CallLog(model)
        try:
            return generate_fn(model, prompts, new, eos_id=eos), log.shapes()
        finally:
            log.close()
    return generate


def check_cb1(generate_fn: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None) -> dict[str, Any]:
    """CB1 self-check: every row equals one-at-a-time greedy generation, with one batched call per step."""
    return verify_static(counted_static(generate_fn), seed, model if model is not None else tiny())


# ------------------------------------------------------------------------------------------------ CB2

class Scheduler:
    """A learner's ContinuousBatcher as the checks drive it: here in-process (`LocalScheduler`); the checker's
    drives one in the learner's sandbox, call by call (`grading.RemoteScheduler`)."""

    def add_request(self, request_id: int, prompt: list[int], max_new_tokens: int, priority: int) -> None: ...

    def step(self) -> tuple[dict[Any, Any], Calls]:
        """The step's {request_id: token}, and the model calls made during it."""
        raise NotImplementedError

    def has_unfinished(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalScheduler(Scheduler):
    def __init__(self, batcher_cls: Any, case: dict[str, Any]):
        self.log = CallLog(case["model"])
        try:
            self.batcher = batcher_cls(case["model"], case["max_batch_size"], case["token_budget"],
                                       priority=case["priority"], eos_id=case["eos_id"])
        except BaseException:
            self.log.close()
            raise

    def add_request(self, request_id: int, prompt: list[int], max_new_tokens: int, priority: int) -> None:
        self.batcher.add_request(request_id, prompt, max_new_tokens, priority=priority)

    def step(self) -> tuple[Any, Calls]:
        before = len(self.log.calls)
        produced = self.batcher.step()
        return produced, self.log.shapes(before)

    def has_unfinished(self) -> bool:
        return bool(self.batcher.has_unfinished)

    def close(self) -> None:
        self.log.close()


NewScheduler = Callable[[dict[str, Any]], Scheduler]


def schedule_cases(seed: int, bundled: Transformer) -> list[dict[str, Any]]:
    """Request traces in *steps*: when each request is added, its priority, and the scheduler's limits."""
    from inferlab.workloads import LengthDist, request_trace

    rng = np.random.default_rng(seed + 7919)
    n = int(rng.integers(7, 10))
    trace = request_trace(_tokenizer(), n, seed=seed, rate_per_s=4.0, cv=1.5,
                          prompt_len=LengthDist(median=16, sigma=0.8, min=2, max=40),
                          output_len=LengthDist(median=8, sigma=0.9, min=1, max=16))
    steps_per_s = float(rng.uniform(3, 8))  # how many scheduler steps pass per second of the trace
    batch = int(rng.integers(2, 5))
    longest = max(r.prompt_len for r in trace)
    first = dict(model=bundled, which="the bundled model", max_batch_size=batch,
                 # tight: the longest prompt waits until the batch has nearly drained (and nobody overtakes it)
                 token_budget=longest + int(rng.integers(0, batch + 1)), priority=True, eos_id=None,
                 requests=[dict(id=int(1000 + 7 * i), prompt=list(r.prompt), max_new_tokens=r.max_new_tokens,
                                priority=int(rng.integers(0, 3)), at_step=int(r.arrival_s * steps_per_s))
                           for i, r in enumerate(trace)])
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
    return [first, second, _rules_case(rng, noisy)]


def _rules_case(rng: np.random.Generator, model: Transformer) -> dict[str, Any]:
    """A queue built so that each rule is tested on every seed: while a long request runs, a prompt as
    large as the whole budget waits at the head of the queue with a small one behind it (which must not
    overtake it, and admitting the large one would break the budget), an urgent request arrives
    behind a less urgent one (and must start first), and once the large one runs, a lane is free for
    the next (which must join it then, not once the batch is empty)."""
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


def run_schedule(new_scheduler: NewScheduler, case: dict[str, Any]) -> dict[str, Any]:
    """Drive the learner's scheduler through a case step by step, checking its rules at every step.

    Returns every request's tokens, the number of steps, and the step at which each request started."""
    model, requests = case["model"], case["requests"]
    order = {r["id"]: i for i, r in enumerate(requests)}  # the order the requests are added in
    by_id = {r["id"]: r for r in requests}
    key = (lambda rid: (by_id[rid]["priority"], order[rid])) if case["priority"] else (lambda rid: order[rid])
    run = {"tokens": {r["id"]: [] for r in requests}, "added_at": {}, "started_at": {}, "finished": set(), "steps": 0,
           "most_calls_per_step": 0}
    scheduler = new_scheduler(case)
    try:
        _drive(scheduler, case, key, order, run)
    except CheckFailed:
        # A broken rule is often the echo of wrong tokens (a request that lost its first token looks
        # like one that never ends): report the first wrong token instead, when there is one.
        for r in requests:
            problem = greedy_mismatch(model, r["prompt"], run["tokens"][r["id"]])
            if problem:
                raise _token_failure(case, r, problem, run["started_at"].get(r["id"])) from None
        raise
    finally:
        scheduler.close()
    _check_order(run["started_at"], run["added_at"], key, case["priority"])
    return run


def _token_failure(case: dict[str, Any], request: dict[str, Any], problem: str, started: int | None) -> CheckFailed:
    return CheckFailed(
        f"with {case['which']}, request {request['id']} ({len(request['prompt'])}-token prompt, started at step "
        f"{started}) is not one-at-a-time greedy generation: {problem}. Prefill each request alone in its "
        "lane at positions 0..p-1 and return its first token (from the last prompt position) in that step; then "
        "decode every running request in one batch, each at its own position len(prompt) + tokens so far - 1",
        request=request["id"])


def _drive(scheduler: Scheduler, case: dict[str, Any], key: Callable[[Any], Any], order: dict[int, int],
           run: dict[str, Any]) -> None:
    """Add requests when their step comes, call step() while there is work, check every step's rules."""
    requests, max_batch, budget, eos = case["requests"], case["max_batch_size"], case["token_budget"], case["eos_id"]
    by_id = {r["id"]: r for r in requests}
    tokens, added_at, started_at, finished = run["tokens"], run["added_at"], run["started_at"], run["finished"]
    pending = sorted(requests, key=lambda r: (r["at_step"], order[r["id"]]))
    limit = sum(r["max_new_tokens"] for r in requests) + len(requests) + max(r["at_step"] for r in requests) + 10
    step = 0
    while pending or scheduler.has_unfinished():
        if step > limit:
            raise CheckFailed(f"after {step} steps, requests {sorted(set(by_id) - finished)[:5]} have not finished: "
                              "every step must decode all running requests and admit waiting ones when a lane "
                              "and the token budget allow (and has_unfinished must turn False when all are done)")
        while pending and pending[0]["at_step"] <= step:
            r = pending.pop(0)
            scheduler.add_request(r["id"], list(r["prompt"]), r["max_new_tokens"], r["priority"])
            added_at[r["id"]] = step
        if not scheduler.has_unfinished():
            if not pending:
                break
            step = pending[0]["at_step"]  # idle until the next arrival
            continue
        running = [rid for rid in started_at if rid not in finished]
        waiting = [rid for rid in added_at if rid not in started_at]
        produced, calls = scheduler.step()
        _check_step(step, produced, calls, max_batch, budget, tokens, added_at, finished)
        started_now = [rid for rid in produced if not tokens[rid]]
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
        prefills = [(rows, width) for rows, width in calls if width > 1]  # a decode call feeds one token per row
        if sum(rows for rows, _ in prefills) > len(started_now):
            raise CheckFailed(
                f"step {step} prefilled {sum(rows for rows, _ in prefills)} prompt(s) (rows x tokens: "
                f"{', '.join(f'{r}x{t}' for r, t in prefills)}) but only {len(started_now)} request(s) produced their "
                "first token: a request's first token comes from the last position of its prefill; return it in "
                "the step that admits the request", step=step)
        if len(calls) > 1 + len(started_now):
            raise CheckFailed(
                f"step {step} called the model {len(calls)} times (rows x tokens: "
                f"{', '.join(f'{r}x{t}' for r, t in calls)}) to decode {len(running)} running requests and admit "
                f"{len(started_now)}: decode every running request in one forward pass over their lanes, plus one "
                "prefill per admitted request", calls_in_step=len(calls))
        if waiting:
            head = min(waiting, key=key)
            overtaking = [rid for rid in started_now if rid != head]
            if head not in started_at and overtaking:
                _check_order(started_at, added_at, key, case["priority"], left_waiting=(head,))
            if (head not in started_at and len(running) < max_batch
                    and len(running) + len(by_id[head]["prompt"]) <= budget):
                raise CheckFailed(
                    f"at step {step} request {head} waited at the head of the queue with a lane free ({len(running)} "
                    f"of max_batch_size={max_batch} running) and room in the budget ({len(running)} running + its "
                    f"{len(by_id[head]['prompt'])}-token prompt <= token_budget={budget}), but was not "
                    "admitted: at every step, after decoding, admit waiting requests into free lanes (not only "
                    "once the batch is empty): that is what makes the batching continuous",
                    request=head, step=step)
        run["most_calls_per_step"] = max(run["most_calls_per_step"], len(calls))
        step += 1
    run["steps"] = step


def _check_step(step: int, produced: Any, calls: Calls, max_batch: int, budget: int,
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
    widest = max((rows for rows, _ in calls), default=0)
    if widest > max_batch:
        raise CheckFailed(f"in step {step} a forward pass had {widest} rows with max_batch_size={max_batch}: "
                          "decode only the running requests, at most max_batch_size of them")
    fed = sum(rows * width for rows, width in calls)
    if fed > budget:
        raise CheckFailed(f"step {step} fed the model {fed} tokens ({' + '.join(str(r * t) for r, t in calls)}) "
                          f"with token_budget={budget}: one token per running request, plus the prompts admitted in "
                          "this step, must fit the budget; stop admitting at the first prompt that does not fit",
                          tokens_in_step=fed)


def _check_order(started_at: dict[int, int], added_at: dict[int, int], key: Any, priority: bool,
                 left_waiting: tuple[int, ...] = ()) -> None:
    """No request starts while one ahead of it in the queue order was waiting and is left waiting (`left_waiting`:
    requests still waiting now, while the run goes on)."""
    rule = "lowest priority value first, then the order they were added" if priority else "the order they were added"
    later = {**started_at, **{rid: None for rid in left_waiting}}
    for x, sx in started_at.items():
        for y, sy in later.items():
            if (sy is None or sx < sy) and added_at[y] <= sx and key(y) < key(x):
                raise CheckFailed(
                    f"request {x} started at step {sx} while request {y}, ahead of it in the queue "
                    f"({rule}), was waiting since step {added_at[y]} and "
                    f"{'was left waiting' if sy is None else f'only started at step {sy}'}: admit waiting "
                    "requests strictly in queue order, and stop at the first one that does not fit (no overtaking)")


def check_tokens(case: dict[str, Any], run: dict[str, Any]) -> int:
    """Every request of a driven case got one-at-a-time greedy generation's tokens; how many were compared."""
    for r in case["requests"]:
        problem = first_non_greedy(case["model"], r["prompt"], run["tokens"][r["id"]], r["max_new_tokens"],
                                   case["eos_id"])
        if problem:
            raise _token_failure(case, r, problem, run["started_at"].get(r["id"]))
    return len(case["requests"])


@torch.no_grad()
def verify_schedule(new_scheduler: NewScheduler, seed: int, bundled: Transformer) -> dict[str, Any]:
    """Requests added step by step: every one gets one-at-a-time greedy generation's tokens, and the
    scheduler keeps its batch size, its token budget, its queue order and one decode call per step, and
    admits at every step."""
    compared = steps = most_calls = 0
    for case in schedule_cases(seed, bundled):
        before = model_fingerprint(case["model"])
        run = run_schedule(new_scheduler, case)
        _check_model_untouched(case["model"], before, "ContinuousBatcher")
        compared += check_tokens(case, run)
        steps += run["steps"]
        most_calls = max(most_calls, run["most_calls_per_step"])
    return {"requests_compared": compared, "steps": steps, "most_calls_per_step": most_calls}


def check_cb2(batcher_cls: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None) -> dict[str, Any]:
    """CB2 self-check: the same tokens as one-at-a-time generation, and the scheduler's rules at every step."""
    return verify_schedule(lambda case: LocalScheduler(batcher_cls, case), seed,
                           model if model is not None else tiny())


# ------------------------------------------------------------------------------------------------ CB3

C3_KEYS = ("tokens", "seconds", "tokens_per_s", "latencies_s", "p50_s", "p99_s")
LATE_GAP_S = 0.3  # in a CB3 trace, the second request arrives this long after the first (the rest after it)
LATE_WINDOW = 8  # tokens of its prompt the checker looks for in what the model is fed

# Serve(model, trace, mode, max_batch_size, token_budget) -> (the learner's stats, what the model saw: a CallLog
# that kept tokens, and the seconds serve_trace took, both measured where the model runs)
Serve = Callable[[Transformer, list[Any], str, int, int], tuple[Any, "CallLog", float]]


def serve_case(seed: int, n: int = 7, rate_per_s: float = 10.0) -> list[Any]:
    """Under a second of mixed-length requests, arriving about as fast as a CPU serves them. The first one is
    alone for LATE_GAP_S: code that serves requests before they arrive feeds the second one's prompt (which no
    other prompt shares) to the model during that pause, however fast or slow the model is."""
    from inferlab.workloads import LengthDist, request_trace

    trace = request_trace(_tokenizer(), n, seed=seed, rate_per_s=rate_per_s,
                          prompt_len=LengthDist(median=24, sigma=0.8, min=LATE_WINDOW + 1, max=96),
                          output_len=LengthDist(median=10, sigma=0.9, min=2, max=32))
    shift = LATE_GAP_S - trace[1].arrival_s
    return trace[:1] + [dataclasses.replace(r, arrival_s=r.arrival_s + shift) for r in trace[1:]]


def _window(trace: list[Any]) -> tuple[int, ...] | None:
    """LATE_WINDOW tokens of the second request's prompt that occur in no other prompt, if there are any."""
    late, others = trace[1], [list(r.prompt) for i, r in enumerate(trace) if i != 1]
    for i in range(1, late.prompt_len - LATE_WINDOW + 1):  # after the BOS every prompt starts with
        window = tuple(late.prompt[i:i + LATE_WINDOW])
        if not any(_contains(p, window) for p in others):
            return window
    return None


def _contains(row: list[int], window: tuple[int, ...]) -> bool:
    n = len(window)
    return any(tuple(row[i:i + n]) == window for i in range(len(row) - n + 1))


def fed_at(log: CallLog, window: tuple[int, ...]) -> float | None:
    """When the model was first fed a row holding `window`, in seconds after the log started; None if never."""
    for call in log.calls:
        if call.tokens is not None and call.width >= len(window):
            if any(_contains(row, window) for row in call.tokens.tolist()):
                return call.at_s
    return None


def verify_serve(serve: Serve, seed: int, model: Transformer) -> dict[str, Any]:
    """The learner's measurement, checked for sense and against what the checker saw itself.

    Measured where the model runs (the checker's process when grading), out of the learner's reach: how
    long serve_trace took, when the model computed, and when the prompt of the request that arrives after a pause
    first reached the model. Measured by the learner, and only checked for agreement with each other and with those: the
    per-request latencies and the percentiles (which a learner could still forge, consistently, in a run
    of the right length)."""
    trace = serve_case(seed)
    window = _window(trace)
    late, last = trace[1], trace[-1]
    want_tokens = sum(r.max_new_tokens for r in trace)
    measured = {}
    for mode in ("static", "continuous"):
        stats, log, wall = serve(model, list(trace), mode, 4, 128)
        if not isinstance(stats, dict) or not all(k in stats for k in C3_KEYS):
            raise CheckFailed(f"serve_trace(mode={mode!r}) must return a dict with keys {', '.join(C3_KEYS)}; got "
                              f"{sorted(stats) if isinstance(stats, dict) else type(stats).__name__}")
        try:
            lat = np.asarray(stats["latencies_s"], dtype=float)
            seconds, rate = float(stats["seconds"]), float(stats["tokens_per_s"])
            p50, p99, tokens = float(stats["p50_s"]), float(stats["p99_s"]), float(stats["tokens"])
        except (TypeError, ValueError) as err:
            raise CheckFailed(f"serve_trace(mode={mode!r}) must return numbers (and a list of latencies): {err}") \
                from None
        if lat.ndim != 1 or len(lat) != len(trace):
            raise CheckFailed(f"{mode}: latencies_s has {lat.size} values for {len(trace)} requests: one latency "
                              "(finish time - arrival time) per request")
        if tokens != want_tokens:
            raise CheckFailed(f"{mode}: {stats['tokens']} tokens counted, but the trace asks for {want_tokens}: count "
                              "every new token of every request")
        first_fed = fed_at(log, window) if window is not None else None
        if first_fed is not None and first_fed < late.arrival_s - 0.01:
            raise CheckFailed(f"{mode}: request {late.id}, which arrives at {late.arrival_s:.2f} s, reached the model "
                              f"{first_fed:.2f} s after serve_trace was called, before it arrived: serve a request "
                              "only once time.perf_counter() - start >= its arrival_s, and sleep until the next "
                              "arrival when there is nothing to do", fed_at_s=round(first_fed, 3))
        if (lat < 0).any():
            i = int(np.argmin(lat))
            raise CheckFailed(f"{mode}: request {trace[i].id} finished {-lat[i]:.2f} s before it arrived (arrival_s "
                              f"{trace[i].arrival_s:.2f}): serve a request only once time.perf_counter() - start >= "
                              "its arrival_s, and sleep until the next arrival when there is nothing to do")
        if not np.isfinite(lat).all() or (lat <= 0).any() or not 0 < seconds < 1e4:
            raise CheckFailed(f"{mode}: latencies and seconds must be positive and finite; got seconds={seconds} and "
                              f"latencies from {lat.min():.3g} to {lat.max():.3g}")
        if seconds < last.arrival_s:
            raise CheckFailed(f"{mode}: all requests were served in {seconds:.2f} s, before the last one arrives at "
                              f"{last.arrival_s:.2f} s: admit a request only once time.perf_counter() - start >= its "
                              "arrival_s")
        computing = log.calls[-1].at_s if log.calls else 0.0
        if seconds > wall + 0.02 or seconds < computing - (0.25 + 0.2 * computing):  # room for a slow start
            raise CheckFailed(f"{mode}: seconds={seconds:.2f}, but serve_trace returned {wall:.2f} s after it was "
                              f"called and the model was last called {computing:.2f} s in: measure from one "
                              "start = time.perf_counter(), taken before serving, to when the last request is done",
                              wall_s=round(wall, 3))
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


def watched_serve(serve_fn: Any) -> Serve:
    """A learner's serve_trace, in this process, with the model's calls (and their tokens) recorded."""
    def serve(model: Transformer, trace: list[Any], mode: str, max_batch: int, budget: int):
        log = CallLog(model, keep_tokens=True)
        try:
            stats = serve_fn(model, trace, mode, max_batch, budget)
            return stats, log, time.perf_counter() - log.start
        finally:
            log.close()
    return serve


def check_cb3(serve_fn: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None) -> dict[str, Any]:
    """CB3 self-check: every request served as it arrives, and numbers that agree with each other."""
    return verify_serve(watched_serve(serve_fn), seed, model if model is not None else tiny())


# ------------------------------------------------------------------------------------------------ CB4

# The graded workload: requests of mixed lengths, all waiting at once (offline throughput: the same
# work for both schedulers, so the ratio of their times is the ratio of their throughputs).
PERF_REQUESTS, PERF_MAX_BATCH, PERF_TOKEN_BUDGET = 32, 8, 256
READY_REQUESTS, READY_NEW_TOKENS = 8, 16  # CB4's correctness gate: the timed configuration, shorter outputs


def perf_trace(seed: int) -> list[list[int]]:
    """One timed round's requests, each as [max_new_tokens, *prompt] (JSON for the timing workers)."""
    from inferlab.workloads import LengthDist, request_trace

    trace = request_trace(_tokenizer(), PERF_REQUESTS, seed=seed,
                          prompt_len=LengthDist(median=32, sigma=0.8, min=8, max=128),
                          output_len=LengthDist(median=24, sigma=0.9, min=4, max=128))
    return [[r.max_new_tokens, *r.prompt] for r in trace]


def perf_traces(seed: int, n: int) -> list[list[list[int]]]:
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


def ready_case(seed: int, bundled: Transformer) -> dict[str, Any]:
    """CB4's gate: the first requests of the timed workload, all added at once, under the timed limits."""
    requests = perf_trace(seed)[:READY_REQUESTS]
    return dict(model=bundled, which=f"the bundled model ({READY_REQUESTS} requests of CB4's workload, added at once)",
                max_batch_size=PERF_MAX_BATCH, token_budget=PERF_TOKEN_BUDGET, priority=False, eos_id=None,
                requests=[dict(id=i, prompt=prompt, max_new_tokens=min(new, READY_NEW_TOKENS), priority=0, at_step=0)
                          for i, (new, *prompt) in enumerate(requests)])


@torch.no_grad()
def verify_ready(new_scheduler: NewScheduler, seed: int, bundled: Transformer) -> dict[str, Any]:
    """CB4 times ContinuousBatcher, so it must first be right, with CB2's rules, on the timed workload's limits (the
    autograder also requires CB2 to have passed: `requires` in the lab's spec)."""
    case = ready_case(seed, bundled)
    try:
        run = run_schedule(new_scheduler, case)
        check_tokens(case, run)
    except CheckFailed as err:
        raise CheckFailed(f"CB4 times ContinuousBatcher with max_batch_size={PERF_MAX_BATCH} and "
                          f"token_budget={PERF_TOKEN_BUDGET}, so it must first be right there: {err.message}",
                          **err.measured) from None
    return {"correct_on_requests": len(case["requests"])}


def check_cb4_speed(static_fn: Any, batcher_cls: Any, seed: int = PUBLIC_SEED, model: Transformer | None = None,
                    profile: str | None = None, rounds: tuple[int, int] = (3, 6)) -> dict[str, Any]:
    """CB4 self-check: ContinuousBatcher against your static_batch_generate, interleaved in this process, against
    the calibrated bar. The graded measure is taken by the autograder instead, in separate processes, against
    the reference's static batching and the reference scheduler in the same run (`grader.perf_stage`)."""
    from ...perf import ClockTampered, self_check_speed, speedup_over_baseline, threshold

    model = model if model is not None else tiny()
    verify_ready(lambda case: LocalScheduler(batcher_cls, case), seed, model)
    if os.environ.get("INFERLAB_AUTOGRADE"):
        return {"timing": "by the autograder, against the reference in the same run"}
    bar = threshold(LAB, "CB4", profile)
    calibrated = bar["calibration"]["reference_speedup_vs_static"]
    traces = iter(perf_traces(seed + 1, rounds[1] + 2))
    queue: dict[str, list] = {"baseline": [], "candidate": []}

    def take(name):  # a new trace every round, the same one for both contenders
        if not queue[name]:
            t = next(traces)
            queue["baseline"].append(t)
            queue["candidate"].append(t)
        return queue[name].pop(0)

    with torch.no_grad():
        try:
            result = speedup_over_baseline(lambda: run_batcher(batcher_cls, model, take("candidate")),
                                           lambda: run_static(static_fn, model, take("baseline")),
                                           rounds=rounds, max_seconds=40.0)
        except ClockTampered as err:
            raise CheckFailed(f"the clock was tampered with ({', '.join(err.names)}): performance cannot be "
                              "measured; remove any code that replaces timing functions",
                              tampering=", ".join(err.names)) from None
    speedup = result.speedup("candidate")
    low, high = result.ratios["candidate"]["ci_low"], result.ratios["candidate"]["ci_high"]
    measured = {"speedup_vs_static": round(speedup, 2), "ci95": [round(low, 2), round(high, 2)],
                "threshold": bar["min_speedup_vs_static"],
                "calibrated_reference_speedup_vs_static": calibrated,  # measured once, on the calibration machine
                "profile": bar["profile"], "rounds": result.rounds}
    too_slow = (
        f"ContinuousBatcher serves {PERF_REQUESTS} mixed-length requests {speedup:.2f}x as fast as your static "
        f"batching; the bar is {bar['min_speedup_vs_static']}x on the {bar['profile']} profile (the reference "
        f"reached {calibrated}x when the bar was calibrated): admit waiting requests into freed lanes at every "
        "step, and decode all running requests in one forward pass")
    return self_check_speed(speedup, (low, high), bar["min_speedup_vs_static"], measured, too_slow)
