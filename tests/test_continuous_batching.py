"""The continuous_batching lab: the reference and a solution written differently pass, the stub is 'not attempted',
each known mistake is caught with a message that names it, the work is counted where the model runs, and the
timing stage passes the reference and fails static batching behind the same interface.

Two halves. The checks' logic (`grader.labs.continuous_batching.public`) runs here in-process, as a
notebook's self-checks run it, on the known mistakes (the edits `grader/labs/continuous_batching/samples.py`
defines). Then one batch of answer variants goes through `grader.check_stage` as the autograder runs it
(bubblewrap, one answers process each, the model served from the checker): the samples get the grades
a careful grader gives them, and lazy algorithms with the right tokens get none of the points they sought.
The reference is the solution notebook itself.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from conftest import check_batch
from grader import labs, notebook, release, samples
from grader.checks import ERROR, FAILED, INCONCLUSIVE, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.continuous_batching import grading
from grader.labs.continuous_batching import public as checks
from grader.labs.continuous_batching import samples as mistakes
from grader.sandbox import Limits

LAB = labs.load("continuous_batching")
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "solutions" / LAB.name / f"{LAB.name}.ipynb"
ANSWER_CELLS = ["cb1-solution", "cb2-solution", "cb3-solution"]
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    yield notebook.exec_cells(notebook.read(SOURCE), list(LAB.spec.reference_cells))
    torch.set_num_threads(threads)  # the notebook's setup pins one thread; leave the session as it was


@pytest.fixture(scope="module")
def stub(reference):
    nb = notebook.read(SOURCE)
    ns = dict(reference)
    for cell_id in ANSWER_CELLS:
        exec(notebook.strip_solutions(notebook.cell(nb, cell_id).source,
                                      f'raise NotImplementedError("Task {cell_id[:3].upper()} stub")'), ns)
    return ns


def with_edits(reference, cell_id: str, edits) -> dict:
    """The reference namespace with one answer cell replaced by the edited reference (a learner's mistake)."""
    ns = dict(reference)
    exec(mistakes.edited(cell_id, edits), ns)
    return ns


def with_cell(reference, source: str) -> dict:
    ns = dict(reference)
    exec(source, ns)
    return ns


# ---------------------------------------------------------------- answers a learner might write

# Correct, written differently from the reference.
DIFFERENT_CB1 = '''
import torch.nn.functional as F

def static_batch_generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0):
    # Rows right-aligned with F.pad, the mask grown by one column per step, finished rows in a tensor.
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    width, steps = max(map(len, prompts)), max(wanted)
    rows = torch.stack([F.pad(torch.tensor(p), (width - len(p), 0), value=pad_id) for p in prompts])  # [B, T]
    mask = torch.stack([F.pad(torch.ones(len(p), dtype=torch.bool), (width - len(p), 0)) for p in prompts])
    cache = ContiguousKVCache(model.args, len(prompts), width + steps)
    out, live = [[] for _ in prompts], torch.ones(len(prompts), dtype=torch.bool)
    with torch.no_grad():
        logits = model(rows, torch.arange(width), cache, attention_mask=mask)
        for i in range(steps):
            chosen = logits[:, -1].argmax(-1)
            for b in live.nonzero().flatten().tolist():
                out[b].append(int(chosen[b]))
                live[b] = len(out[b]) < wanted[b] and out[b][-1] != eos_id
            if not live.any():
                break
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
            logits = model(chosen[:, None], torch.tensor([width + i]), cache, attention_mask=mask)
    return out
'''
DIFFERENT_CB2 = '''
class ContinuousBatcher:
    # A sorted list as the queue, one list per running request, the lowest free lane found with a set.
    def __init__(self, model, max_batch_size, token_budget, priority=False, eos_id=None):
        self.model, self.max_batch_size, self.token_budget = model, max_batch_size, token_budget
        self.priority, self.eos_id, self.arrivals = priority, eos_id, 0
        self.cache = LaneKVCache(model.args, max_batch_size, model.args.max_seq_len)
        self.queue = []  # (priority, arrival, request_id, prompt, max_new_tokens), kept sorted
        self.lanes = {}  # lane -> [request_id, prompt, max_new_tokens, tokens]

    def add_request(self, request_id, prompt, max_new_tokens, priority=0):
        self.queue.append((priority if self.priority else 0, self.arrivals, request_id, list(prompt), max_new_tokens))
        self.arrivals += 1
        self.queue.sort(key=lambda q: q[:2])

    @property
    def has_unfinished(self):
        return len(self.queue) + len(self.lanes) > 0

    def _done(self, state):
        return len(state[3]) == state[2] or (self.eos_id is not None and state[3][-1] == self.eos_id)

    def step(self):
        out, left = {}, self.token_budget
        with torch.no_grad():
            if self.lanes:
                lanes = sorted(self.lanes)
                last = torch.tensor([[self.lanes[lane][3][-1]] for lane in lanes])
                pos = torch.tensor([[len(self.lanes[lane][1]) + len(self.lanes[lane][3]) - 1] for lane in lanes])
                chosen = self.model(last, pos, self.cache.lanes(lanes))[:, -1].argmax(-1).tolist()
                left -= len(lanes)
                for lane, token in zip(lanes, chosen):
                    state = self.lanes[lane]
                    state[3].append(token)
                    out[state[0]] = token
                    if self._done(state):
                        del self.lanes[lane]
            while self.queue and len(self.lanes) < self.max_batch_size and len(self.queue[0][3]) <= left:
                _, _, request_id, prompt, wanted = self.queue.pop(0)
                lane = min(set(range(self.max_batch_size)) - set(self.lanes))
                left -= len(prompt)
                logits = self.model(torch.tensor([prompt]), torch.arange(len(prompt)), self.cache.lanes([lane]))
                state = [request_id, prompt, wanted, [int(logits[0, -1].argmax())]]
                out[request_id] = state[3][0]
                if not self._done(state):
                    self.lanes[lane] = state
        return out
'''
DIFFERENT_CB3 = '''
import statistics

def serve_trace(model, trace, mode, max_batch_size, token_budget, eos_id=None):
    # time.monotonic, an index into the trace, statistics.median and np.quantile.
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0
    reqs, by_id = sorted(trace, key=lambda r: r.arrival_s), {r.id: r for r in trace}
    nxt, done_at, produced = 0, {}, 0
    if mode == "static":
        while nxt < len(reqs):
            time.sleep(max(0.0, reqs[nxt].arrival_s - clock()))
            group = []
            while nxt < len(reqs) and len(group) < max_batch_size and reqs[nxt].arrival_s <= clock():
                group.append(reqs[nxt])
                nxt += 1
            outs = static_batch_generate(model, [list(r.prompt) for r in group], [r.max_new_tokens for r in group],
                                         eos_id)
            for r, o in zip(group, outs):
                done_at[r.id], produced = clock(), produced + len(o)
    else:
        batcher, counts = ContinuousBatcher(model, max_batch_size, token_budget, eos_id=eos_id), {}
        while nxt < len(reqs) or batcher.has_unfinished:
            while nxt < len(reqs) and reqs[nxt].arrival_s <= clock():
                batcher.add_request(reqs[nxt].id, list(reqs[nxt].prompt), reqs[nxt].max_new_tokens)
                nxt += 1
            if not batcher.has_unfinished:
                time.sleep(max(0.0, reqs[nxt].arrival_s - clock()))
                continue
            for rid, token in batcher.step().items():
                counts[rid] = counts.get(rid, 0) + 1
                produced += 1
                if counts[rid] == by_id[rid].max_new_tokens or token == eos_id:
                    done_at[rid] = clock()
    total = clock()
    lat = [done_at[r.id] - r.arrival_s for r in trace]
    return {"tokens": produced, "seconds": total, "tokens_per_s": produced / total, "latencies_s": lat,
            "p50_s": statistics.median(lat), "p99_s": float(np.quantile(lat, 0.99))}
'''

# Right tokens, with the work of generating the prompts one at a time (the given cached_generate).
ONE_AT_A_TIME_CB1 = '''
def static_batch_generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0):
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    return [cached_generate(model, prompt, n, eos_id=eos_id) for prompt, n in zip(prompts, wanted)]
'''
# Right tokens, batched, but no cache: the whole left-padded batch recomputed at every step.
RECOMPUTE_CB1 = '''
def static_batch_generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0):
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    width = max(map(len, prompts))
    rows = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    out, done = [[] for _ in prompts], [False] * len(prompts)
    with torch.no_grad():
        for _ in range(max(wanted)):
            chosen = model(rows, torch.arange(rows.shape[1]), attention_mask=mask)[:, -1].argmax(-1)
            for b in range(len(prompts)):
                if not done[b]:
                    out[b].append(int(chosen[b]))
                    done[b] = len(out[b]) == wanted[b] or out[b][-1] == eos_id
            if all(done):
                break
            rows = torch.cat([rows, chosen[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
    return out
'''
# Right tokens and limits, but every running request decoded in a forward pass of its own.
DECODES_ONE_BY_ONE = [(
    "            logits = self.model(tokens, positions, self.cache.lanes(lanes))                         # [B, 1, V]",
    "            logits = torch.cat([self.model(tokens[i:i + 1], positions[i:i + 1], self.cache.lanes([lane]))\n"
    "                                for i, lane in enumerate(lanes)])                                   # [B, 1, V]")]
# Right numbers, but the run's length is made up (twice what it took).
FORGED_SECONDS = [("    seconds = now()\n", "    seconds = 2 * now()  # looks like a slower machine\n")]


# ---------------------------------------------------------------- the checks, in-process

@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1])
def test_reference_passes_every_check_on_public_and_drawn_inputs(reference, seed):
    model = reference["model"]
    for task, check, answer in (("CB1", checks.check_cb1, reference["static_batch_generate"]),
                                ("CB2", checks.check_cb2, reference["ContinuousBatcher"]),
                                ("CB3", checks.check_cb3, reference["serve_trace"])):
        result = run_check(task, check, answer, seed=seed, model=model)
        assert result.status == PASSED, result.line()
    result = run_check("CB4", checks.verify_ready, lambda case: checks.LocalScheduler(reference["ContinuousBatcher"],
                                                                                       case), seed, model)
    assert result.status == PASSED, result.line()


