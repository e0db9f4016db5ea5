"""The roi lab: the reference passes, the stub is 'not attempted', known bad code is caught; the samples
grade as a careful human grader would, in one sandboxed batch.

The reference is the solution notebook itself (solutions/roi/roi.ipynb), so the checks are
proven against the one source learners' answers are compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grader import notebook, samples
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.labs import roi as checks

REPO = Path(__file__).resolve().parent.parent
SOURCE, RELEASE = REPO / "solutions" / "roi" / "roi.ipynb", REPO / "labs" / "roi" / "roi.ipynb"


@pytest.fixture(scope="module")
def reference():
    return notebook.exec_cells(notebook.read(SOURCE), checks.REFERENCE_CELLS)


@pytest.fixture(scope="module")
def stub():
    """What a learner starts from: the answer cells of the committed release, untouched."""
    return notebook.exec_cells(notebook.read(RELEASE), checks.REFERENCE_CELLS)


def with_answer(reference, cell_id: str, old: str, new: str) -> dict:
    """The reference namespace with one answer cell re-run after a textual edit (a learner's mistake)."""
    ns = dict(reference)
    source = notebook.cell(notebook.read(SOURCE), cell_id).source
    assert old in source, old
    exec(source.replace(old, new), ns)
    return ns


def r1(ns, seed=checks.PUBLIC_SEED):
    return run_check("R1", checks.check_r1, ns["cost_per_million_tokens"], ns["cost_per_query"], seed=seed)


def r2(ns, seed=checks.PUBLIC_SEED, table=None):
    return run_check("R2", checks.check_r2, table or ns["what_if_table"], ns["cost_per_query"], seed=seed)


def r3_conversion(ns, seed=checks.PUBLIC_SEED, cost_fn=None):
    return run_check("R3", checks.check_r3_conversion, cost_fn or ns["cost_by_batch_size"],
                     ns["cost_per_million_tokens"], seed=seed)


# ---------------------------------------------------------------- the reference and the stub

@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2, 3, 4])
def test_reference_passes_formulas_and_table_on_public_and_drawn_inputs(reference, seed):
    for result in (r1(reference, seed), r2(reference, seed), r3_conversion(reference, seed)):
        assert result.status == PASSED, result.line()
        assert not any(k.startswith("follows_your") for k in result.measured), result.line()


def test_reference_passes_r3_measurement_as_graded(reference, tiny):
    result = run_check("R3", checks.check_r3, reference["time_batched_decode"], reference["cost_by_batch_size"],
                       reference["cost_per_million_tokens"], seed=7, model=tiny)
    assert result.status == PASSED, result.line()
    costs = result.measured["dollars_per_million_tokens"]
    assert costs[-1] < costs[0] and result.measured["cost_ratio"] <= result.measured["max_cost_ratio"]


def test_book_case_gives_the_books_figures(reference):
    """The customer-service scenarios land on the book's $0.20 and $0.02 per query, 90% apart."""
    ns = notebook.exec_cells(notebook.read(SOURCE), ["customer-service-data"], dict(reference))
    rows = {r["scenario"]: r for r in reference["what_if_table"](ns["CUSTOMER_SERVICE"], ns["QUERIES_PER_DAY"],
                                                                  ns["HUMAN_DOLLARS_PER_QUERY"])}
    assert rows["unoptimised"]["dollars_per_query"] == pytest.approx(0.20, rel=0.01)
    assert rows["optimised"]["dollars_per_query"] == pytest.approx(0.02, rel=0.01)
    assert rows["optimised"]["saving_vs_baseline"] == pytest.approx(0.90)
    assert rows["unoptimised"]["saving_vs_human"] == pytest.approx(0.90, abs=0.01)  # $2 human, the cheap end


def test_stub_is_not_attempted_with_task_id(stub):
    results = [r1(stub), r2(stub), run_check("R3", checks.check_r3, stub["time_batched_decode"],
                                             stub["cost_by_batch_size"], stub["cost_per_million_tokens"])]
    for r in results:
        assert r.status == NOT_ATTEMPTED, r.line()
        assert f"Task {r.task} is not implemented yet" in r.message, r.line()


