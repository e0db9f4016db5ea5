"""grader.labs.roi.public: the roi lab's checks (book appendix C), tasks ROI1 to ROI3, as a notebook sees them.

The notebook imports this module as `checks`. Each `check_roiN` runs the learner's code here, on
the public seed, and compares with expected values stored in `public_expected.json` (written by
`inferlab release` from the grading side). This module holds no cost formula: the formulas, the
reference table and the conversion live only in `grading.py`, which a learner's image does not ship.

The autograder runs the same `verify_*` judgements in its own process (`grading.py`,
`grader.check_stage`), on inputs drawn at grading time, against the learner's code in a
sandboxed process (`probes.py`), with expected values it computes itself.

The learner's surface, fixed by the notebook:
  ROI1 `cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation) -> float` and
       `cost_per_query(gpu_dollars_per_hour, tokens_per_second, utilisation, tokens_per_query) -> float`,
       both raising ValueError on impossible inputs.
  ROI2 `what_if_table(scenarios, queries_per_day, human_dollars_per_query, baseline="unoptimised")
       -> list[dict]`, one row per scenario with the columns of `TABLE_COLUMNS`.
  ROI3 `time_batched_decode(model, batch_size, prompt_tokens, new_tokens, repeats=3) -> float` seconds, and
       `cost_by_batch_size(batch_sizes, seconds, new_tokens, gpu_dollars_per_hour, utilisation) -> list[float]`.

No torch at load time: ROI1 and ROI2 are plain arithmetic, so torch loads only when ROI3 measures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...checks import CheckFailed

LAB = "roi"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")

# Units the messages name (the notebook defines the same constants for the learner).
SECONDS_PER_HOUR = 3_600
TOKENS_PER_MILLION = 1_000_000
DAYS_PER_YEAR = 365
TABLE_COLUMNS = ("scenario", "dollars_per_query", "dollars_per_day", "dollars_per_year",
                 "saving_vs_human", "saving_vs_baseline")

# ROI3 measures a model of the bundled tiny model's shape on the CPU: short prompts and few new tokens keep
# the whole measurement around a second, which matters when a class of 200 is graded.
PROMPT_TOKENS, NEW_TOKENS = 8, 4
# The price ROI3 puts on the learner's machine: roughly what a small cloud CPU VM rents for.
MACHINE_DOLLARS_PER_HOUR = 0.10
# A batch does at least the work of one sequence, so it cannot take much less time; the margin is
# for timing noise (the reference's batch of 16 takes about 4x as long as one sequence on one thread).
MIN_SECONDS_RATIO = 0.8


def public_expected() -> dict[str, Any]:
    """The stored expected values of the public inputs (written by `inferlab release` from the grading side)."""
    return json.loads(EXPECTED_PATH.read_text())


def _stored(task: str, seed: int) -> dict[str, Any]:
    stored = public_expected()[task]
    if seed != stored["seed"]:
        raise ValueError(f"expected values are stored for seed {stored['seed']} only; the autograder checks "
                         "other seeds in its own process")
    return stored


# ------------------------------------------------------------------------------------------------ plain data
# What the learner's functions return or raise, as plain data: the same on both sides (a notebook's
# self-check, and the learner's sandboxed process answering the checker), so one judgement reads both.

def plain_number(value: Any) -> float | dict[str, str]:
    """A float, or {"not_a_number": type, "repr": ...} for anything that is not a number (None, a string, a list)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return {"not_a_number": type(value).__name__, "repr": repr(value)[:80]}
    try:
        return float(value)  # int, float, numpy scalars, a one-element tensor
    except (TypeError, ValueError):
        return {"not_a_number": type(value).__name__, "repr": repr(value)[:80]}