def test_drawn_seeds_change_the_workloads(reference):
    model = reference["model"]
    shapes = set()
    for seed in range(4):
        cases = checks.schedule_cases(seed, model)
        shapes.add(tuple((c["max_batch_size"], c["token_budget"], len(c["requests"])) for c in cases))
    assert len(shapes) == 4
    assert checks.perf_trace(1) != checks.perf_trace(2)
    assert checks.serve_case(1)[-1].prompt != checks.serve_case(2)[-1].prompt


def test_stub_is_not_attempted_with_task_id(stub):
    model = stub["model"]
    results = [run_check("CB1", checks.check_cb1, stub["static_batch_generate"], model=model),
               run_check("CB2", checks.check_cb2, stub["ContinuousBatcher"], model=model),
               run_check("CB3", checks.check_cb3, stub["serve_trace"], model=model)]
    for r in results:
        assert r.status == NOT_ATTEMPTED, r.line()
        assert "Task CB" in r.message


@pytest.mark.parametrize("source, says", [
    (mistakes.edited("cb1-solution", mistakes.C1_NO_MASK), "only rows with padding are wrong"),
    (mistakes.edited("cb1-solution", mistakes.C1_RIGHT_PADDING), "is not one-at-a-time greedy generation"),
    (mistakes.edited("cb1-solution", mistakes.C1_EOS_STOPS_ALL), "each row stops on its own"),
    (ONE_AT_A_TIME_CB1, "the tokens are right, but"),
    (RECOMPUTE_CB1, "the tokens are right, but"),
], ids=["no-mask", "right-padding", "eos-stops-all", "one-at-a-time", "recompute"])
def test_cb1_mistakes_are_caught(reference, source, says):
    ns = with_cell(reference, source)
    result = run_check("CB1", checks.check_cb1, ns["static_batch_generate"], seed=5, model=reference["model"])
    assert result.status == FAILED and says in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.C2_SHARED_POSITION, "each at its own position"),
    (mistakes.C2_OVERTAKES, "no overtaking"),
    (mistakes.C2_IGNORES_PRIORITY, "lowest priority value first"),
    (mistakes.C2_IGNORES_BUDGET, "token_budget="),
    (mistakes.C2_EXTRA_LANE, "at most max_batch_size requests may run at once"),
    (mistakes.C2_DROPS_FIRST_TOKEN, "produced their first token"),
    (mistakes.C2_ADMITS_ONLY_WHEN_EMPTY, "waited at the head of the queue with a lane free"),
    (DECODES_ONE_BY_ONE, "decode every running request in one forward pass"),
], ids=["shared-position", "overtakes", "ignores-priority", "ignores-budget", "extra-lane", "drops-first-token",
        "admits-only-when-empty", "decodes-one-by-one"])
