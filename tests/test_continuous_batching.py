"""The continuous_batching lab: the reference passes, the stub is 'not attempted', each known mistake is
caught with a message that names it, the kv_cache code it builds on is generated from kv_cache's source,
and the timing stage passes the reference and fails static batching behind the same interface.

The reference is the solution notebook itself (solutions/continuous_batching/continuous_batching.ipynb),
so the checks are proven against the one source learners' answers are compared with. The mistakes
are the edits that samples/continuous_batching.py defines.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from grader import notebook, release, samples
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.labs import continuous_batching as checks

LAB = "continuous_batching"
ROOT = Path(__file__).resolve().parent.parent
samples.definitions(LAB)  # puts the repository on sys.path, where samples/ lives
import samples.continuous_batching as mistakes  # noqa: E402 (the known mistakes, as the samples define them)
SOURCE = ROOT / "solutions" / LAB / f"{LAB}.ipynb"
ANSWER_CELLS = ["c1-solution", "c2-solution", "c3-solution"]


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    yield notebook.exec_cells(notebook.read(SOURCE), checks.REFERENCE_CELLS)
    torch.set_num_threads(threads)  # the notebook's setup pins one thread; leave the session as it was


@pytest.fixture(scope="module")
def stub(reference):
    nb = notebook.read(SOURCE)
    ns = dict(reference)
    for cell_id in ANSWER_CELLS:
        exec(notebook.strip_solutions(notebook.cell(nb, cell_id).source,
                                      f'raise NotImplementedError("Task {cell_id[:2].upper()} stub")'), ns)
    return ns


def with_edits(reference, cell_id: str, edits) -> dict:
    """The reference namespace with one answer cell replaced by the edited reference (a learner's mistake)."""
    ns = dict(reference)
    exec(mistakes.edited(cell_id, edits), ns)
    return ns


@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2])
def test_reference_passes_c1_and_c2_on_public_and_drawn_inputs(reference, seed):
    model = reference["model"]
    for task, check, answer in (("C1", checks.check_c1, reference["static_batch_generate"]),
                                ("C2", checks.check_c2, reference["ContinuousBatcher"])):
        result = run_check(task, check, answer, seed=seed, model=model)
        assert result.status == PASSED, result.line()


def test_reference_passes_c3_and_the_c4_gate(reference):
    model = reference["model"]
    result = run_check("C3", checks.check_c3, reference["serve_trace"], seed=3, model=model)
    assert result.status == PASSED, result.line()
    assert result.measured["continuous_p50_s"] < result.measured["static_p50_s"]
    result = run_check("C4", checks.check_c4_ready, reference["ContinuousBatcher"], seed=4, model=model)
    assert result.status == PASSED, result.line()


def test_drawn_seeds_change_the_workloads(reference):
    model = reference["model"]
    shapes = set()
    for seed in range(4):
        cases = checks._c2_workload(seed, model)
        shapes.add(tuple((c["max_batch_size"], c["token_budget"], len(c["requests"])) for c in cases))
    assert len(shapes) == 4
    assert checks.perf_trace(1) != checks.perf_trace(2)


def test_stub_is_not_attempted_with_task_id(stub):
    model = stub["model"]
    results = [run_check("C1", checks.check_c1, stub["static_batch_generate"], model=model),
               run_check("C2", checks.check_c2, stub["ContinuousBatcher"], model=model),
               run_check("C3", checks.check_c3, stub["serve_trace"], model=model),
               run_check("C4", checks.check_c4_ready, stub["ContinuousBatcher"], model=model)]
    for r in results:
        assert r.status == NOT_ATTEMPTED, r.line()
        assert "Task C" in r.message


@pytest.mark.parametrize("edits, says", [
    (mistakes.C1_NO_MASK, "only rows with padding are wrong"),
    (mistakes.C1_RIGHT_PADDING, "is not one-at-a-time greedy generation"),
    (mistakes.C1_EOS_STOPS_ALL, "each row stops on its own"),
], ids=["no-mask", "right-padding", "eos-stops-all"])
def test_c1_mistakes_are_caught(reference, edits, says):
    ns = with_edits(reference, "c1-solution", edits)
    result = run_check("C1", checks.check_c1, ns["static_batch_generate"], seed=5, model=reference["model"])
    assert result.status == FAILED and says in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.C2_SHARED_POSITION, "each at its own position"),
    (mistakes.C2_OVERTAKES, "no overtaking"),
    (mistakes.C2_IGNORES_PRIORITY, "lowest priority value first"),
    (mistakes.C2_IGNORES_BUDGET, "token_budget="),
    (mistakes.C2_EXTRA_LANE, "at most max_batch_size requests may run at once"),
    (mistakes.C2_DROPS_FIRST_TOKEN, "new token 0 is"),
], ids=["shared-position", "overtakes", "ignores-priority", "ignores-budget", "extra-lane", "drops-first-token"])
def test_c2_mistakes_are_caught(reference, edits, says):
    ns = with_edits(reference, "c2-solution", edits)
    result = run_check("C2", checks.check_c2, ns["ContinuousBatcher"], seed=5, model=reference["model"])
    assert result.status == FAILED and says in result.message, result.line()


