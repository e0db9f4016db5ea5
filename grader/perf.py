"""grader.perf: performance checks as ratios measured in one run, against thresholds kept as data.

A perf check never compares a time with a number typed in advance: it times the
learner's code and the grader's own baseline *interleaved in the same run* (see
`inferlab.bench.compare`) and compares the *ratio* with a threshold. Thresholds live in
`grader/thresholds/<lab>.json`, per hardware profile (`cpu`, `cuda`, or a named GPU such as
`h100`), each with the measurements and the note of how it was calibrated.
`inferlab calibrate LAB` measures the reference and the baseline on the current machine
and writes a proposed profile for an instructor to review and commit.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

from pathlib import Path
from typing import Any

import inferlab.bench
from inferlab.bench import Comparison, compare

# The clocks as they were when the grader was imported, before any learner code ran.
_ORIGINAL_CLOCKS = {"time.perf_counter": time.perf_counter, "time.perf_counter_ns": time.perf_counter_ns,
                    "time.monotonic": time.monotonic, "time.time": time.time, "time.process_time": time.process_time,
                    "inferlab.bench._perf_counter": inferlab.bench._perf_counter,
                    "inferlab.bench.time_once": inferlab.bench.time_once}


def _current_clocks() -> dict[str, object]:
    return {"time.perf_counter": time.perf_counter, "time.perf_counter_ns": time.perf_counter_ns,
            "time.monotonic": time.monotonic, "time.time": time.time, "time.process_time": time.process_time,
            "inferlab.bench._perf_counter": inferlab.bench._perf_counter,
            "inferlab.bench.time_once": inferlab.bench.time_once}


def tampered_clocks() -> list[str]:
    """Names of timing functions that no longer are the ones the grader started with."""
    now = _current_clocks()
    return [name for name, fn in _ORIGINAL_CLOCKS.items() if now[name] is not fn]

THRESHOLDS_DIR = Path(__file__).resolve().parent / "thresholds"


def hardware_profile(available: list[str] | None = None) -> str:
    """The most specific profile this machine matches: a GPU's short name ('h100'), 'cuda', or 'cpu'."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    match = re.search(r"\b([a-z]\d{2,4}|rtx ?\d{4}|l4|l40s?)\b", name)
    short = match.group(1).replace(" ", "") if match else None
    if short and (available is None or short in available):
        return short
    return "cuda"


def load_thresholds(lab: str, directory: Path = THRESHOLDS_DIR) -> dict[str, Any]:
    path = directory / f"{lab}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no thresholds for lab {lab!r}: expected {path}; run `inferlab calibrate {lab}`")
    return json.loads(path.read_text())


def threshold(lab: str, task: str, profile: str | None = None, directory: Path = THRESHOLDS_DIR) -> dict[str, Any]:
    """The threshold entry of one task for this machine's profile (falling back to 'cuda', then 'cpu')."""
    data = load_thresholds(lab, directory)
    profiles = data["profiles"]
    profile = profile or hardware_profile(list(profiles))
    for candidate in (profile, "cuda" if profile != "cpu" else "cpu", "cpu"):
        if candidate in profiles and task in profiles[candidate]:
            return {"profile": candidate, **profiles[candidate][task]}
    raise KeyError(f"thresholds for {lab} have no entry for task {task} in profile {profile!r} or 'cpu'")


def speedup_over_baseline(candidate: Callable[[], object], baseline: Callable[[], object], *,
                          rounds: tuple[int, int] = (5, 15), warmup: int = 1, rel_ci: float = 0.1,
                          max_seconds: float = 60.0, device: str | None = None) -> Comparison:
    """Interleaved timing of the learner's code against the grader's baseline; speedup = baseline / candidate.

    Raises `ClockTampered` if any timing function was replaced before or during the run.
    """
    before = tampered_clocks()
    if before:
        raise ClockTampered(before)
    result = compare({"baseline": baseline, "candidate": candidate}, baseline="baseline", warmup=warmup,
                   min_rounds=rounds[0], max_rounds=rounds[1], rel_ci=rel_ci, max_seconds=max_seconds,
                   device=device)
    after = tampered_clocks()
    if after:
        raise ClockTampered(after)
    return result


def fraction_of_reference_verdict(result: Comparison, tampered: list[str], bar: dict[str, Any], baseline: str,
                                  too_slow: Callable[[float, float, float], str]) -> dict[str, Any]:
    """A timed task's verdict from one interleaved run: the learner's speedup over `baseline` as a fraction of the
    reference's in the same run, against `bar["min_fraction_of_reference"]`. Every lab words its own advice:
    `too_slow(speedup, reference_speedup, fraction)` says what to do when the bar is missed."""
    from .checks import CheckFailed

    speedup, reference = result.speedup("candidate"), result.speedup("reference")
    fraction = speedup / reference
    measured = {f"speedup_vs_{baseline}": round(speedup, 2),
                "ci95": [round(result.ratios["candidate"]["ci_low"], 2), round(result.ratios["candidate"]["ci_high"], 2)],
                # in speedup units for this run, so reports can plot it next to the speedup
                "threshold": round(bar["min_fraction_of_reference"] * reference, 2),
                f"reference_speedup_vs_{baseline}": round(reference, 2), "fraction_of_reference": round(fraction, 2),
                "min_fraction_of_reference": bar["min_fraction_of_reference"], "profile": bar["profile"],
                "rounds": result.rounds, "stable": result.stable}
    if tampered:
        raise CheckFailed(f"your code replaced timing functions ({', '.join(tampered)}); the grader's own clock "
                          "was not affected, but such code is flagged for your instructor: remove it",
                          tampering=", ".join(tampered), **measured)
    if fraction < bar["min_fraction_of_reference"]:
        raise CheckFailed(too_slow(speedup, reference, fraction), **measured)
    return measured


class ClockTampered(RuntimeError):
    """Timing functions were replaced: a performance number measured now would be meaningless."""

    def __init__(self, names: list[str]):
        super().__init__(f"timing functions were replaced: {', '.join(names)}")
        self.names = names


def self_check_speed(speedup: float, ci95: tuple[float, float], bar: float, measured: dict[str, Any],
                     too_slow: str) -> dict[str, Any]:
    """A notebook's verdict on a speedup it measured itself: passed at or above `bar`; inconclusive (`TooNoisy`:
    rerun) when the 95% interval straddles the bar; failed, with `too_slow`, below it."""
    from .checks import CheckFailed, TooNoisy

    low, high = ci95
    if low < bar <= high:
        raise TooNoisy(f"too noisy to tell: the 95% interval [{low:.2f}, {high:.2f}] straddles the bar of {bar}x; "
                       "close other programs and run this cell again", **measured)
    if speedup < bar:
        raise CheckFailed(too_slow, **measured)
    return measured


def bar_between(reference: float, slow: float, digits: int = 2) -> tuple[float, float]:
    """The calibration rule of every timed task: (bar, fraction of the reference).

    The bar is the geometric mean of the reference's speedup and the slow answer's, the slow one counted as at
    least 1x (an answer no faster than the baseline must fail, however much slower the slow one is), so a noisy
    run has the same multiplicative margin on both sides. The graded bar is that mean as a fraction of the
    reference; a notebook's self-check uses the mean itself."""
    import math

    bar = round(math.sqrt(reference * max(slow, 1.0)), digits)
    return bar, round(bar / reference, 2)
