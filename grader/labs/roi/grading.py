"""grader.labs.roi.grading: the checker's side of the roi lab. Never in a sandbox nor a learner's image.

Each hidden check takes the learner's answers (`grader.check_stage.Learner`, a sandboxed process
reached through the probes) and a seed drawn at grading time, computes what is expected here,
and raises `CheckFailed` with what to do next when the answer is wrong. The cost model (the
formulas, the reference table, the conversion of a measurement) lives only in this file.

  ROI1 both formulas on drawn inputs against the formulas here; impossible inputs must raise
       ValueError (the learner's process reports what was raised, as data; this side judges it).
  ROI2 the table for drawn scenarios. One mistake costs points once: a row's dollars per query may
       be the cost model's or what the learner's own cost_per_query gives (asked through a probe);
       every other column is then computed here from the learner's accepted dollars per query.
  ROI3 the conversion on drawn measurements, judged exactly (against the cost model or the learner's
       own ROI1 at the throughputs computed here), then the measurement:
       - the work, counted here: time_batched_decode gets a model served by this process, which
         records the batch rows of every forward call; all of them must be the batch asked for;
       - the seconds: time_batched_decode times a real model built in the learner's process from
         this seed (a served model cannot be timed), while this process times the same batched
         greedy decode on its own copy of that model, interleaved round by round. The learner's
         seconds must be within a calibrated factor of this process's (`max_seconds_factor`), and the
         cost per token they give (computed here) must fall with the batch (`max_cost_ratio`).
       What can be forged: the seconds are a number the learner's process returns, so a forger can
       report anything within the factor of the grader's own time; no more (a timing that batches for the
       served model and not for the real one reports about 3x the grader's time at batch 16, outside the
       factor, besides the batch rows a hook in its process saw). What cannot: the batch
       rows of the served model's calls, and the grader's own time (though a learner's process that
       keeps working between its calls can slow it down on a busy machine: the check stage does not
       read the answers' process's CPU time between calls, as the timing stage does).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...check_stage import LearnerRaised
from ...checks import CheckFailed
from ...perf import threshold
from .. import load
from . import SPEC
from .public import (MACHINE_DOLLARS_PER_HOUR, NEW_TOKENS, PROMPT_TOKENS, TOKENS_PER_MILLION, decode_call,
                     roi1_cases, roi2_inputs, roi3_conversion_inputs, table_rows, verify_batches, verify_conversion,
                     verify_cost_ratio, verify_decode_reply, verify_roi1, verify_table)

LAB = SPEC.name
SECONDS_PER_HOUR = 3_600
DAYS_PER_YEAR = 365


# ------------------------------------------------------------------------------------------------ the cost model

def dollars_per_million_tokens(gpu_dollars_per_hour: float, tokens_per_second: float, utilisation: float) -> float:
    """$ per hour / tokens actually produced per hour (throughput x 3600 x utilisation), per 1M tokens."""
    tokens_per_paid_hour = tokens_per_second * SECONDS_PER_HOUR * utilisation
    return gpu_dollars_per_hour / tokens_per_paid_hour * TOKENS_PER_MILLION


def dollars_per_query(gpu_dollars_per_hour: float, tokens_per_second: float, utilisation: float,
                      tokens_per_query: float) -> float:
    return dollars_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation) \
        * tokens_per_query / TOKENS_PER_MILLION


def table_from_per_query(names: list[str], per_query: list[float], queries_per_day: float,
                         human_dollars_per_query: float, baseline: str) -> list[dict[str, Any]]:
    """The what-if table once each scenario's dollars per query is known."""
    baseline_dollars = per_query[names.index(baseline)]
    rows = []
    for name, dollars in zip(names, per_query):
        per_day = dollars * queries_per_day
        rows.append({"scenario": name, "dollars_per_query": dollars, "dollars_per_day": per_day,
                     "dollars_per_year": per_day * DAYS_PER_YEAR,
                     "saving_vs_human": 1 - dollars / human_dollars_per_query,
                     "saving_vs_baseline": 1 - dollars / baseline_dollars})
    return rows


def reference_table(scenarios: dict[str, dict[str, float]], queries_per_day: float, human_dollars_per_query: float,
                    baseline: str = "unoptimised") -> list[dict[str, Any]]:
    """The what-if table as the cost model gives it: one row per scenario, in the given order."""
    return table_from_per_query(list(scenarios), [dollars_per_query(**p) for p in scenarios.values()],
                                queries_per_day, human_dollars_per_query, baseline)