def test_static_batching_behind_the_scheduler_interface_keeps_every_rule(reference):
    """The 'slow' sample is correct: only C4 can tell it apart."""
    ns = with_edits(reference, "c2-solution", mistakes.C2_ADMITS_ONLY_WHEN_EMPTY)
    result = run_check("C2", checks.check_c2, ns["ContinuousBatcher"], seed=5, model=reference["model"])
    assert result.status == PASSED, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.C3_IGNORES_ARRIVALS, "before it arrived"),
    (mistakes.C3_WRONG_PERCENTILES, "np.percentile"),
], ids=["ignores-arrivals", "wrong-percentiles"])
def test_c3_mistakes_are_caught(reference, edits, says):
    ns = with_edits(reference, "c3-solution", edits)
    result = run_check("C3", checks.check_c3, ns["serve_trace"], seed=5, model=reference["model"])
    assert result.status == FAILED and says in result.message, result.line()


def test_code_that_edits_the_model_is_caught(reference):
    """Dropping layers makes generation faster and 'equal' to greedy generation on the edited model."""
    fast = reference["static_batch_generate"]

    def drops_layers(model, prompts, max_new_tokens, eos_id=None):
        model.layers = model.layers[:1]
        return fast(model, prompts, max_new_tokens, eos_id)

    result = run_check("C1", checks.check_c1, drops_layers, model=copy.deepcopy(reference["model"]))
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

    result = run_check("C2", checks.check_c2, Liar, model=reference["model"])
    assert result.status == FAILED and "greedy generation gives" in result.message, result.line()


def test_crash_in_learner_code_is_an_error_with_its_line(reference):
    def crashes(model, prompts, max_new_tokens, eos_id=None):
        return model.argz  # a typo

    result = run_check("C1", checks.check_c1, crashes, model=reference["model"])
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
    assert checks.timed_outputs_agree(requests, flat, flat)
    corrupted = [list(t) for t in want]
    corrupted[1][2] = (corrupted[1][2] + 1) % model.args.vocab_size
    assert not checks.timed_outputs_agree(requests, checks.flatten(corrupted), flat)
    assert not checks.timed_outputs_agree(requests, checks.flatten(want[:2]), flat)


def test_given_kv_cache_code_is_generated_from_its_source():
    """The lab ships kv_cache's reference KV1 and KV2 in a locked cell generated from kv_cache's source."""
    source = notebook.read(SOURCE)
    given = notebook.cell(source, "given")
    spec = release.given_from(given)
    assert spec == {"lab": "kv_cache", "cells": ["kv1-solution", "kv2-solution"]}
    assert given.source == release.given_source(spec)
    assert "class ContiguousKVCache" in given.source and "def cached_generate" in given.source
    assert notebook.SOLUTION_BEGIN not in given.source
    released = notebook.read(ROOT / "labs" / LAB / f"{LAB}.ipynb")
    assert notebook.cell(released, "given").source == given.source
    assert given.metadata["nbgrader"]["locked"] and not given.metadata["nbgrader"]["solution"]
    # kv_cache's own release and the shared runtime hold none of it (they reach learners first).
    for path in [ROOT / "labs" / "kv_cache" / "kv_cache.ipynb", *sorted((ROOT / "labs" / "inferlab").glob("*.py")),
                 *sorted((ROOT / "grader").rglob("*.py"))]:
        assert "self.k[layer, :, :, input_pos] = k" not in path.read_text(), path


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB, tmp_path)
    assert set(paths) == set(mistakes.SAMPLES)
    slow = notebook.read(paths["slow"])
    assert "filling = not self.running" in notebook.cell(slow, "c2-solution").source


# ---------------------------------------------------------------- the timing stage, in bubblewrap

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@needs_bwrap
def test_timing_stage_passes_the_reference_and_fails_static_batching(tmp_path):
    from grader.execute import prepare
    from grader.perf_stage import time_submission
    from grader.sandbox import Limits

    source = notebook.read(SOURCE)
    spec = dataclasses.replace(checks.TIMED, rounds=(4, 6))  # fewer rounds than grading: the gap is wide
    built = samples.build(LAB, tmp_path, ["reference", "slow"])
    verdicts = {}
    for name in ("reference", "slow"):
        prepared, _ = prepare(source, notebook.read(built[name]), rng_seed=3)
        verdicts[name] = time_submission(LAB, prepared, source, "bwrap", Limits(threads=1), seed=11, spec=spec)
    ref, slow = verdicts["reference"], verdicts["slow"]
    assert ref.status == PASSED, ref.line()
    assert 0.7 < ref.measured["fraction_of_reference"] < 1.4 and ref.measured["reference_speedup_vs_static"] > 1.2
    assert slow.status == FAILED and "of the reference's" in slow.message, slow.line()
    assert slow.measured["speedup_vs_static"] < slow.measured["threshold"]