def test_cb2_mistakes_are_caught(reference, edits, says):
    ns = with_edits(reference, "cb2-solution", edits)
    result = run_check("CB2", checks.check_cb2, ns["ContinuousBatcher"], seed=5, model=reference["model"])
    assert result.status == FAILED and says in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.C3_IGNORES_ARRIVALS, "before it arrived"),
    (mistakes.C3_WRONG_PERCENTILES, "np.percentile"),
    (FORGED_SECONDS, "serve_trace returned"),
], ids=["ignores-arrivals", "wrong-percentiles", "forged-seconds"])
def test_cb3_mistakes_are_caught(reference, edits, says):
    ns = with_edits(reference, "cb3-solution", edits)
    result = run_check("CB3", checks.check_cb3, ns["serve_trace"], seed=5, model=reference["model"])
    assert result.status == FAILED and says in result.message, result.line()


def test_code_that_edits_the_model_is_caught_in_a_self_check(reference):
    """Dropping layers makes generation faster and 'equal' to greedy generation on the edited model. (Graded, the
    model runs in the checker, where the learner's code cannot reach it.)"""
    fast = reference["static_batch_generate"]

    def drops_layers(model, prompts, max_new_tokens, eos_id=None):
        model.layers = model.layers[:1]
        return fast(model, prompts, max_new_tokens, eos_id)

    result = run_check("CB1", checks.check_cb1, drops_layers, model=copy.deepcopy(reference["model"]))
    assert result.status == FAILED and "changed the model" in result.message, result.line()