def plain_numbers(values: Any) -> list[float | dict[str, str]] | dict[str, str]:
    """A list of `plain_number`s, or {"not_a_list": type} when `values` is not a sequence of numbers."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        return {"not_a_list": type(values).__name__, "repr": repr(values)[:80]}
    return [plain_number(v) for v in values]


def observe_raising(fn: Callable[..., Any], args: Sequence[Any]) -> dict[str, Any]:
    """A call that should raise ValueError: what it raised or returned. NotImplementedError still propagates
    (the task is not attempted); a crash is recorded, as the check asks for ValueError and nothing else."""
    try:
        value = fn(*args)  # positionally, in the notebook's order: parameter names are the learner's
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 (any exception is the learner's: recorded, and the check judges it)
        return {"raised": type(err).__name__, "value_error": isinstance(err, ValueError), "message": str(err)[:300]}
    return {"returned": repr(value)[:80]}


def plain_table(table: Any) -> list[Any] | dict[str, str]:
    """what_if_table's result as plain rows: a list of {column: str or plain_number}; a pandas DataFrame is fine."""
    if hasattr(table, "to_dict") and not isinstance(table, Mapping):
        table = table.to_dict("records")
    if isinstance(table, (str, bytes, Mapping)) or not hasattr(table, "__iter__"):
        return {"not_a_table": type(table).__name__}
    rows: list[Any] = []
    for row in table:
        if not isinstance(row, Mapping):
            rows.append({"not_a_dict": type(row).__name__})
            continue
        rows.append({str(k): str(v) if k == "scenario" else plain_number(v) for k, v in row.items()
                     if k in TABLE_COLUMNS})
    return rows


def _close(got: float, want: float, rel: float = 1e-6) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)


def _number(value: Any, what: str) -> float:
    """A plain_number that must be a number, or the failure that says so."""
    if isinstance(value, dict) or not isinstance(value, float):
        shown = value.get("repr", "?") if isinstance(value, dict) else repr(value)
        kind = value.get("not_a_number", "?") if isinstance(value, dict) else type(value).__name__
        raise CheckFailed(f"{what} is {shown} ({kind}); return a number of dollars")
    return value


# ------------------------------------------------------------------------------------------------ ROI1

def roi1_cases(seed: int) -> list[list[float]]:
    """[price $/h, tokens/s, utilisation, tokens per query]: round and drawn values, ints, the edges of (0, 1]."""
    rng = np.random.default_rng(seed)
    cases: list[list[float]] = [[2, 1000, 1, 500]]  # ints, and full utilisation
    for _ in range(10):
        cases.append([round(float(rng.uniform(0.3, 40.0)), 2), float(10 ** rng.uniform(0.5, 4.5)),
                      float(rng.uniform(0.05, 0.99)), int(rng.integers(20, 4000))])
    cases.append([float(rng.uniform(1, 10)), float(rng.uniform(50, 500)), 1e-3, 1])  # nearly idle, one-token answers
    return cases


VALID_INPUTS = {"gpu_dollars_per_hour": 2.5, "tokens_per_second": 400.0, "utilisation": 0.5}
BAD_INPUTS: list[tuple[dict[str, float], str]] = [  # the likeliest slip first: its message teaches most
    ({"utilisation": 70}, "utilisation is a fraction in (0, 1]: 70% is 0.7, not 70"),
    ({"utilisation": 1.5}, "utilisation is a fraction of time and cannot exceed 1"),
    ({"utilisation": 0.0}, "a GPU that is never used produces no tokens (utilisation must be in (0, 1])"),
    ({"utilisation": -0.3}, "utilisation must be in (0, 1]"),
    ({"tokens_per_second": 0.0}, "a throughput of zero tokens per second has no cost per token (it must be > 0)"),
    ({"tokens_per_second": -200.0}, "throughput must be positive"),
    ({"gpu_dollars_per_hour": -2.5}, "a price cannot be negative"),
]


def impossible_calls() -> list[tuple[str, dict[str, float], str]]:
    """(function, keyword inputs in the notebook's order, why) for every call that must raise ValueError."""
    calls = []
    for change, why in BAD_INPUTS:
        calls.append(("cost_per_million_tokens", {**VALID_INPUTS, **change}, why))
        calls.append(("cost_per_query", {**VALID_INPUTS, **change, "tokens_per_query": 300}, why))
    calls.append(("cost_per_query", {**VALID_INPUTS, "tokens_per_query": -10},
                  "a query cannot have a negative number of tokens"))
    return calls