def test_stubbed_r1_does_not_hide_a_done_r2(reference, stub):
    """R2 is graded on its own when R1 is still a stub (the learner's R1 is only consulted, never required)."""
    result = run_check("R2", checks.check_r2, reference["what_if_table"], stub["cost_per_query"])
    assert result.status == PASSED, result.line()


def test_drawn_seeds_change_the_inputs():
    scenarios = [checks.random_scenarios(np.random.default_rng(s)) for s in range(6)]
    assert len({json.dumps(s, sort_keys=True) for s in scenarios}) == 6
    assert len({b for _, b in scenarios}) >= 3  # the baseline is not always the same name
    cases = {tuple(checks._r1_cases(np.random.default_rng(s))[1]) for s in range(6)}
    assert len(cases) == 6


def test_hard_coded_public_answers_fail_on_drawn_inputs(reference):
    """Answers that replay what the public self-check saw fail every drawn seed."""
    def replayed(scenarios, queries_per_day, human, baseline="unoptimised"):
        rng = np.random.default_rng(checks.PUBLIC_SEED)
        public, public_base = checks.random_scenarios(rng)
        q, h = int(10 ** rng.uniform(3, 6.5)), round(float(rng.uniform(2, 5)), 2)
        return checks.reference_table(public, q, h, public_base)

    assert r2(reference, checks.PUBLIC_SEED, replayed).passed
    for seed in (1, 2, 3):
        assert r2(reference, seed, replayed).status == FAILED


# ---------------------------------------------------------------- R1 mistakes

@pytest.mark.parametrize("new, words", [
    ("tokens_per_second * utilisation", "3600x too large"),                     # per hour vs per second
    ("tokens_per_second * SECONDS_PER_HOUR", "leaving out utilisation"),        # forgets utilisation
    ("tokens_per_second * SECONDS_PER_HOUR / utilisation", "multiplying by utilisation"),
    ("tokens_per_second / SECONDS_PER_HOUR * utilisation", "not / 3600"),
])
def test_r1_formula_mistakes_are_named(reference, new, words):
    ns = with_answer(reference, "r1-solution", "tokens_per_second * SECONDS_PER_HOUR * utilisation", new)
    result = r1(ns)
    assert result.status == FAILED and words in result.message, result.line()


def test_r1_converting_hours_twice_is_named(reference):
    ns = with_answer(reference, "r1-solution", "return gpu_dollars_per_hour / tokens_per_paid_hour",
                     "return gpu_dollars_per_hour / SECONDS_PER_HOUR / tokens_per_paid_hour")
    result = r1(ns)
    assert result.status == FAILED and "3600x too small" in result.message, result.line()


def test_r1_unit_mistakes_are_named(reference):
    per_thousand = with_answer(reference, "r1-solution", "/ tokens_per_paid_hour * TOKENS_PER_MILLION",
                               "/ tokens_per_paid_hour * 1_000")
    result = r1(per_thousand)
    assert result.status == FAILED and "1K tokens" in result.message, result.line()
    per_query = with_answer(reference, "r1-solution", "per_million * tokens_per_query / TOKENS_PER_MILLION",
                            "per_million * tokens_per_query")
    result = r1(per_query)
    assert result.status == FAILED and "/ 1,000,000" in result.message and "cost_per_query" in result.message


def test_r1_missing_validation_is_caught(reference):
    no_util_check = with_answer(reference, "r1-solution", "if not 0 < utilisation <= 1:", "if False:")
    result = r1(no_util_check)
    assert result.status == FAILED and "instead of raising ValueError" in result.message, result.line()
    percent = with_answer(reference, "r1-solution", "if not 0 < utilisation <= 1:", "if not 0 < utilisation <= 100:")
    result = r1(percent)
    assert result.status == FAILED and "70% is 0.7" in result.message, result.line()
    negative_query = with_answer(reference, "r1-solution", "if tokens_per_query < 0:", "if False:")
    result = r1(negative_query)
    assert result.status == FAILED and "tokens_per_query=-10" in result.message, result.line()


def test_r1_wrong_exception_type_is_named(reference):
    asserts = with_answer(reference, "r1-solution", 'raise ValueError(f"utilisation',
                          'raise AssertionError(f"utilisation')
    result = r1(asserts)
    assert result.status == FAILED and "raised AssertionError" in result.message, result.line()


