"""Timing verdicts: right, or saying that they do not know.

The verdict rule of the timing stage (`grader.perf_stage.decide`), on made-up rounds: a clear verdict
only when the learner's fraction of the reference's speedup is stable (95% interval within +-rel_ci)
or its whole interval lies on one side of the bar; otherwise, or when the time cap ran out,
inconclusive, except that a learner's own slow calls, or CPU used between its calls, fail. Then
the measuring parts, on real processes: CPU time read from /proc, cores claimed with lock files,
`compare`'s early stop. One integration test runs the real stage (bubblewrap) on the kv_cache
reference, with and without a thread left spinning.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from grader.checks import FAILED, INCONCLUSIVE, PASSED, CheckFailed
from grader.perf_stage import (IDLE_CPU_ALLOWANCE_S, SLOW_FACTOR, CpuMeter, Observed, claim_cores, decide,
                               final_verdict, is_decided, tree_cpu_s)
from inferlab.bench import Comparison, compare, relative_speedup

BAR = 0.76
REL_CI = 0.1


def rounds(fractions: list[float], baseline_s: float = 1.0, reference_speedup: float = 2.0) -> dict[str, list[float]]:
    """Times of a run whose learner reached `fractions[i]` of the reference's speedup in round i."""
    reference = [baseline_s / reference_speedup] * len(fractions)
    return {"baseline": [baseline_s] * len(fractions), "reference": reference,
            "candidate": [r / f for r, f in zip(reference, fractions)]}


def honest(**kw) -> Observed:
    """What an honest learner's process shows: no CPU between calls, at most its wall time during them."""
    return Observed(idle_s=30.0, idle_cpu_s=0.01, busy_s=10.0, busy_cpu_s=9.5, **kw)


def judge(result: Comparison, tampered: list[str]) -> dict:
    """A lab's `judge_timing`, as kv_cache and continuous_batching word it."""
    fraction = result.speedup("candidate") / result.speedup("reference")
    measured = {"fraction_of_reference": round(fraction, 2), "rounds": result.rounds}
    if tampered:
        raise CheckFailed(f"your code replaced timing functions ({', '.join(tampered)})", **measured)
    if fraction < BAR:
        raise CheckFailed(f"{fraction:.0%} of the reference; the bar is {BAR:.0%}", **measured)
    return measured


def verdict(times: dict[str, list[float]], seen: Observed | None = None, tampered: list[str] | None = None):
    result = compare({k: (lambda: None) for k in times}, "baseline", warmup=0, min_rounds=1, max_rounds=1)
    result.times = times  # the made-up rounds, as if timed
    result.ratios = {k: {"median": float(np.median(np.asarray(times["baseline"]) / np.asarray(t)))}
                     for k, t in times.items() if k != "baseline"}
    return final_verdict(judge, result, tampered or [], seen or honest(), BAR, REL_CI)


# ---------------------------------------------------------------- the rule, on made-up rounds

def test_stable_and_above_the_bar_passes():
    # A tight interval around 0.775 that reaches under the bar of 0.76: stable, so the point decides.
    status, message, measured = verdict(rounds([0.74, 0.79, 0.76, 0.82, 0.78, 0.75, 0.80, 0.77]))
    assert measured["decided"] == "stable" and measured["fraction_ci95"][0] < BAR
    assert status == PASSED, (message, measured)


def test_stable_and_below_the_bar_fails():
    # A tight interval around 0.75 that still reaches over the bar of 0.76: stable, so the point decides.
    status, message, measured = verdict(rounds([0.72, 0.74, 0.76, 0.78, 0.75, 0.73, 0.77, 0.74, 0.79]))
    assert measured["decided"] == "stable" and measured["fraction_ci95"][1] >= BAR
    assert status == FAILED and "the bar is 76%" in message


def test_unstable_but_clearly_above_the_bar_passes():
    fractions = [1.4, 0.9, 1.2, 0.85, 1.1]  # +-25%: far from stable, but every round is above 0.76
    assert relative_speedup(rounds(fractions), "baseline", "candidate", "reference")["ci_low"] > BAR
    status, _, measured = verdict(rounds(fractions))
    assert status == PASSED and measured["decided"] == "clear"


def test_unstable_but_clearly_below_the_bar_fails():
    status, message, measured = verdict(rounds([0.3, 0.55, 0.4, 0.62, 0.35]))
    assert status == FAILED and measured["decided"] == "clear" and "the bar is 76%" in message


def test_unstable_and_straddling_the_bar_is_inconclusive_with_the_numbers():
    # What CB4 (then C4) once passed with: an interval of about [0.5, 1.3] around a bar of 0.76.
    status, message, measured = verdict(rounds([0.5, 1.3, 0.7, 1.1, 0.6, 0.9]))
    assert status == INCONCLUSIVE, (message, measured)
    assert "too noisy to tell" in message and "against a bar of 76%" in message and "--retry-inconclusive" in message
    low, high = measured["fraction_ci95"]
    assert low < BAR < high and measured["rounds"] == 6 and measured["min_fraction_of_reference"] == BAR