def batch_tokens_per_second(batch_sizes: list[int], seconds: list[float], new_tokens: int) -> list[float]:
    """A batched generation of `new_tokens` for `b` sequences produces b x new_tokens tokens."""
    return [b * new_tokens / s for b, s in zip(batch_sizes, seconds)]


def reference_costs(inputs: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(tokens per second, dollars per 1M tokens) at each batch size of ROI3's conversion inputs."""
    tps = batch_tokens_per_second(inputs["batch_sizes"], inputs["seconds"], inputs["new_tokens"])
    return tps, [dollars_per_million_tokens(inputs["gpu_dollars_per_hour"], t, inputs["utilisation"]) for t in tps]


def public_expected() -> dict[str, Any]:
    """What `public_expected.json` must hold: the expected values of the self-checks' public inputs."""
    seed = SPEC.public_seed
    cases = roi1_cases(seed)
    table = roi2_inputs(seed)
    tps, costs = reference_costs(roi3_conversion_inputs(seed))
    return {
        "ROI1": {"seed": seed, "per_million": [dollars_per_million_tokens(*c[:3]) for c in cases],
                 "per_query": [dollars_per_query(*c) for c in cases]},
        "ROI2": {"seed": seed, "rows": reference_table(table["scenarios"], table["queries_per_day"],
                                                       table["human_dollars_per_query"], table["baseline"])},
        "ROI3": {"seed": seed, "tokens_per_second": tps, "dollars_per_million_tokens": costs},
    }


# ------------------------------------------------------------------------------------------------ ROI1, ROI2

def hidden_roi1(learner, seed: int) -> dict[str, Any]:
    cases = roi1_cases(seed)
    expected = {"per_million": [dollars_per_million_tokens(*c[:3]) for c in cases],
                "per_query": [dollars_per_query(*c) for c in cases]}
    return verify_roi1(lambda function, calls: learner.call("values", function=function, calls=calls),
                       lambda calls: learner.call("impossible", calls=[[name, args] for name, args in calls]),
                       cases, expected)


def own_roi1(learner, function: str, calls: list[list[float]]) -> list[float] | None:
    """The learner's own ROI1 formula on the checker's inputs, or None when it is not done, breaks or returns
    something that is not a number: then only the cost model counts."""
    try:
        got = learner.call("values", function=function, calls=calls)
    except LearnerRaised:
        return None
    if not isinstance(got, list) or len(got) != len(calls) or not all(isinstance(v, float) for v in got):
        return None
    return got


def hidden_roi2(learner, seed: int) -> dict[str, Any]:
    inputs = roi2_inputs(seed)
    rows = table_rows(learner.call("table", **inputs), inputs)
    names, scenarios = list(inputs["scenarios"]), inputs["scenarios"]
    reference = reference_table(scenarios, inputs["queries_per_day"], inputs["human_dollars_per_query"],
                                inputs["baseline"])
    own = own_roi1(learner, "cost_per_query", [list(p.values()) for p in scenarios.values()])
    followed_own_r1 = False
    for i, (row, ref) in enumerate(zip(rows, reference)):
        if math.isclose(row["dollars_per_query"], ref["dollars_per_query"], rel_tol=1e-6, abs_tol=1e-12):
            continue
        if own is not None and math.isclose(row["dollars_per_query"], own[i], rel_tol=1e-6, abs_tol=1e-12):
            followed_own_r1 = True
            continue
        verify_table(rows, inputs, reference)  # says what differs from the cost model (it does, at row i)
        raise AssertionError("a dollars per query differs from the cost model, but the comparison passed")
    # Every other column follows from the learner's accepted dollars per query, as a careful grader reads a table.
    expected = table_from_per_query(names, [r["dollars_per_query"] for r in rows], inputs["queries_per_day"],
                                    inputs["human_dollars_per_query"], inputs["baseline"])
    measured = verify_table(rows, inputs, expected)
    if followed_own_r1:
        measured["follows_your_cost_per_query"] = True  # correct given ROI1's numbers; ROI1 grades the formula
    return measured


# ------------------------------------------------------------------------------------------------ ROI3

TIMED_BATCH_SIZES = (1, 16)
TIMED_ROUNDS, TIMED_REPEATS = 3, 1


def checker_decode_seconds(model, batch_size: int, prompt_tokens: int, new_tokens: int, repeats: int,
                           seed: int) -> float:
    """The grader's own measurement of what time_batched_decode measures: random prompts [B, P], `new_tokens`
    greedy steps over the whole batch with recompute (no cache), one untimed warm-up, the median of `repeats`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.args.vocab_size, (batch_size, prompt_tokens), generator=generator)  # [B, P]

    def generate() -> torch.Tensor:
        tokens = prompts
        for _ in range(new_tokens):
            logits = model(tokens)[:, -1]  # [B, V]
            tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)  # [B, T + 1]
        return tokens

    with torch.inference_mode():
        generate()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def hidden_roi3_conversion(learner, seed: int) -> dict[str, Any]:
    inputs = roi3_conversion_inputs(seed)
    got = learner.call("batch_costs", **inputs)
    tps, costs = reference_costs(inputs)
    own = own_roi1(learner, "cost_per_million_tokens",
                   [[inputs["gpu_dollars_per_hour"], t, inputs["utilisation"]] for t in tps])
    return verify_conversion(got, inputs, costs, own)


def hidden_roi3_work(learner, seed: int) -> dict[str, Any]:
    """time_batched_decode drives a small model served from here, which counts the batch rows of every call."""
    from ..common import random_args, random_model

    rng = np.random.default_rng([seed, 3])
    batch_size = int(rng.integers(3, 8))  # not 1 or 16: a hard-coded size shows
    spec = learner.serve(random_model(random_args(rng), seed))
    learner.call("time_decode", model=spec, batch_size=batch_size, prompt_tokens=PROMPT_TOKENS,
                 new_tokens=NEW_TOKENS, repeats=TIMED_REPEATS)
    calls = learner.served(spec).calls
    rows = sorted({r for r, _ in calls})
    verify_batches(decode_call(batch_size, TIMED_REPEATS), batch_size, rows, len(calls))
    return {"counted_batch_size": batch_size, "counted_forward_calls": len(calls)}


class InterleavedTiming:
    """time_batched_decode on a real model built in the learner's process from the seed, and the grader's own
    measurement of the same batched decode on its copy here, round by round: the fastest seconds of each side at
    each batch size (other work on the machine only ever adds time, so the fastest is the truest)."""

    def __init__(self, learner, seed: int, batch_sizes: tuple[int, ...] = TIMED_BATCH_SIZES,
                 repeats: int = TIMED_REPEATS):
        from inferlab import ModelArgs

        from ..common import random_model

        args = ModelArgs.from_name("tiny")  # the bundled model's shape, so the calibrated bars apply
        self.handle = learner.call("build_model", args=args.to_dict(), seed=seed)
        if not isinstance(self.handle, int):
            raise CheckFailed("the model for ROI3's measurement could not be built")
        self.model = random_model(args, seed)  # this process's copy: the same weights
        self.learner, self.seed, self.sizes, self.repeats = learner, seed, list(batch_sizes), repeats
        self.theirs: dict[int, float] = {}
        self.ours: dict[int, float] = {}

    def measure(self, rounds: int = TIMED_ROUNDS) -> None:
        for r in range(rounds):
            for b in self.sizes:
                # Who goes first alternates, so a drift of the machine's speed falls on both sides alike.
                for side in ((self._learner_side, self._checker_side) if r % 2 == 0 else
                             (self._checker_side, self._learner_side)):
                    side(b, r)

    def _learner_side(self, b: int, r: int) -> None:
        reply = self.learner.call("time_decode", model=self.handle, batch_size=b, prompt_tokens=PROMPT_TOKENS,
                                  new_tokens=NEW_TOKENS, repeats=self.repeats)
        self.theirs[b] = min(self.theirs.get(b, math.inf), verify_decode_reply(reply, b, self.repeats))

    def _checker_side(self, b: int, r: int) -> None:
        s = checker_decode_seconds(self.model, b, PROMPT_TOKENS, NEW_TOKENS, self.repeats, self.seed + r)
        self.ours[b] = min(self.ours.get(b, math.inf), s)

    def ratios(self) -> list[float]:
        """The learner's seconds over the grader's, at each batch size."""
        return [self.theirs[b] / self.ours[b] for b in self.sizes]


def judge_interleaved(timing: InterleavedTiming, bar: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(what was measured, why it fails or ''): the cost per token from the learner's seconds must fall with the
    batch, and the learner's seconds must be within the calibrated factor of the grader's own."""
    sizes, repeats = timing.sizes, timing.repeats
    seconds = [timing.theirs[b] for b in sizes]
    tps = batch_tokens_per_second(sizes, seconds, NEW_TOKENS)
    costs = [dollars_per_million_tokens(MACHINE_DOLLARS_PER_HOUR, t, 1.0) for t in tps]
    ratios = timing.ratios()
    factor = bar["max_seconds_factor"]
    measured = {"grader_seconds": [float(f"{timing.ours[b]:.6g}") for b in sizes],
                "seconds_ratio_to_grader": [round(r, 3) for r in ratios], "max_seconds_factor": factor,
                "tokens_per_second": [round(t, 1) for t in tps]}
    try:
        measured.update(verify_cost_ratio(sizes, seconds, costs, bar))
    except CheckFailed as err:
        return {**measured, **err.measured}, err.message
    for b, ratio in zip(sizes, ratios):
        if not 1 / factor <= ratio <= factor:
            return measured, (
                f"{decode_call(b, repeats)} says one generation took {timing.theirs[b]:.3g} s; the grader timed the "
                f"same batched greedy decode on the same model, interleaved with yours, at {timing.ours[b]:.3g} s, "
                f"{ratio:.2f}x (a correct measurement is within {factor}x either way): return the median seconds "
                "you measured for one whole generation of all the sequences (all its decode steps, not one), "
                "warm-up excluded")
    return measured, ""


def hidden_roi3_timing(learner, seed: int) -> dict[str, Any]:
    timing = InterleavedTiming(learner, seed)
    bar = threshold(LAB, "ROI3", "cpu")  # the model always runs on the CPU in this lab
    timing.measure()
    measured, why = judge_interleaved(timing, bar)
    if why and "a batch does at least the work of one sequence" not in why:
        # A burst of other work on the machine can slow one side or one size more than the other: measure again,
        # keeping the fastest time of every batch size, on both sides, over both attempts.
        timing.measure()
        measured, why = judge_interleaved(timing, bar)
    if why:
        raise CheckFailed(why, **measured)
    return measured


def hidden_roi3(learner, seed: int) -> dict[str, Any]:
    import torch

    converted = hidden_roi3_conversion(learner, seed)
    # One torch thread here from the first tensor of ROI3 on, as in the learner's process: a pool of threads that
    # the served model's forward passes woke would otherwise spin beside this process's own timing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = {**hidden_roi3_work(learner, seed), **hidden_roi3_timing(learner, seed)}
    finally:
        torch.set_num_threads(threads)
    if converted.get("follows_your_cost_per_million_tokens"):
        measured["follows_your_cost_per_million_tokens"] = True  # correct given ROI1's formula; ROI1 grades that
    return measured


HIDDEN_CHECKS = {"ROI1": hidden_roi1, "ROI2": hidden_roi2, "ROI3": hidden_roi3}


# ------------------------------------------------------------------------------------------------ calibration

def _reference_learner(backend: str, private: Path):
    """The reference answers in a sandboxed answers' process, as the check stage runs a learner's."""
    from ... import notebook
    from ...catalogue import REPO_ROOT
    from ...check_stage import Learner
    from ...sandbox import Limits

    learner = Learner(LAB, backend, Limits(threads=1), private, time.monotonic() + 1800)
    source = notebook.read(REPO_ROOT / "solutions" / LAB / f"{LAB}.ipynb")
    for gid, cell in notebook.answer_cells(source, SPEC.reference_cells):
        raised = learner.exec(cell, gid, trusted=gid in SPEC.defining_cells)
        if raised:
            learner.close()
            raise RuntimeError(f"the reference's cell {gid!r} failed in the answers' process: {raised}")
    return learner


def calibrate(trials: int = 15, rounds: int = TIMED_ROUNDS, backend: str | None = None) -> dict[str, Any]:
    """ROI3's two bars, from `trials` measurements made as the hidden check makes them, alternating with
    `trials` of a correct but unbatched answer (sequences one at a time) timed here.

    The reference runs in a sandboxed answers' process (`backend`: bubblewrap where it is installed), and
    each of its trials is the check's interleaved timing: batch 1 and 16, fastest of `rounds` rounds, one torch
    thread, the reference's call and the grader's own measurement of the same decode one after the other.

    `max_cost_ratio` (cost per token at batch 16 / batch 1, from the reference's seconds): the geometric mean
    of the reference's *worst* trial and the unbatched answer's median (at least 1: one sequence at a time
    cannot make a token cheaper). The worst trial, because the bar must hold for every correct submission of a
    class graded on a busy machine; the geometric mean, so both sides keep the same multiplicative margin.

    `max_seconds_factor` (the learner's seconds / the grader's, either way): the geometric mean of the
    reference's worst deviation from the grader's own measurement and the deviation of the likeliest wrong
    number that the other checks let through, the seconds of one decode step (the generation's / new_tokens:
    the batches, the forward passes and the cost ratio are all as they should be).

    Run it in a session of its own (`setsid inferlab calibrate roi ...`), as `grader.grade_one` runs: Linux
    shares the CPU between sessions before processes (autogroups), so a calibration that shares its session with
    other work sees the grader's side slower than grading does (the sandboxed side has a session of its own).
    """
    import shutil
    import tempfile

    import torch

    from inferlab import ModelArgs

    from ..common import random_model

    backend = backend or ("bwrap" if shutil.which("bwrap") else "none")
    timer = load(LAB).reference_namespace()["time_batched_decode"]
    unbatched_model = random_model(ModelArgs.from_name("tiny"), 0)
    sizes = list(TIMED_BATCH_SIZES)

    def one_at_a_time(b: int) -> float:  # a correct answer that does not batch: b sequences, one after another
        return b * timer(unbatched_model, 1, PROMPT_TOKENS, NEW_TOKENS, TIMED_REPEATS)

    def cost_ratio(seconds: list[float]) -> float:
        tps = batch_tokens_per_second(sizes, seconds, NEW_TOKENS)
        return tps[0] / tps[1]  # cost ratio = inverse throughput ratio

    cost_ratios: dict[str, list[float]] = {"reference": [], "unbatched": []}
    deviations: dict[str, list[float]] = {"reference": [], "per_step": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the check measures
    with tempfile.TemporaryDirectory(prefix="inferlab-calibrate-") as tmp:
        learner = _reference_learner(backend, Path(tmp) / "answers")
        try:
            for trial in range(trials):
                timing = InterleavedTiming(learner, trial)
                timing.measure(rounds)
                cost_ratios["reference"].append(cost_ratio([timing.theirs[b] for b in sizes]))
                ratios = timing.ratios()
                deviations["reference"].append(max(max(r, 1 / r) for r in ratios))
                # Seconds per decode step (the reference's / NEW_TOKENS) deviate by NEW_TOKENS / ratio: the size
                # where they deviate least is the one that decides whether the band catches them.
                deviations["per_step"].append(min(NEW_TOKENS / r for r in ratios))
                fastest = [min(one_at_a_time(b) for _ in range(rounds)) for b in sizes]
                cost_ratios["unbatched"].append(cost_ratio(fastest))
        finally:
            learner.close()
            torch.set_num_threads(threads)
    worst, typical = max(cost_ratios["reference"]), float(np.median(cost_ratios["reference"]))
    unbatched = float(np.median(cost_ratios["unbatched"]))
    bar = round(float(np.sqrt(worst * max(unbatched, 1.0))), 2)
    worst_dev, typical_dev = max(deviations["reference"]), float(np.median(deviations["reference"]))
    per_step_dev = float(np.median(deviations["per_step"]))
    factor = round(float(np.sqrt(worst_dev * per_step_dev)), 1)
    return {"ROI3": {
        "max_cost_ratio": bar,
        "max_seconds_factor": factor,
        "calibration": {
            "reference_cost_ratio": round(typical, 3), "reference_worst_cost_ratio": round(worst, 3),
            "unbatched_cost_ratio": round(unbatched, 3), "batch_sizes": sizes, "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS, "trials": trials, "rounds_per_trial": rounds, "torch_threads": 1,
            "reference_seconds_deviation": round(typical_dev, 3),
            "reference_worst_seconds_deviation": round(worst_dev, 3),
            "per_step_seconds_deviation": round(per_step_dev, 3),
            "note": (f"cost per token at batch 16 / batch 1, fastest of {rounds} alternating calls per size, "
                     f"{trials} trials: reference median {typical:.2f}, worst {worst:.2f}; one sequence at a time "
                     f"median {unbatched:.2f}; bar = geometric mean of the reference's worst and "
                     f"max(unbatched, 1) = {bar}"),
            "seconds_factor_note": (
                f"the reference's seconds (in a {backend} answers' process) over the grader's own measurement of the "
                f"same decode, interleaved, either way: median {typical_dev:.2f}x, worst {worst_dev:.2f}x; seconds "
                f"per decode step (/ {NEW_TOKENS}) {per_step_dev:.2f}x; factor = geometric mean of the reference's "
                f"worst and the per-step seconds' = {factor}"),
        }}}
