"""The out-of-process timing stage: the reference passes, code that only looks fast or only is fast
while untested fails, and a misbehaving timed process fails its own submission with a reason.

Each test starts two real sandboxed worker processes (bubblewrap), as the autograder does. The
verdict rule itself (inconclusive, the time cap, CPU between calls) is in tests/test_timing_verdicts.py.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest

from grader import notebook, samples
from grader.checks import FAILED, PASSED
from grader.execute import prepare
from grader.labs import kv_cache
from grader.perf_stage import cells_for, claim_cores, result_line, time_submission
from grader.sandbox import Limits

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

LAB = "kv_cache"
LIMITS = Limits(threads=1)


@pytest.fixture(scope="module")
def source():
    return notebook.read(samples.REPO_ROOT / "solutions" / LAB / f"{LAB}.ipynb")


ANSWER = kv_cache.SPEC.timed.cells[-1]  # the answer cell that defines cached_generate


def submission(source, k2_extra: str = "", added_cell: str | None = None):
    """A solved notebook whose generation answer cell ends with `k2_extra`, optionally with a learner-added
    cell after it."""
    nb = copy.deepcopy(samples.solved(LAB))
    cell = notebook.cell(nb, ANSWER)
    cell.source += "\n" + k2_extra
    if added_cell is not None:
        import nbformat

        nb.cells.insert(nb.cells.index(cell) + 1, nbformat.v4.new_code_cell(added_cell))
    prepared = prepare(source, nb)
    return prepared


def test_cells_for_takes_answer_cells_and_what_the_learner_added_after_them(source):
    prepared = submission(source, added_cell="HELPER = 1")
    cells = cells_for(prepared, kv_cache.SPEC.timed.cells)
    assert cells[0].startswith("import time") and "HELPER = 1" in cells[-1]
    assert not any("self_check(" in c or "GRADING_SEED" in c for c in cells)


def test_reference_passes_with_both_speedups_measured_in_the_run(source):
    result = time_submission(LAB, submission(source), source, "bwrap", LIMITS, seed=11)
    assert result.status == PASSED, result_line(result)
    m = result.measured
    assert m["speedup_vs_naive"] > m["threshold"] and 0.6 < m["fraction_of_reference"] < 1.6
    assert m["rounds"] >= kv_cache.SPEC.timed.rounds[0] and m["decided"] in ("clear", "stable")
    assert m["cpu_between_calls_s"] <= 0.1 and m["cores"] == 1  # pinned to one core of its own
    # Honest code is idle between timed calls, on both sides (test_timing_verdicts fails a thread left spinning).
    assert m["reference_cpu_between_calls_s"] <= 0.1


def test_the_timed_processes_are_pinned_to_the_stages_core(source, tmp_path, monkeypatch):
    """Every thread of both timing workers runs on the core the stage claimed, and nowhere else."""
    import os

    import grader.perf_stage as stage

    seen = []
    real_run = stage.Worker.run

    def run(self, name, prompt):
        from grader.perf_stage import process_tree

        seen.append({os.sched_getaffinity(int(tid)) == self.cores for pid in process_tree(self.proc.pid)
                     for tid in os.listdir(f"/proc/{pid}/task")})
        return real_run(self, name, prompt)

    monkeypatch.setattr(stage.Worker, "run", run)
    with claim_cores(1, lock_dir=stage.CORE_LOCKS) as (held, _):  # another stage holds a core meanwhile
        result = time_submission(LAB, submission(source), source, "bwrap", LIMITS, seed=11)
    assert result.status == PASSED, result_line(result)
    assert seen and all(s == {True} for s in seen)
    if len(os.sched_getaffinity(0)) > 1:
        assert not result.measured.get("shared_core")  # it took another core than the one held


def test_code_that_cuts_corners_only_while_timed_fails(source):
    # Right whenever the notebook tests it, but returns a cheap answer in the timing process.
    cheat = '''
import sys as _sys
_honest = cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    if "perf_worker" in " ".join(_sys.argv):
        return [0] * max_new_tokens
    return _honest(model, prompt, max_new_tokens, **kw)
'''
    result = time_submission(LAB, submission(source, cheat), source, "bwrap", LIMITS, seed=11)
    assert result.status == FAILED and "differ from the baseline's" in result.message, result_line(result)


def test_results_cached_by_input_gain_nothing(source):
    # A memo keyed on the prompt: every timed round feeds a new prompt, so it never hits.
    memo = '''
_memo, _plain = {}, cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    key = (tuple(prompt), max_new_tokens, tuple(sorted(kw.items())))
    if key not in _memo:
        _memo[key] = _plain(model, prompt, max_new_tokens, **kw)
    return list(_memo[key])
'''
    result = time_submission(LAB, submission(source, memo), source, "bwrap", LIMITS, seed=11)
    assert result.status == PASSED  # honest and still correct: it passes on its real speed
    assert 0.6 < result.measured["fraction_of_reference"] < 1.6, result_line(result)  # no 'infinite' speedup


def test_timed_process_that_exits_fails_with_a_reason(source):
    quits = '''
import os as _os, sys as _sys
if "perf_worker" in " ".join(_sys.argv):
    _os._exit(3)
'''
    result = time_submission(LAB, submission(source, quits), source, "bwrap", LIMITS, seed=11)
    assert result.status == FAILED and "could not be run again for timing" in result.message
    assert "exited" in result.message, result_line(result)


def test_timed_code_that_hangs_hits_the_stage_deadline(source):
    hangs = '''
import sys as _sys, time as _t
_plain = cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    if "perf_worker" in " ".join(_sys.argv):
        _t.sleep(3600)
    return _plain(model, prompt, max_new_tokens, **kw)
'''
    spec = dataclasses.replace(kv_cache.SPEC.timed, max_seconds=30)
    result = time_submission(LAB, submission(source, hangs), source, "bwrap", LIMITS, seed=11, spec=spec)
    # The learner's own call took what was left of the time, far over 10x the baseline's: a fail, not inconclusive.
    assert result.status == FAILED and "did not finish within 30 s" in result.message, result_line(result)
    assert "x the baseline's" in result.message and result.seconds < 40