def test_replaced_clocks_fail_even_when_the_timing_is_inconclusive():
    status, message, _ = verdict(rounds([0.5, 1.3, 0.7, 1.1, 0.6, 0.9]), tampered=["time.perf_counter"])
    assert status == FAILED and "replaced timing functions" in message


def test_the_time_cap_is_inconclusive_when_the_machine_was_slow():
    seen = honest(calls={"baseline": [2.0, 2.1, 2.2], "reference": [1.0, 1.1, 1.0], "candidate": [1.1, 1.0]},
                  ready_s={"reference": 20.0, "submission": 21.0}, started=0.0)
    seen.in_flight = ("baseline", 140.0)
    status, message, measured = decide(None, seen, BAR, REL_CI, capped=True, max_seconds=150, now=150.0)
    assert status == INCONCLUSIVE and "did not finish within 150 s" in message and "--retry-inconclusive" in message


def test_the_time_cap_fails_when_the_learners_calls_took_it():
    seen = honest(calls={"baseline": [0.3], "reference": [0.05], "candidate": []},
                  ready_s={"reference": 8.0, "submission": 9.0}, started=0.0)
    seen.in_flight = ("candidate", 10.0)  # its warm-up call never returned
    status, message, _ = decide(None, seen, BAR, REL_CI, capped=True, max_seconds=150, now=150.0)
    assert status == FAILED and "did not finish within 150 s" in message
    assert f"{140 / 0.3:.0f}x the baseline's 0.30 s" in message


def test_the_time_cap_fails_when_the_learners_cells_take_it_to_start():
    seen = honest(ready_s={"reference": 9.0}, started=0.0)
    status, message, _ = decide(None, seen, BAR, REL_CI, capped=True, max_seconds=150, now=150.0)
    assert status == FAILED and "answer cells took over 150 s" in message
    seen = honest(ready_s={}, started=0.0)  # even the grader's own process was not ready: the machine
    assert decide(None, seen, BAR, REL_CI, capped=True, max_seconds=150, now=150.0)[0] == INCONCLUSIVE


def test_a_slow_call_under_the_factor_is_not_blamed_on_the_learner():
    seen = honest(calls={"baseline": [1.0, 1.2], "reference": [0.5, 0.6], "candidate": [0.9]},
                  ready_s={"reference": 8.0, "submission": 9.0}, started=0.0)
    seen.in_flight = ("candidate", 150.0 - 0.9 * SLOW_FACTOR)  # just under 10x the baseline's median of 1.1 s
    assert decide(None, seen, BAR, REL_CI, capped=True, max_seconds=150, now=150.0)[0] == INCONCLUSIVE


def test_cpu_used_between_calls_fails_whatever_the_speed():
    seen = Observed(idle_s=30.0, idle_cpu_s=12.0, busy_s=10.0, busy_cpu_s=9.9)
    status, message, measured = verdict(rounds([1.0, 1.01, 0.99, 1.0, 1.0]), seen)
    assert status == FAILED and measured["cpu_between_calls_s"] == 12.0
    assert "your process kept working between timed calls (12.0 s of CPU while idle" in message
    assert "stop any threads you start before returning" in message.lower()


def test_cpu_beyond_the_cores_during_calls_fails():
    seen = Observed(idle_s=30.0, idle_cpu_s=0.0, busy_s=10.0, busy_cpu_s=25.0, cores=1)
    status, message, _ = verdict(rounds([1.0, 1.01, 0.99, 1.0, 1.0]), seen)
    assert status == FAILED and "more than 1 core(s) can give" in message


def test_housekeeping_within_the_allowance_passes():
    seen = Observed(idle_s=30.0, idle_cpu_s=IDLE_CPU_ALLOWANCE_S, busy_s=10.0, busy_cpu_s=10.0)
    assert verdict(rounds([1.0, 1.01, 0.99, 1.0, 1.0]), seen)[0] == PASSED


def test_is_decided_needs_the_point_on_the_same_side():
    assert is_decided({"median": 0.9, "ci_low": 0.8, "ci_high": 1.2}, BAR, REL_CI) == "clear"
    assert is_decided({"median": 0.5, "ci_low": 0.4, "ci_high": 0.7}, BAR, REL_CI) == "clear"
    assert is_decided({"median": 0.77, "ci_low": 0.73, "ci_high": 0.8}, BAR, REL_CI) == "stable"
    assert is_decided({"median": 0.8, "ci_low": 0.5, "ci_high": 1.2}, BAR, REL_CI) == ""


def test_relative_speedup_pairs_the_rounds():
    # A machine that slows every contender alike in some rounds: the fraction does not move at all.
    times = {"baseline": [1.0, 3.0, 1.0, 2.0, 1.0], "reference": [0.5, 1.5, 0.5, 1.0, 0.5],
             "candidate": [0.625, 1.875, 0.625, 1.25, 0.625]}
    fraction = relative_speedup(times, "baseline", "candidate", "reference")
    assert fraction["median"] == pytest.approx(0.8) and fraction["ci_high"] - fraction["ci_low"] < 1e-9