def test_tokens_that_claim_to_equal_anything_are_caught(reference):
    class AlwaysEqual(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    base = reference["ContinuousBatcher"]

    class Liar(base):
        def step(self):
            return {rid: AlwaysEqual(0) for rid in super().step()}

    result = run_check("CB2", checks.check_cb2, Liar, model=reference["model"])
    assert result.status == FAILED and "greedy generation gives" in result.message, result.line()


def test_crash_in_learner_code_is_an_error_with_its_line(reference):
    def crashes(model, prompts, max_new_tokens, eos_id=None):
        return model.argz  # a typo

    result = run_check("CB1", checks.check_cb1, crashes, model=reference["model"])
    assert result.status == ERROR and "AttributeError" in result.message and "argz" in result.message


def test_greedy_verdicts_and_the_timing_stage_tolerance(reference):
    """Teacher forcing agrees with naive_generate; a timed result that differs from the baseline's passes
    only if it is still greedy generation with the same lengths."""
    from inferlab import naive_generate

    model = reference["model"]
    requests = checks.perf_trace(7)[:3]
    want = [naive_generate(model, prompt, new) for new, *prompt in requests]
    for (new, *prompt), tokens in zip(requests, want):
        assert checks.first_non_greedy(model, prompt, tokens, new, None) == ""
    flat = checks.flatten(want)
    assert checks.unflatten(flat) == want
    assert LAB.timed_outputs_agree(requests, flat, flat)
    corrupted = [list(t) for t in want]
    corrupted[1][2] = (corrupted[1][2] + 1) % model.args.vocab_size
    assert not LAB.timed_outputs_agree(requests, checks.flatten(corrupted), flat)
    assert not LAB.timed_outputs_agree(requests, checks.flatten(want[:2]), flat)


def test_the_public_module_holds_no_answer():
    """What a notebook imports as `checks` batches nothing and schedules nothing: it judges and counts."""
    text = Path(checks.__file__).read_text()
    for answer in ("def static_batch_generate", "class ContinuousBatcher", "def serve_trace", "attention_mask=",
                   "LaneKVCache", "heapq"):
        assert answer not in text, answer


def test_given_kv_cache_code_is_generated_from_its_source():
    """The lab ships kv_cache's reference KV1 and KV2 in a locked cell generated from kv_cache's source."""
    source = notebook.read(SOURCE)
    given = notebook.cell(source, "given")
    spec = release.given_from(given)
    assert spec == {"lab": "kv_cache", "cells": ["kv1-solution", "kv2-solution"]}
    assert given.source == release.given_source(spec)
    assert "class ContiguousKVCache" in given.source and "def cached_generate" in given.source
    assert notebook.SOLUTION_BEGIN not in given.source
    released = notebook.read(ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb")
    assert notebook.cell(released, "given").source == given.source
    assert given.metadata["nbgrader"]["locked"] and not given.metadata["nbgrader"]["solution"]
    # kv_cache's own release and the shared runtime hold none of it (they reach learners first).
    for path in [ROOT / "labs" / "kv_cache" / "kv_cache.ipynb", *sorted((ROOT / "labs" / "inferlab").glob("*.py")),
                 *sorted((ROOT / "grader").rglob("*.py"))]:
        assert "self.k[layer, :, :, input_pos] = k" not in path.read_text(), path


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB.name, tmp_path)
    assert set(paths) == set(mistakes.SAMPLES)
    slow = notebook.read(paths["slow"])
    assert "filling = not self.running" in notebook.cell(slow, "cb2-solution").source


# ---------------------------------------------------------------- the check stage: the autograder's verdicts

def variant(cells: dict[str, str] | None = None, from_release: bool = False):
    nb = notebook.read(ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb") if from_release else samples.solved(LAB.name)
    for gid, source in (cells or {}).items():
        notebook.cell(nb, gid).source = source
    return prepare(notebook.read(SOURCE), nb)


def sample(name: str):
    spec = mistakes.SAMPLES[name]
    return variant(spec["cells"], spec.get("from_release", False)), spec["expected"]


VARIANTS = {
    **{name: sample(name) for name in ("reference", "stub", "slow", "wrong", "shared-position")},
    "different-but-correct": (variant({"cb1-solution": DIFFERENT_CB1, "cb2-solution": DIFFERENT_CB2,
                                       "cb3-solution": DIFFERENT_CB3}), mistakes.ALL),
    # Right tokens, no batching: a careful grader gives CB1 nothing, and CB3 (which measures it) nothing.
    "one-at-a-time": (variant({"cb1-solution": ONE_AT_A_TIME_CB1}), {"CB1": 0, "CB2": 4, "CB3": 0, "CB4": 2}),
    # Serves every request at once: seen by the checker, when the late request's prompt reaches the model.
    "ignores-arrivals": (variant({"cb3-solution": mistakes.edited("cb3-solution", mistakes.C3_IGNORES_ARRIVALS)}),
                         {"CB1": 3, "CB2": 4, "CB3": 0, "CB4": 2}),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Each variant through the check stage once: {name: (points by task, outcomes)}."""
    return check_batch(LAB, {name: nb for name, (nb, _) in VARIANTS.items()}, tmp_path_factory)


@needs_bwrap
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_gets_what_a_careful_grader_gives(checked, name):
    points, results, _ = checked[name]
    assert points == VARIANTS[name][1], "\n".join(r.line() for r in results.values())


@needs_bwrap
def test_the_checker_counts_the_work_it_serves(checked):
    """The counts come from the model the checker runs: one call per step for CB1, one decode call per step for CB2."""
    _, ref, _ = checked["reference"]
    assert ref["CB1"].measured["most_calls_per_batch"] <= 14  # at most 13 new tokens per row: one call per step
    assert ref["CB2"].measured["most_calls_per_step"] <= 4  # one decode call, plus a prefill per admitted request
    _, lazy, _ = checked["one-at-a-time"]
    assert "the tokens are right, but" in lazy["CB1"].message and lazy["CB1"].measured["calls"] > \
        lazy["CB1"].measured["most_calls"], lazy["CB1"].line()
    _, slow, _ = checked["slow"]
    assert "waited at the head of the queue with a lane free" in slow["CB2"].message, slow["CB2"].line()
    _, late, _ = checked["ignores-arrivals"]
    assert "reached the model" in late["CB3"].message and "before it arrived" in late["CB3"].message, \
        late["CB3"].line()


@needs_bwrap
def test_a_task_built_on_wrong_work_says_which(checked):
    """CB3 measures CB1's and CB2's code: on wrong tokens it is not checked, and says what to fix first."""
    _, wrong, _ = checked["wrong"]
    assert not wrong["CB3"].passed and "CB3 builds on CB1, which did not pass" in wrong["CB3"].message
    _, shared, _ = checked["shared-position"]
    assert "builds on CB2" in shared["CB3"].message and "builds on CB2" in shared["CB4"].message
    _, stub, _ = checked["stub"]
    assert all(r.status == NOT_ATTEMPTED and "CB" in r.message for r in stub.values())


# ---------------------------------------------------------------- the timing stage, in bubblewrap

@needs_bwrap
def test_timing_stage_times_the_lab_s_contenders_and_passes_the_reference(tmp_path):
    """CB4's parts through the real timing stage: the contenders (`probes.perf_contenders`), a new trace every
    round (`perf_prompts`), every timed result checked (`timed_outputs_agree`) and the verdict (`judge_timing`).
    The scheduler this bar exists to fail, static batching behind the same interface (the `slow` sample), no longer
    reaches it: CB2's admission rule fails it first (see the graded batch above); the stage's verdict rule on slow
    code is tested on kv_cache (tests/test_perf_stage.py, tests/test_timing_verdicts.py)."""
    from grader.perf_stage import time_submission

    source = notebook.read(SOURCE)
    spec = dataclasses.replace(LAB.spec.timed, rounds=(3, 5))  # fewer rounds than grading: only a pass is asked
    prepared = prepare(source, samples.solved(LAB.name))
    ref = time_submission(LAB.name, prepared, source, "bwrap", Limits(threads=1), seed=11, spec=spec)
    # Every timed result was checked against static batching's (a result that differs fails); a machine too busy
    # to tell in 5 rounds is inconclusive, never a fail.
    assert ref.status in (PASSED, INCONCLUSIVE), ref.line()
    if ref.status == PASSED:
        assert 0.7 < ref.measured["fraction_of_reference"] < 1.4 and ref.measured["reference_speedup_vs_static"] > 1.2


def test_grading_side_is_what_the_registry_finds():
    assert LAB.grading is grading and set(grading.HIDDEN_CHECKS) == {t.id for t in LAB.spec.tasks}
    assert LAB.timed.task == "CB4" and LAB.spec.task("CB3").requires == ("CB1", "CB2")