def test_r1_crash_is_an_error_with_its_line(reference):
    typo = with_answer(reference, "r1-solution", "tokens_per_paid_hour = tokens_per_second",
                       "tokens_per_paid_hour = tokens_per_secnd")
    result = r1(typo)
    assert result.status == ERROR and "NameError" in result.message and "tokens_per_secnd" in result.message


def test_r1_non_number_is_named(reference):
    ns = dict(reference, cost_per_million_tokens=lambda *a: None)
    result = r1(ns)
    assert result.status == FAILED and "return a number" in result.message, result.line()


# ---------------------------------------------------------------- R2 mistakes

@pytest.mark.parametrize("old, new, words", [
    ('"saving_vs_human": 1 - dollars / human_dollars_per_query',
     '"saving_vs_human": 100 * (1 - dollars / human_dollars_per_query)', "percentage"),
    ('"saving_vs_baseline": 1 - dollars / per_query[baseline]',
     '"saving_vs_baseline": dollars / per_query[baseline] - 1', "sign is reversed"),
    ('"saving_vs_baseline": 1 - dollars / per_query[baseline]',
     '"saving_vs_baseline": per_query[baseline] / dollars', "times cheaper"),
    ('per_day * DAYS_PER_YEAR', 'per_day * 360', "a year here is 365 days"),
    ('per_day = dollars * queries_per_day', 'per_day = dollars * queries_per_day / 24',
     "dollars per query x queries_per_day"),
])
def test_r2_column_mistakes_are_named(reference, old, new, words):
    result = r2(with_answer(reference, "r2-solution", old, new))
    assert result.status == FAILED and words in result.message, result.line()


def test_r2_leap_years_are_fine(reference):
    result = r2(with_answer(reference, "r2-solution", "per_day * DAYS_PER_YEAR", "per_day * 365.25"))
    assert result.status == PASSED, result.line()


def test_r2_hard_coded_baseline_is_caught(reference):
    """Ignoring `baseline` (always 'unoptimised') fails wherever the drawn baseline has another name."""
    ns = with_answer(reference, "r2-solution", "per_query[baseline]", 'per_query["unoptimised"]')
    seeds = [s for s in range(20) if checks.random_scenarios(np.random.default_rng(s))[1] != "unoptimised"][:3]
    for seed in seeds:
        result = r2(ns, seed)
        assert result.status in (FAILED, ERROR), result.line()


def test_r2_rows_in_another_order_are_caught(reference):
    def sorted_rows(*args, **kwargs):
        return sorted(reference["what_if_table"](*args, **kwargs), key=lambda r: r["dollars_per_query"])

    result = r2(reference, 2, sorted_rows)
    assert result.status == FAILED and "in the order given" in result.message, result.line()


def test_r2_missing_key_and_wrong_type_are_named(reference):
    def no_year(*args, **kwargs):
        return [{k: v for k, v in row.items() if k != "dollars_per_year"} for row in reference["what_if_table"](
            *args, **kwargs)]

    result = r2(reference, table=no_year)
    assert result.status == FAILED and "'dollars_per_year'" in result.message, result.line()
    result = r2(reference, table=lambda *a, **k: 42)
    assert result.status == FAILED and "list of dicts" in result.message, result.line()


def test_r2_accepts_a_dataframe_like_table(reference):
    class Frame:  # what pandas' DataFrame offers, without needing pandas
        def __init__(self, rows):
            self.rows = rows

        def to_dict(self, orient):
            assert orient == "records"
            return self.rows

    result = r2(reference, table=lambda *a, **k: Frame(reference["what_if_table"](*a, **k)))
    assert result.status == PASSED, result.line()


def test_r2_follows_a_wrong_r1_once(reference):
    """A table built on the learner's own (wrong) cost_per_query passes R2; R1 alone loses the points."""
    ns = with_answer(reference, "r1-solution", "tokens_per_second * SECONDS_PER_HOUR * utilisation",
                     "tokens_per_second * SECONDS_PER_HOUR")
    ns = with_answer(ns, "r2-solution", "cost_per_query(**params)", "cost_per_query(**params)")  # rebinds to it
    assert r1(ns).status == FAILED
    result = r2(ns)
    assert result.status == PASSED and result.measured.get("follows_your_cost_per_query"), result.line()
    # ...but a table that matches neither the cost model nor the learner's R1 fails
    result = run_check("R2", checks.check_r2, ns["what_if_table"], reference["cost_per_query"])
    assert result.status == FAILED and "dollars per query" in result.message, result.line()