def test_compare_stops_once_done_and_times_with_the_given_timer():
    seen = []

    def done(times):
        seen.append(len(times["a"]))
        return len(times["a"]) >= 6

    result = compare({"a": lambda: 0.5, "b": lambda: 0.25}, "a", warmup=0, min_rounds=5, max_rounds=30,
                     done=done, timer=lambda call: call())
    assert result.rounds == 6 and seen == [5, 6] and result.speedup("b") == 2.0


def test_compare_starts_no_round_that_would_end_past_max_seconds():
    result = compare({"a": lambda: time.sleep(0.05), "b": lambda: time.sleep(0.05)}, "a", warmup=0, min_rounds=2,
                     max_rounds=100, max_seconds=0.25, done=lambda times: False)
    assert 2 <= result.rounds <= 3  # rounds of ~0.1 s: the third would end at 0.3 s


# ---------------------------------------------------------------- measuring: /proc and core locks, on real processes

BUSY_THREAD = ("import threading, sys\n"
               "threading.Thread(target=lambda: [sum(range(10**6)) for _ in iter(int, 1)], daemon=True).start()\n"
               "sys.stdin.readline()\n")


@pytest.mark.parametrize("busy", [False, True])
def test_cpu_of_a_process_tree_is_read_from_outside(busy):
    code = BUSY_THREAD if busy else "import sys; sys.stdin.readline()"
    # The work happens in a grandchild: the meter follows the whole tree.
    proc = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "$0"', code], stdin=subprocess.PIPE)
    try:
        time.sleep(0.5)  # interpreter start-up is not idle time
        meter = CpuMeter(proc.pid)
        meter.ready()
        time.sleep(1.5)
        meter.finish()
        if busy:
            assert meter.idle_cpu_s > 0.8, meter
        else:
            assert meter.idle_cpu_s < 0.05, meter
        assert tree_cpu_s(proc.pid) >= meter.idle_cpu_s
    finally:
        proc.kill()
        proc.wait()


def test_parallel_stages_claim_different_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    with claim_cores(1, lock_dir=tmp_path) as (first, shared_first):
        with claim_cores(2, lock_dir=tmp_path) as (second, shared_second):
            assert first == {3} and second == {2, 1} and not shared_first and not shared_second


def test_one_core_is_shared_after_the_wait(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    with claim_cores(1, lock_dir=tmp_path) as (first, _):
        start = time.monotonic()
        with claim_cores(1, wait_s=0.6, lock_dir=tmp_path) as (second, shared):
            waited = time.monotonic() - start
    assert first == second == {0} and shared and 0.5 < waited < 3


# ---------------------------------------------------------------- the real stage, in bubblewrap

@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_thread_left_running_fails():
    """The reference's own run, idle between calls on both sides, is test_perf_stage's
    test_reference_passes_with_both_speedups_measured_in_the_run; here the same answer with a thread left spinning."""
    from grader import notebook, samples
    from grader.execute import prepare
    from grader.labs import kv_cache
    from grader.perf_stage import result_line, time_submission
    from grader.sandbox import Limits

    source = notebook.read(samples.REPO_ROOT / "solutions" / "kv_cache" / "kv_cache.ipynb")

    def timed(extra: str):
        nb = copy.deepcopy(samples.solved("kv_cache"))
        notebook.cell(nb, kv_cache.SPEC.timed.cells[-1]).source += "\n" + extra
        prepared = prepare(source, nb)
        return time_submission("kv_cache", prepared, source, "bwrap", Limits(threads=1), seed=11)

    spinning = timed("import threading\n"
                     "threading.Thread(target=lambda: [sum(range(10**6)) for _ in iter(int, 1)], daemon=True).start()")
    assert spinning.status == FAILED, result_line(spinning)
    assert "your process kept working between timed calls" in spinning.message
    assert "stop any threads you start before returning" in spinning.message.lower()
    print(f"\nspinning: {spinning.measured['cpu_between_calls_s']} s of CPU in "
          f"{spinning.measured['idle_between_calls_s']} s idle between calls")


def test_a_self_check_that_cannot_tell_says_so_and_never_passes(capsys):
    """A self-check whose interval straddles its bar prints INCONCLUSIVE (rerun), neither passed nor FAILED."""
    from grader.checks import INCONCLUSIVE, TooNoisy, self_check

    def straddling():
        raise TooNoisy("too noisy to tell: the 95% interval [2.61, 3.40] straddles the bar of 2.9x; close other "
                       "programs and run this cell again", speedup_vs_naive=2.95)

    result = self_check("KV4", straddling)
    assert result.status == INCONCLUSIVE and not result.passed
    assert capsys.readouterr().out.startswith("[KV4] INCONCLUSIVE: too noisy to tell")