def _why_per_million(ratio: float, utilisation: float) -> str:
    """What a wrong $/1M tokens most likely did, from got / expected."""
    hints = [
        (SECONDS_PER_HOUR, "it is 3600x too large: the price is per hour but the throughput per second; "
                           "multiply tokens per second by 3600 to get the tokens of an hour"),
        (1 / SECONDS_PER_HOUR, "it is 3600x too small: convert hours to seconds once (the price to dollars per "
                               "second, or the throughput to tokens per hour), not both"),
        (SECONDS_PER_HOUR ** 2, "tokens per hour are tokens per second x 3600, not / 3600"),
        (utilisation, f"it is {utilisation:.3g}x the expected value, which is what leaving out utilisation gives: "
                      "the GPU is paid for every hour but produces tokens only a `utilisation` fraction of them, "
                      "so divide by it"),
        (utilisation ** 2, "multiplying by utilisation gives this: idle time makes each token dearer, so divide by it"),
        (1e-3, "it is 1000x too small: that is dollars per 1K tokens; multiply the cost per token by 1,000,000"),
        (1e-6, "it is a cost per token: multiply by 1,000,000 for the cost per million tokens"),
        (1e3, "it is 1000x too large: per million is x 1,000,000 per token, not x 1,000,000,000"),
    ]
    for factor, hint in hints:
        if _close(ratio, factor, 1e-3):
            return hint
    return "compute price per hour / (tokens per second x 3600 x utilisation) x 1,000,000"


# values(function name, list of positional inputs) -> one plain_number per call
Values = Callable[[str, list[list[float]]], list[Any]]
# impossible([(function name, positional inputs), ...]) -> one observe_raising outcome per call
Impossible = Callable[[list[tuple[str, list[float]]]], list[Any]]


def verify_roi1(values: Values, impossible: Impossible, cases: list[list[float]],
                expected: Mapping[str, list[float]]) -> dict[str, Any]:
    """Both formulas give the expected values for every case; every impossible input raises ValueError.

    `expected` ({"per_million": [...], "per_query": [...]}) comes from the caller: the stored public
    values here, the checker's own formulas when grading."""
    per_million = values("cost_per_million_tokens", [c[:3] for c in cases])
    for (price, tps, util, _), got, want in zip(cases, _as_list(per_million, len(cases)), expected["per_million"]):
        call = f"cost_per_million_tokens({price!r}, {tps:.6g}, {util:.6g})"
        got = _number(got, call)
        if not _close(got, want):
            raise CheckFailed(f"{call} = {got:.6g}, expected {want:.6g}: {_why_per_million(got / want, util)}",
                              got=got, expected=want)
    per_query = values("cost_per_query", [list(c) for c in cases])
    for (price, tps, util, tpq), got, want in zip(cases, _as_list(per_query, len(cases)), expected["per_query"]):
        call = f"cost_per_query({price!r}, {tps:.6g}, {util:.6g}, tokens_per_query={tpq})"
        got = _number(got, call)
        if not _close(got, want):
            ratio = got / want
            if _close(ratio, TOKENS_PER_MILLION, 1e-3):
                hint = "a query costs (dollars per 1M tokens) x tokens_per_query / 1,000,000"
            elif _close(ratio, 1 / tpq, 1e-3):
                hint = "multiply by tokens_per_query: the answer has that many tokens"
            else:
                hint = ("cost_per_query is cost_per_million_tokens(...) x tokens_per_query / 1,000,000 "
                        f"({_why_per_million(ratio, util)})")
            raise CheckFailed(f"{call} = {got:.6g}, expected {want:.6g}: {hint}", got=got, expected=want)
    calls = impossible_calls()
    outcomes = _as_list(impossible([(name, list(kwargs.values())) for name, kwargs, _ in calls]), len(calls))
    for (name, kwargs, why), outcome in zip(calls, outcomes):
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        if not isinstance(outcome, dict):
            raise CheckFailed(f"{name}({shown}) could not be observed")
        if outcome.get("value_error") is True:
            continue
        if "raised" in outcome:
            raise CheckFailed(f"{name}({shown}) raised {outcome['raised']}: {outcome.get('message', '')}; raise "
                              f"ValueError for {why}, with a message that says what is allowed")
        raise CheckFailed(f"{name}({shown}) returned {outcome.get('returned', '?')} instead of raising ValueError: "
                          f"{why}. Check the inputs first and `raise ValueError(...)` with a message that says what "
                          "is allowed")
    return {"cases": 2 * len(cases), "bad_inputs_rejected": len(calls)}


def _as_list(got: Any, n: int) -> list[Any]:
    if not isinstance(got, list) or len(got) != n:
        raise CheckFailed(f"expected {n} results, got {type(got).__name__}")
    return got