# ---------------------------------------------------------------- R3 mistakes

def test_r3_conversion_without_batch_size_is_named(reference):
    ns = with_answer(reference, "r3-solution", "batch_size * new_tokens / elapsed", "new_tokens / elapsed")
    result = r3_conversion(ns)
    assert result.status == FAILED and "batch_size x new_tokens" in result.message, result.line()


def test_r3_conversion_follows_a_wrong_r1_once(reference):
    ns = with_answer(reference, "r1-solution", "tokens_per_second * SECONDS_PER_HOUR * utilisation",
                     "tokens_per_second * utilisation")
    ns = with_answer(ns, "r3-solution", "costs = []", "costs = []")  # rebinds cost_by_batch_size to that R1
    result = r3_conversion(ns)
    assert result.status == PASSED and result.measured.get("follows_your_cost_per_million_tokens"), result.line()


def measure(reference, time_fn, tiny, **kw):
    return run_check("R3", checks.check_r3, time_fn, reference["cost_by_batch_size"],
                     reference["cost_per_million_tokens"], model=tiny, **{"rounds": 1, **kw})


def test_r3_one_sequence_at_a_time_is_caught(reference, tiny):
    ns = dict(reference)
    exec(samples.definitions("roi")["mix"]["cells"]["r3-solution"], ns)
    result = measure(reference, ns["time_batched_decode"], tiny)
    assert result.status == FAILED and "not one sequence at a time" in result.message, result.line()


def test_r3_ignoring_batch_size_is_caught(reference, tiny):
    ns = with_answer(reference, "r3-solution", "(batch_size, prompt_tokens))", "(1, prompt_tokens))")
    result = measure(reference, ns["time_batched_decode"], tiny)
    assert result.status == FAILED and "batches of [1] sequences" in result.message, result.line()


def test_r3_timing_another_model_is_caught(reference, tiny):
    other = reference["model"]  # the notebook's global model, not the one the check passes in

    def uses_global(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        return reference["time_batched_decode"](other, batch_size, prompt_tokens, new_tokens, repeats)

    result = measure(reference, uses_global, tiny)
    assert result.status == FAILED and "never ran the model it was given" in result.message, result.line()


def test_r3_seconds_per_sequence_are_caught(reference, tiny):
    def per_sequence(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        return reference["time_batched_decode"](model, batch_size, prompt_tokens, new_tokens, repeats) / batch_size

    result = measure(reference, per_sequence, tiny)
    assert result.status == FAILED and "not per sequence" in result.message, result.line()


def test_r3_batching_that_does_not_pay_fails_the_bar(reference, tiny):
    """Whole batches reach the model, but the seconds reported grow with the batch as fast as the tokens do:
    the cost per token does not fall, and the timing bar says so."""
    def no_gain(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        return batch_size * reference["time_batched_decode"](model, batch_size, prompt_tokens, new_tokens, repeats)

    result = measure(reference, no_gain, tiny)
    assert result.status == FAILED and "should bring it below" in result.message, result.line()
    assert result.measured["cost_ratio"] > result.measured["max_cost_ratio"]


def test_r3_bad_seconds_are_named(reference, tiny):
    def negative(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        reference["time_batched_decode"](model, batch_size, prompt_tokens, new_tokens, 1)
        return -1.0

    result = measure(reference, negative, tiny, batch_sizes=[1])
    assert result.status == FAILED and "(> 0)" in result.message, result.line()


def test_threshold_is_data_with_its_calibration():
    data = json.loads((Path(checks.__file__).parent.parent / "thresholds" / "roi.json").read_text())
    entry = data["profiles"]["cpu"]["R3"]
    calibration = entry["calibration"]
    assert 0 < calibration["reference_cost_ratio"] < entry["max_cost_ratio"] < calibration["unbatched_cost_ratio"]
    assert "geometric mean" in calibration["note"]


# The samples autograded for real, in bubblewrap sandboxes: each of them 38-39 times over in the class of
# 200 of tests/test_class_scale.py.