def local_values(functions: Mapping[str, Callable[..., Any]]) -> Values:
    """`Values` for functions in this process (a notebook's self-check; the learner's sandbox)."""
    return lambda name, calls: [plain_number(functions[name](*args)) for args in calls]


def local_impossible(functions: Mapping[str, Callable[..., Any]]) -> Impossible:
    return lambda calls: [observe_raising(functions[name], args) for name, args in calls]


def check_roi1(per_million_fn: Any, per_query_fn: Any, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """ROI1 self-check: both formulas against stored values on round and drawn inputs; impossible inputs raise."""
    stored = _stored("ROI1", seed)
    functions = {"cost_per_million_tokens": per_million_fn, "cost_per_query": per_query_fn}
    return verify_roi1(local_values(functions), local_impossible(functions), roi1_cases(seed), stored)


# ------------------------------------------------------------------------------------------------ ROI2

SCENARIO_NAMES = ("unoptimised", "kv cache", "continuous batching", "int8 weights", "optimised", "autoscaled",
                  "spot instances", "speculative decoding", "smaller model")


def roi2_inputs(seed: int) -> dict[str, Any]:
    """3 to 5 scenarios in a random order, one of them the baseline (not always called 'unoptimised'), a daily
    volume and a human's price per query."""
    rng = np.random.default_rng(seed)
    names = [str(n) for n in rng.choice(SCENARIO_NAMES, size=int(rng.integers(3, 6)), replace=False)]
    scenarios = {name: {"gpu_dollars_per_hour": round(float(rng.uniform(1, 40)), 2),
                        "tokens_per_second": float(10 ** rng.uniform(1, 4)),
                        "utilisation": round(float(rng.uniform(0.2, 1.0)), 3),
                        "tokens_per_query": int(rng.integers(50, 2000))} for name in names}
    baseline = names[int(rng.integers(len(names)))]
    return {"scenarios": scenarios, "queries_per_day": int(10 ** rng.uniform(3, 6.5)),
            "human_dollars_per_query": round(float(rng.uniform(2, 5)), 2), "baseline": baseline}


def table_call(inputs: Mapping[str, Any]) -> str:
    return (f"what_if_table(<{len(inputs['scenarios'])} scenarios>, queries_per_day={inputs['queries_per_day']}, "
            f"human_dollars_per_query={inputs['human_dollars_per_query']}, baseline={inputs['baseline']!r})")


def table_rows(plain: Any, inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a `plain_table`, checked for shape: one dict per scenario in the order given, every column a
    number (the scenario a name)."""
    call = table_call(inputs)
    if not isinstance(plain, list):
        kind = plain.get("not_a_table", "?") if isinstance(plain, dict) else type(plain).__name__
        raise CheckFailed(f"what_if_table returned {kind}; return a list of dicts, one per scenario")
    for row in plain:
        if not isinstance(row, dict) or "not_a_dict" in row:
            kind = row.get("not_a_dict", "?") if isinstance(row, dict) else type(row).__name__
            raise CheckFailed(f"what_if_table returned a row of type {kind}; each row must be a dict with the keys "
                              f"{', '.join(TABLE_COLUMNS)}")
        missing = [k for k in TABLE_COLUMNS if k not in row]
        if missing:
            raise CheckFailed(f"a row of what_if_table has no {', '.join(repr(m) for m in missing)}; each row needs "
                              f"the keys {', '.join(TABLE_COLUMNS)}")
    names = [str(r["scenario"]) for r in plain]
    if names != list(inputs["scenarios"]):
        raise CheckFailed(f"{call} gave rows for {names}; expected one row per scenario, in the order given: "
                          f"{list(inputs['scenarios'])}")
    for row in plain:
        for column in TABLE_COLUMNS[1:]:
            _number(row[column], f"the {column} of {row['scenario']!r}")
    return plain


def _why_saving(got: float, want: float, cost: float, reference: float, against: str) -> str:
    if _close(got, 100 * want, 1e-6):
        return "that is a percentage; give the saving as a fraction (0.9 means 90% cheaper)"
    if _close(got, -want, 1e-6):
        return f"the sign is reversed: saving = 1 - cost / {against} cost, positive when the scenario is cheaper"
    if reference and cost and _close(got, reference / cost, 1e-6):
        return f"that is how many times cheaper than {against}; the saving is the fraction 1 - cost / {against} cost"
    return f"saving = 1 - (this scenario's dollars per query) / ({against} dollars per query)"


def verify_table(rows: list[dict[str, Any]], inputs: Mapping[str, Any],
                 expected: list[Mapping[str, float]]) -> dict[str, Any]:
    """Every column of every row against `expected` (one dict of the numeric columns per scenario, from the
    caller: the stored public table here; when grading, the checker's table built on the learner's own
    dollars per query, once those are accepted)."""
    call, baseline = table_call(inputs), inputs["baseline"]
    human = inputs["human_dollars_per_query"]
    by_name = {str(r["scenario"]): r for r in rows}
    for row, want in zip(rows, expected):
        name, dollars = str(row["scenario"]), row["dollars_per_query"]
        if not _close(dollars, want["dollars_per_query"]):
            raise CheckFailed(
                f"{call}: scenario {name!r} costs {dollars:.6g} dollars per query, expected "
                f"{want['dollars_per_query']:.6g} from its parameters {inputs['scenarios'][name]}: "
                "use cost_per_query(**params)", got=dollars, expected=want["dollars_per_query"])
        per_day = row["dollars_per_day"]
        if not _close(per_day, want["dollars_per_day"]):
            raise CheckFailed(f"{call}: scenario {name!r} costs {per_day:.6g} dollars per day, expected "
                              f"{want['dollars_per_day']:.6g}: dollars per query x queries_per_day")
        per_year = row["dollars_per_year"]
        if not _close(per_year, want["dollars_per_year"], 1e-3):  # 365.25 days is fine too
            days = per_year / per_day if per_day else float("nan")
            raise CheckFailed(f"{call}: scenario {name!r} costs {per_year:.6g} dollars per year, which is "
                              f"{days:.6g} days of {per_day:.6g}; a year here is {DAYS_PER_YEAR} days")
        for key, reference, against in (("saving_vs_human", human, "human"),
                                        ("saving_vs_baseline", by_name[baseline]["dollars_per_query"],
                                         f"the baseline ({baseline!r})")):
            got = row[key]
            if not math.isclose(got, want[key], rel_tol=1e-6, abs_tol=1e-9):
                raise CheckFailed(f"{call}: {key} of {name!r} is {got:.6g}, expected {want[key]:.6g}: "
                                  f"{_why_saving(got, want[key], dollars, reference, against)}",
                                  got=got, expected=want[key])
    return {"scenarios": len(rows)}


def _own_per_query(per_query_fn: Any, scenarios: Mapping[str, Mapping[str, float]]) -> list[float] | None:
    """The learner's own cost_per_query on each scenario, or None when it is not done or breaks."""
    if per_query_fn is None:
        return None
    try:
        own = [plain_number(per_query_fn(*params.values())) for params in scenarios.values()]
    except Exception:  # noqa: BLE001 (ROI1 not done or broken: only the stored values count)
        return None
    return own if all(isinstance(v, float) for v in own) else None


def check_roi2(table_fn: Any, per_query_fn: Any = None, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """ROI2 self-check: the table for drawn scenarios against the stored table."""
    stored = _stored("ROI2", seed)
    inputs = roi2_inputs(seed)
    given = {name: dict(params) for name, params in inputs["scenarios"].items()}  # the learner may mutate theirs
    rows = table_rows(plain_table(table_fn(given, inputs["queries_per_day"], inputs["human_dollars_per_query"],
                                           baseline=inputs["baseline"])), inputs)
    own = _own_per_query(per_query_fn, inputs["scenarios"])
    for row, want, mine in zip(rows, stored["rows"], own or [None] * len(rows)):
        if mine is not None and not _close(row["dollars_per_query"], want["dollars_per_query"]) \
                and _close(row["dollars_per_query"], mine):
            raise CheckFailed(
                f"scenario {row['scenario']!r} costs {row['dollars_per_query']:.6g} dollars per query, what your "
                f"cost_per_query gives, but the cost model gives {want['dollars_per_query']:.6g}: make ROI1 pass "
                "first (its self-check says what to fix). The autograder does not take ROI2's points for ROI1's "
                "mistake (it checks the rest of the table against your own cost_per_query), but this self-check "
                "compares with stored values", follows_your_cost_per_query=True)
    return verify_table(rows, inputs, stored["rows"])


# ------------------------------------------------------------------------------------------------ ROI3, the conversion

def roi3_conversion_inputs(seed: int) -> dict[str, Any]:
    """Drawn measurements: batch sizes, the seconds of one batched generation at each, the new tokens per
    sequence, a price and a utilisation (the arguments of cost_by_batch_size, by name)."""
    rng = np.random.default_rng(seed)
    batch_sizes = sorted(int(b) for b in rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64], size=5,
                                                    replace=False))
    step = float(rng.uniform(0.002, 0.05))  # seconds of one decode step at batch 1
    seconds = [float(rng.uniform(4, 64)) * step * (1 + b * rng.uniform(0.02, 0.3)) for b in batch_sizes]
    new_tokens = int(rng.integers(8, 256))
    price, utilisation = round(float(rng.uniform(0.05, 12)), 2), round(float(rng.uniform(0.2, 1.0)), 3)
    return {"batch_sizes": batch_sizes, "seconds": seconds, "new_tokens": new_tokens,
            "gpu_dollars_per_hour": price, "utilisation": utilisation}


def _why_batch_cost(ratio: float, batch_size: int, new_tokens: int) -> str:
    if batch_size > 1 and _close(ratio, batch_size, 1e-3):
        return (f"it is {batch_size}x the expected value, the batch size: a batch of {batch_size} sequences "
                f"produces batch_size x new_tokens tokens in those seconds, not new_tokens")
    if _close(ratio, new_tokens, 1e-3) or _close(ratio, new_tokens * batch_size, 1e-3):
        return "count the tokens generated: batch_size x new_tokens in the measured seconds"
    if _close(ratio, 1 / new_tokens, 1e-3):
        return "throughput is tokens / seconds: batch_size x new_tokens / seconds (once, not squared)"
    return ("throughput = batch_size x new_tokens / seconds, then the ROI1 formula at the given price and "
            "utilisation")


def verify_conversion(got: Any, inputs: Mapping[str, Any], expected: list[float],
                      own: list[float] | None) -> dict[str, Any]:
    """cost_by_batch_size's plain result against `expected` (stored, or the checker's formula), or against `own`:
    the learner's own ROI1 at the same throughputs, so that a wrong ROI1 costs points once."""
    batch_sizes, seconds, new_tokens = inputs["batch_sizes"], inputs["seconds"], inputs["new_tokens"]
    call = (f"cost_by_batch_size({batch_sizes}, <{len(seconds)} seconds>, new_tokens={new_tokens}, "
            f"gpu_dollars_per_hour={inputs['gpu_dollars_per_hour']}, utilisation={inputs['utilisation']})")
    if not isinstance(got, list) or not all(isinstance(c, float) for c in got):
        shown = got.get("repr", "?") if isinstance(got, dict) else repr(got)[:80]
        raise CheckFailed(f"{call} returned {shown}; return a list of dollars per 1M tokens, one per batch size")
    if len(got) != len(batch_sizes):
        raise CheckFailed(f"{call} returned {len(got)} costs for {len(batch_sizes)} batch sizes: one per batch size, "
                          "in order")
    followed_own_r1 = False
    for i, b in enumerate(batch_sizes):
        if _close(got[i], expected[i]):
            continue
        if own is not None and _close(got[i], own[i]):
            followed_own_r1 = True
            continue
        raise CheckFailed(f"{call}: at batch size {b} ({seconds[i]:.4g} s for {new_tokens} new tokens per sequence) "
                          f"you give {got[i]:.6g} dollars per 1M tokens, expected {expected[i]:.6g}: "
                          f"{_why_batch_cost(got[i] / expected[i], b, new_tokens)}", got=got[i], expected=expected[i])
    measured: dict[str, Any] = {"conversions": len(batch_sizes)}
    if followed_own_r1:
        measured["follows_your_cost_per_million_tokens"] = True  # correct given ROI1's formula; ROI1 grades that
    return measured


def _own_per_million(per_million_fn: Any, price: float, throughputs: list[float], utilisation: float) \
        -> list[float] | None:
    if per_million_fn is None:
        return None
    try:
        own = [plain_number(per_million_fn(price, tps, utilisation)) for tps in throughputs]
    except Exception:  # noqa: BLE001 (ROI1 not done or broken: only the expected values count)
        return None
    return own if all(isinstance(v, float) for v in own) else None


def check_roi3_conversion(cost_fn: Any, per_million_fn: Any = None, seed: int = PUBLIC_SEED) -> dict[str, Any]:
    """cost_by_batch_size on drawn measurements against the stored costs (or your own ROI1 at the stored
    throughputs)."""
    stored = _stored("ROI3", seed)
    inputs = roi3_conversion_inputs(seed)
    got = plain_numbers(cost_fn(list(inputs["batch_sizes"]), list(inputs["seconds"]), inputs["new_tokens"],
                                inputs["gpu_dollars_per_hour"], inputs["utilisation"]))
    own = _own_per_million(per_million_fn, inputs["gpu_dollars_per_hour"], stored["tokens_per_second"],
                           inputs["utilisation"])
    return verify_conversion(got, inputs, stored["dollars_per_million_tokens"], own)


# ------------------------------------------------------------------------------------------------ ROI3, the measurement

def decode_call(batch_size: int, repeats: int) -> str:
    return (f"time_batched_decode(model, batch_size={batch_size}, prompt_tokens={PROMPT_TOKENS}, "
            f"new_tokens={NEW_TOKENS}, repeats={repeats})")


def observe_decode(time_fn: Callable[..., Any], model: Any, batch_size: int, prompt_tokens: int, new_tokens: int,
                   repeats: int) -> dict[str, Any]:
    """Run the learner's timing function on `model`: what it returned, and the token batches the model saw.

    The token embedding sees the token ids of every forward pass, [B, T], however the model is called. The call
    runs under inference mode, as the grader's own measurement does: a learner who forgets it is not charged
    for autograd's bookkeeping, which is not what this lab is about."""
    import torch

    seen: list[tuple[int, ...]] = []
    hook = model.embed_tokens.register_forward_hook(
        lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    try:
        with torch.inference_mode():
            seconds = time_fn(model, batch_size, prompt_tokens, new_tokens, repeats)
    finally:
        hook.remove()
    return {"seconds": plain_number(seconds), "batch_rows": sorted({int(s[0]) for s in seen if s}),
            "forward_calls": len(seen)}


def verify_batches(call: str, batch_size: int, batch_rows: list[int], forward_calls: int) -> None:
    """The model ran, on whole batches of `batch_size` sequences, at least once per new token."""
    if not forward_calls:
        raise CheckFailed(f"{call} never ran the model it was given: generate with the `model` argument")
    if batch_rows != [batch_size]:
        raise CheckFailed(f"{call} ran the model on batches of {batch_rows} sequences: run all {batch_size} sequences "
                          f"together, tokens of shape [{batch_size}, T] in every forward pass, not one sequence at a "
                          "time", batch_sizes_seen=str(batch_rows))
    if forward_calls < NEW_TOKENS:
        raise CheckFailed(f"{call} ran only {forward_calls} forward passes; generating {NEW_TOKENS} new tokens "
                          "greedily takes one forward pass per new token")


def verify_decode_reply(reply: Any, batch_size: int, repeats: int) -> float:
    """One observation of the learner's timing function (`observe_decode`'s plain data): the seconds it returned,
    once checked to be a time, and the batches the model saw."""
    call = decode_call(batch_size, repeats)
    if not isinstance(reply, dict) or not {"seconds", "batch_rows", "forward_calls"} <= set(reply):
        raise CheckFailed(f"{call} could not be observed")
    seconds = reply["seconds"]
    if not isinstance(seconds, float):
        raise CheckFailed(f"{call} returned {seconds.get('repr', '?') if isinstance(seconds, dict) else seconds!r}; "
                          "return the seconds one generation took (> 0)")
    if not (math.isfinite(seconds) and seconds > 0):
        raise CheckFailed(f"{call} returned {seconds!r}; return the seconds one generation took (> 0)")
    verify_batches(call, batch_size, list(reply["batch_rows"]), int(reply["forward_calls"]))
    return seconds


def verify_cost_ratio(batch_sizes: list[int], seconds: list[float], costs: list[float],
                      bar: Mapping[str, Any]) -> dict[str, Any]:
    """A batch takes at least about the time of one sequence, and batched decode makes a token cheaper: the cost
    per token at the largest batch, over the smallest, is under the calibrated bar."""
    if len(batch_sizes) > 1 and seconds[-1] < MIN_SECONDS_RATIO * seconds[0]:
        raise CheckFailed(
            f"time_batched_decode says {batch_sizes[-1]} sequences took {seconds[-1]:.3g} s and {batch_sizes[0]} "
            f"took {seconds[0]:.3g} s, but a batch does at least the work of one sequence: return the seconds of the "
            "whole generation of all sequences, not per sequence or per token", seconds=seconds)
    ratio = costs[-1] / costs[0]
    measured = {"batch_sizes": list(batch_sizes), "seconds": [float(f"{s:.6g}") for s in seconds],
                "dollars_per_million_tokens": [round(c, 4) for c in costs],
                "cost_ratio": round(ratio, 3), "max_cost_ratio": bar["max_cost_ratio"]}
    if ratio > bar["max_cost_ratio"]:
        raise CheckFailed(
            f"at batch size {batch_sizes[-1]} a token costs {ratio:.0%} of what it costs at batch size "
            f"{batch_sizes[0]}; batched decode should bring it below {bar['max_cost_ratio']:.0%} (the calibrated bar "
            f"of the {bar['profile']} profile). Time one whole generation after a warm-up, take the median of the "
            "repeats, and keep anything but the generation (making prompts, loading, printing) outside the timed "
            "region; if the machine was busy, run the check again", **measured)
    return measured


def cost_bar(profile: str = "cpu") -> dict[str, Any]:
    """ROI3's bars, from grader/thresholds/roi.json (the model always runs on the CPU in this lab)."""
    from ...perf import threshold

    return threshold(LAB, "ROI3", profile)


def _fastest_seconds(time_fn: Any, model: Any, batch_sizes: list[int], rounds: int, repeats: int,
                     best: list[float] | None = None) -> list[float]:
    """The fastest seconds your function reports at each size, over `rounds` rounds alternating the sizes (other
    work on the machine only ever adds time), on one torch thread: the result then does not depend on how many
    cores are free, and a busy machine cannot stall it."""
    import torch

    fastest = dict(zip(batch_sizes, best)) if best else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            for b in batch_sizes:
                reply = observe_decode(time_fn, model, b, PROMPT_TOKENS, NEW_TOKENS, repeats)
                fastest[b] = min(fastest.get(b, math.inf), verify_decode_reply(reply, b, repeats))
    finally:
        torch.set_num_threads(threads)
    return [fastest[b] for b in batch_sizes]


def check_roi3(time_fn: Any, cost_fn: Any, per_million_fn: Any = None, seed: int = PUBLIC_SEED,
               batch_sizes: tuple[int, ...] | list[int] = (1, 16), rounds: int = 3, repeats: int = 1,
               model: Any = None) -> dict[str, Any]:
    """ROI3 self-check: the conversion on drawn measurements, then your own measurement, converted by your own
    cost_by_batch_size: batched for real, and cheaper per token at the largest batch than at the smallest
    (loosely: the bar is calibrated, see grader/thresholds/roi.json).

    The autograder also times the same batched decode itself, interleaved with yours, and compares."""
    converted = check_roi3_conversion(cost_fn, per_million_fn, seed)
    if model is None:
        from inferlab import load_model  # torch loads here, for the measurement only

        model = load_model("tiny")
    sizes, bar = list(batch_sizes), cost_bar()

    def costs_of(seconds: list[float]) -> list[float]:
        costs = plain_numbers(cost_fn(sizes, list(seconds), NEW_TOKENS, MACHINE_DOLLARS_PER_HOUR, 1.0))
        if not isinstance(costs, list) or len(costs) != len(sizes) or not all(isinstance(c, float) for c in costs):
            raise CheckFailed("cost_by_batch_size did not return one cost per batch size")
        return costs

    seconds = _fastest_seconds(time_fn, model, sizes, rounds, repeats)
    costs = costs_of(seconds)
    if len(sizes) > 1 and costs[-1] > bar["max_cost_ratio"] * costs[0]:
        # A burst of other work on the machine can slow the largest batch more than batch 1: measure again,
        # keeping the fastest time of every batch size over both attempts.
        seconds = _fastest_seconds(time_fn, model, sizes, rounds, repeats, best=seconds)
        costs = costs_of(seconds)
    if len(sizes) == 1:
        return {"batch_sizes": sizes, "seconds": [float(f"{s:.6g}") for s in seconds]}
    measured = verify_cost_ratio(sizes, seconds, costs, bar)
    if converted.get("follows_your_cost_per_million_tokens"):
        measured["follows_your_cost_per_million_tokens"] = True
    return measured
