"""The roi lab: the reference passes, the stub is 'not attempted', known bad code is caught, a correct answer
written differently passes; the samples grade as a careful human grader would.

Two halves. The checks' judgements (`grader.labs.roi.public`) run here in-process, as a notebook's
self-checks run them: on the public seed against the stored values, and on drawn seeds against the
expected values of the grading side, as the checker computes them. Then one batch of answer variants
goes through `grader.check_stage` as the autograder runs it (bubblewrap, one answers process each):
the hidden checks, the learner's ROI1 asked for through probes, the work counted on a served model,
and the learner's timing against the grader's own.

The reference is the solution notebook itself (solutions/roi/roi.ipynb), so the checks are proven
against the one source learners' answers are compared with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grader import check_stage, labs, notebook, samples
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.roi import grading
from grader.labs.roi import public as checks
from grader.sandbox import Limits

REPO = Path(__file__).resolve().parent.parent
SOURCE, RELEASE = REPO / "solutions" / "roi" / "roi.ipynb", REPO / "labs" / "roi" / "roi.ipynb"
LAB = labs.load("roi")
CELLS = list(LAB.spec.reference_cells)


@pytest.fixture(scope="module")
def reference():
    return notebook.exec_cells(notebook.read(SOURCE), CELLS)


@pytest.fixture(scope="module")
def stub():
    """What a learner starts from: the answer cells of the committed release, untouched."""
    return notebook.exec_cells(notebook.read(RELEASE), CELLS)


def with_answer(reference, cell_id: str, old: str, new: str) -> dict:
    """The reference namespace with one answer cell re-run after a textual edit (a learner's mistake)."""
    ns = dict(reference)
    source = notebook.cell(notebook.read(SOURCE), cell_id).source
    assert old in source, old
    exec(source.replace(old, new), ns)
    return ns


# In-process, on any seed: the shared judgements with the expected values the grading side computes.

def roi1(ns, seed=checks.PUBLIC_SEED):
    functions = {"cost_per_million_tokens": ns["cost_per_million_tokens"], "cost_per_query": ns["cost_per_query"]}
    cases = checks.roi1_cases(seed)
    expected = {"per_million": [grading.dollars_per_million_tokens(*c[:3]) for c in cases],
                "per_query": [grading.dollars_per_query(*c) for c in cases]}
    return run_check("ROI1", checks.verify_roi1, checks.local_values(functions), checks.local_impossible(functions),
                     cases, expected)


def roi2(ns, seed=checks.PUBLIC_SEED, table=None):
    def check():
        i = checks.roi2_inputs(seed)
        given = json.loads(json.dumps(i["scenarios"]))
        got = (table or ns["what_if_table"])(given, i["queries_per_day"], i["human_dollars_per_query"],
                                             baseline=i["baseline"])
        rows = checks.table_rows(checks.plain_table(got), i)
        return checks.verify_table(rows, i, grading.reference_table(i["scenarios"], i["queries_per_day"],
                                                                    i["human_dollars_per_query"], i["baseline"]))
    return run_check("ROI2", check)


def roi3_conversion(ns, seed=checks.PUBLIC_SEED, cost_fn=None):
    def check():
        i = checks.roi3_conversion_inputs(seed)
        got = (cost_fn or ns["cost_by_batch_size"])(i["batch_sizes"], i["seconds"], i["new_tokens"],
                                                     i["gpu_dollars_per_hour"], i["utilisation"])
        return checks.verify_conversion(checks.plain_numbers(got), i, grading.reference_costs(i)[1], None)
    return run_check("ROI3", check)


# ---------------------------------------------------------------- the reference, the stub, the public module

@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2, 3, 4])
def test_reference_passes_formulas_and_table_on_public_and_drawn_inputs(reference, seed):
    for result in (roi1(reference, seed), roi2(reference, seed), roi3_conversion(reference, seed)):
        assert result.status == PASSED, result.line()


def test_public_self_checks_read_stored_values_that_the_grading_side_computes(reference):
    assert checks.public_expected() == grading.public_expected()
    for result in (run_check("ROI1", checks.check_roi1, reference["cost_per_million_tokens"],
                             reference["cost_per_query"]),
                   run_check("ROI2", checks.check_roi2, reference["what_if_table"], reference["cost_per_query"]),
                   run_check("ROI3", checks.check_roi3_conversion, reference["cost_by_batch_size"],
                             reference["cost_per_million_tokens"])):
        assert result.status == PASSED and not any(k.startswith("follows_your") for k in result.measured), \
            result.line()


def test_the_public_module_holds_no_formula_and_no_torch():
    """What a notebook imports as `checks` answers nothing (it used to hold the cost model), and ROI1/ROI2's
    self-checks start without torch."""
    for name in ("dollars_per_million_tokens", "dollars_per_query", "reference_table", "batch_tokens_per_second",
                 "checker_decode_seconds"):
        assert not hasattr(checks, name) and hasattr(grading, name), name
    text = Path(checks.__file__).read_text()
    assert "def dollars_per" not in text and "* SECONDS_PER_HOUR" not in text
    out = subprocess.run([sys.executable, "-c", "import sys, grader.labs.roi.public as p; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=REPO).stdout
    assert out.strip() == "False", out


def test_book_case_gives_the_books_figures(reference):
    """The customer-service scenarios land on the book's $0.20 and $0.02 per query, 90% apart."""
    rows = {r["scenario"]: r for r in reference["what_if_table"](reference["CUSTOMER_SERVICE"],
                                                                  reference["QUERIES_PER_DAY"],
                                                                  reference["HUMAN_DOLLARS_PER_QUERY"])}
    assert rows["unoptimised"]["dollars_per_query"] == pytest.approx(0.20, rel=0.01)
    assert rows["optimised"]["dollars_per_query"] == pytest.approx(0.02, rel=0.01)
    assert rows["optimised"]["saving_vs_baseline"] == pytest.approx(0.90)
    assert rows["unoptimised"]["saving_vs_human"] == pytest.approx(0.90, abs=0.01)  # $2 human, the cheap end


def test_stub_is_not_attempted_with_task_id(stub):
    results = [run_check("ROI1", checks.check_roi1, stub["cost_per_million_tokens"], stub["cost_per_query"]),
               run_check("ROI2", checks.check_roi2, stub["what_if_table"], stub["cost_per_query"]),
               run_check("ROI3", checks.check_roi3, stub["time_batched_decode"], stub["cost_by_batch_size"],
                         stub["cost_per_million_tokens"])]
    for r in results:
        assert r.status == NOT_ATTEMPTED, r.line()
        assert f"Task {r.task} is not implemented yet" in r.message, r.line()


def test_stubbed_roi1_does_not_hide_a_done_roi2(reference, stub):
    """ROI2 is checked on its own when ROI1 is still a stub (the learner's ROI1 is only consulted, never required)."""
    result = run_check("ROI2", checks.check_roi2, reference["what_if_table"], stub["cost_per_query"])
    assert result.status == PASSED, result.line()


def test_drawn_seeds_change_the_inputs():
    inputs = [checks.roi2_inputs(s) for s in range(6)]
    assert len({json.dumps(i, sort_keys=True) for i in inputs}) == 6
    assert len({i["baseline"] for i in inputs}) >= 3  # the baseline is not always the same name
    assert len({tuple(checks.roi1_cases(s)[1]) for s in range(6)}) == 6
    assert len({json.dumps(checks.roi3_conversion_inputs(s)) for s in range(6)}) == 6


def test_hard_coded_public_answers_fail_on_drawn_inputs(reference):
    """A table that replays the stored public values passes the self-check's seed and fails every drawn one."""
    stored = checks.public_expected()["ROI2"]["rows"]

    def replayed(scenarios, queries_per_day, human, baseline="unoptimised"):
        return stored

    assert run_check("ROI2", checks.check_roi2, replayed).passed
    for seed in (1, 2, 3):
        assert roi2(reference, seed, replayed).status == FAILED


# ---------------------------------------------------------------- ROI1 mistakes

@pytest.mark.parametrize("new, words", [
    ("tokens_per_second * utilisation", "3600x too large"),                     # per hour vs per second
    ("tokens_per_second * SECONDS_PER_HOUR", "leaving out utilisation"),        # forgets utilisation
    ("tokens_per_second * SECONDS_PER_HOUR / utilisation", "multiplying by utilisation"),
    ("tokens_per_second / SECONDS_PER_HOUR * utilisation", "not / 3600"),
])
def test_roi1_formula_mistakes_are_named(reference, new, words):
    ns = with_answer(reference, "roi1-solution", "tokens_per_second * SECONDS_PER_HOUR * utilisation", new)
    result = roi1(ns, seed=2)
    assert result.status == FAILED and words in result.message, result.line()


def test_roi1_converting_hours_twice_and_unit_mistakes_are_named(reference):
    twice = with_answer(reference, "roi1-solution", "return gpu_dollars_per_hour / tokens_per_paid_hour",
                        "return gpu_dollars_per_hour / SECONDS_PER_HOUR / tokens_per_paid_hour")
    result = run_check("ROI1", checks.check_roi1, twice["cost_per_million_tokens"], twice["cost_per_query"])
    assert result.status == FAILED and "3600x too small" in result.message, result.line()
    per_thousand = with_answer(reference, "roi1-solution", "/ tokens_per_paid_hour * TOKENS_PER_MILLION",
                               "/ tokens_per_paid_hour * 1_000")
    assert "1K tokens" in roi1(per_thousand).message
    per_query = with_answer(reference, "roi1-solution", "per_million * tokens_per_query / TOKENS_PER_MILLION",
                            "per_million * tokens_per_query")
    result = roi1(per_query)
    assert result.status == FAILED and "/ 1,000,000" in result.message and "cost_per_query" in result.message


def test_roi1_missing_validation_is_caught(reference):
    no_util_check = with_answer(reference, "roi1-solution", "if not 0 < utilisation <= 1:", "if False:")
    result = roi1(no_util_check)
    assert result.status == FAILED and "instead of raising ValueError" in result.message, result.line()
    percent = with_answer(reference, "roi1-solution", "if not 0 < utilisation <= 1:", "if not 0 < utilisation <= 100:")
    result = roi1(percent)
    assert result.status == FAILED and "70% is 0.7" in result.message, result.line()
    negative_query = with_answer(reference, "roi1-solution", "if tokens_per_query < 0:", "if False:")
    result = roi1(negative_query)
    assert result.status == FAILED and "tokens_per_query=-10" in result.message, result.line()


def test_roi1_wrong_exception_type_is_named(reference):
    asserts = with_answer(reference, "roi1-solution", 'raise ValueError(f"utilisation',
                          'raise AssertionError(f"utilisation')
    result = roi1(asserts)
    assert result.status == FAILED and "raised AssertionError" in result.message, result.line()


def test_roi1_crash_is_an_error_with_its_line(reference):
    typo = with_answer(reference, "roi1-solution", "tokens_per_paid_hour = tokens_per_second",
                       "tokens_per_paid_hour = tokens_per_secnd")
    result = run_check("ROI1", checks.check_roi1, typo["cost_per_million_tokens"], typo["cost_per_query"])
    assert result.status == ERROR and "NameError" in result.message and "tokens_per_secnd" in result.message


def test_roi1_non_number_is_named(reference):
    result = roi1(dict(reference, cost_per_million_tokens=lambda *a: None))
    assert result.status == FAILED and "return a number" in result.message, result.line()


# ---------------------------------------------------------------- ROI2 mistakes

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
def test_roi2_column_mistakes_are_named(reference, old, new, words):
    ns = with_answer(reference, "roi2-solution", old, new)
    result = run_check("ROI2", checks.check_roi2, ns["what_if_table"], ns["cost_per_query"])
    assert result.status == FAILED and words in result.message, result.line()


def test_roi2_leap_years_are_fine(reference):
    assert roi2(with_answer(reference, "roi2-solution", "per_day * DAYS_PER_YEAR", "per_day * 365.25"), 3).passed


def test_roi2_hard_coded_baseline_is_caught(reference):
    """Ignoring `baseline` (always 'unoptimised') fails wherever the drawn baseline has another name."""
    ns = with_answer(reference, "roi2-solution", "per_query[baseline]", 'per_query["unoptimised"]')
    seeds = [s for s in range(20) if checks.roi2_inputs(s)["baseline"] != "unoptimised"][:3]
    for seed in seeds:
        assert roi2(ns, seed).status in (FAILED, ERROR)


def test_roi2_rows_in_another_order_missing_keys_and_wrong_types_are_named(reference):
    def sorted_rows(*args, **kwargs):
        return sorted(reference["what_if_table"](*args, **kwargs), key=lambda r: r["dollars_per_query"])

    result = roi2(reference, 2, sorted_rows)
    assert result.status == FAILED and "in the order given" in result.message, result.line()

    def no_year(*args, **kwargs):
        return [{k: v for k, v in row.items() if k != "dollars_per_year"}
                for row in reference["what_if_table"](*args, **kwargs)]

    assert "'dollars_per_year'" in roi2(reference, table=no_year).message
    assert "list of dicts" in roi2(reference, table=lambda *a, **k: 42).message


def test_roi2_accepts_a_dataframe_like_table(reference):
    class Frame:  # what pandas' DataFrame offers, without needing pandas
        def __init__(self, rows):
            self.rows = rows

        def to_dict(self, orient):
            assert orient == "records"
            return self.rows

    assert roi2(reference, table=lambda *a, **k: Frame(reference["what_if_table"](*a, **k))).passed


def test_roi2_self_check_explains_a_table_that_follows_a_wrong_roi1(reference):
    """The self-check has only stored values, so it cannot check the rest of a table built on a wrong ROI1: it
    says so, and that the autograder accepts such a table (the check stage's 'wrong' sample below shows it)."""
    ns = with_answer(reference, "roi1-solution", "tokens_per_second * SECONDS_PER_HOUR * utilisation",
                     "tokens_per_second * SECONDS_PER_HOUR")
    ns = with_answer(ns, "roi2-solution", "cost_per_query(**params)", "cost_per_query(**params)")  # rebinds to it
    result = run_check("ROI2", checks.check_roi2, ns["what_if_table"], ns["cost_per_query"])
    assert result.status == FAILED and "make ROI1 pass first" in result.message, result.line()
    assert result.measured.get("follows_your_cost_per_query")
    # ...and a table that matches neither the cost model nor the learner's ROI1 says what the cost model gives
    result = run_check("ROI2", checks.check_roi2, ns["what_if_table"], reference["cost_per_query"])
    assert result.status == FAILED and "use cost_per_query(**params)" in result.message, result.line()


# ---------------------------------------------------------------- ROI3 mistakes

def test_roi3_conversion_without_batch_size_is_named(reference):
    ns = with_answer(reference, "roi3-solution", "batch_size * new_tokens / elapsed", "new_tokens / elapsed")
    result = roi3_conversion(ns, 3)
    assert result.status == FAILED and "batch_size x new_tokens" in result.message, result.line()


def test_roi3_conversion_follows_a_wrong_roi1_once(reference):
    ns = with_answer(reference, "roi1-solution", "tokens_per_second * SECONDS_PER_HOUR * utilisation",
                     "tokens_per_second * utilisation")
    ns = with_answer(ns, "roi3-solution", "costs = []", "costs = []")  # rebinds cost_by_batch_size to that ROI1
    result = run_check("ROI3", checks.check_roi3_conversion, ns["cost_by_batch_size"], ns["cost_per_million_tokens"])
    assert result.status == PASSED and result.measured.get("follows_your_cost_per_million_tokens"), result.line()
    assert run_check("ROI3", checks.check_roi3_conversion, ns["cost_by_batch_size"]).status == FAILED


def measure(reference, time_fn, tiny, **kw):
    return run_check("ROI3", checks.check_roi3, time_fn, reference["cost_by_batch_size"],
                     reference["cost_per_million_tokens"], model=tiny, **{"rounds": 1, **kw})


def test_reference_passes_roi3_measurement_in_the_self_check(reference, tiny):
    result = measure(reference, reference["time_batched_decode"], tiny, rounds=3)
    assert result.status == PASSED, result.line()
    assert result.measured["cost_ratio"] <= result.measured["max_cost_ratio"]


def test_roi3_one_sequence_at_a_time_is_caught(reference, tiny):
    ns = dict(reference)
    exec(samples.definitions("roi")["mix"]["cells"]["roi3-solution"], ns)
    result = measure(reference, ns["time_batched_decode"], tiny)
    assert result.status == FAILED and "not one sequence at a time" in result.message, result.line()


def test_roi3_ignoring_batch_size_and_timing_another_model_are_caught(reference, tiny):
    ns = with_answer(reference, "roi3-solution", "(batch_size, prompt_tokens))", "(1, prompt_tokens))")
    result = measure(reference, ns["time_batched_decode"], tiny)
    assert result.status == FAILED and "batches of [1] sequences" in result.message, result.line()
    other = reference["model"]  # the notebook's global model, not the one the check passes in

    def uses_global(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        return reference["time_batched_decode"](other, batch_size, prompt_tokens, new_tokens, repeats)

    result = measure(reference, uses_global, tiny)
    assert result.status == FAILED and "never ran the model it was given" in result.message, result.line()


def test_roi3_seconds_per_sequence_and_bad_seconds_are_caught(reference, tiny):
    def per_sequence(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        return reference["time_batched_decode"](model, batch_size, prompt_tokens, new_tokens, repeats) / batch_size

    result = measure(reference, per_sequence, tiny)
    assert result.status == FAILED and "not per sequence" in result.message, result.line()

    def negative(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        reference["time_batched_decode"](model, batch_size, prompt_tokens, new_tokens, 1)
        return -1.0

    result = measure(reference, negative, tiny, batch_sizes=[1])
    assert result.status == FAILED and "(> 0)" in result.message, result.line()


def test_roi3_batching_that_does_not_pay_fails_the_bar(reference, tiny):
    """Whole batches reach the model, but the seconds reported grow with the batch as fast as the tokens do:
    the cost per token does not fall, and the timing bar says so."""
    def no_gain(model, batch_size, prompt_tokens, new_tokens, repeats=3):
        return batch_size * reference["time_batched_decode"](model, batch_size, prompt_tokens, new_tokens, repeats)

    result = measure(reference, no_gain, tiny)
    assert result.status == FAILED and "should bring it below" in result.message, result.line()
    assert result.measured["cost_ratio"] > result.measured["max_cost_ratio"]


def test_thresholds_are_data_with_their_calibration():
    entry = json.loads((REPO / "grader" / "thresholds" / "roi.json").read_text())["profiles"]["cpu"]["ROI3"]
    calibration = entry["calibration"]
    assert 0 < calibration["reference_cost_ratio"] < entry["max_cost_ratio"] < calibration["unbatched_cost_ratio"]
    assert "geometric mean" in calibration["note"]
    assert calibration["reference_worst_seconds_deviation"] < entry["max_seconds_factor"] \
        < calibration["per_step_seconds_deviation"]
    assert "geometric mean" in calibration["seconds_factor_note"]


# ---------------------------------------------------------------- out of reach: the check stage, in one batch

DIFFERENT_ROI1 = '''
def cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation):
    # Written differently: the price of one busy second, then of one token.
    if utilisation <= 0 or utilisation > 1:
        raise ValueError("utilisation is a fraction in (0, 1]")
    if tokens_per_second <= 0 or gpu_dollars_per_hour < 0:
        raise ValueError("need tokens_per_second > 0 and gpu_dollars_per_hour >= 0")
    dollars_per_busy_second = gpu_dollars_per_hour / utilisation / 3600
    return 1e6 * dollars_per_busy_second / tokens_per_second


def cost_per_query(gpu_dollars_per_hour, tokens_per_second, utilisation, tokens_per_query):
    if tokens_per_query < 0:
        raise ValueError("tokens_per_query must be >= 0")
    return tokens_per_query * cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation) / 1e6
'''
DIFFERENT_ROI2 = '''
import numpy as np

def what_if_table(scenarios, queries_per_day, human_dollars_per_query, baseline="unoptimised"):
    # Written differently: numpy columns (numpy floats in the rows), and a year of 365.25 days.
    names = list(scenarios)
    per_query = np.array([cost_per_query(**scenarios[n]) for n in names])
    per_day = per_query * queries_per_day
    base = per_query[names.index(baseline)]
    return [dict(scenario=n, dollars_per_query=q, dollars_per_day=d, dollars_per_year=d * 365.25,
                 saving_vs_human=1 - q / human_dollars_per_query, saving_vs_baseline=1 - q / base)
            for n, q, d in zip(names, per_query, per_day)]
'''
DIFFERENT_ROI3 = '''
def time_batched_decode(model, batch_size, prompt_tokens, new_tokens, repeats=3):
    # Written differently: one preallocated token buffer filled in place, no_grad, monotonic_ns.
    buffer = torch.empty(batch_size, prompt_tokens + new_tokens, dtype=torch.long)
    buffer[:, :prompt_tokens] = torch.randint(0, model.args.vocab_size, (batch_size, prompt_tokens))

    def run():
        with torch.no_grad():
            for t in range(prompt_tokens, prompt_tokens + new_tokens):
                buffer[:, t] = model(buffer[:, :t])[:, -1].argmax(dim=-1)

    run()
    samples = []
    for _ in range(repeats):
        start = time.monotonic_ns()
        run()
        samples.append((time.monotonic_ns() - start) / 1e9)
    return sorted(samples)[len(samples) // 2]


def cost_by_batch_size(batch_sizes, seconds, new_tokens, gpu_dollars_per_hour, utilisation):
    throughputs = np.array(batch_sizes) * new_tokens / np.array(seconds)
    return [cost_per_million_tokens(gpu_dollars_per_hour, float(t), utilisation) for t in throughputs]
'''
# A likely slip the other checks let through: the seconds of one decode step, not of the whole generation.
PER_STEP_SECONDS = ("return statistics.median(times)", "return statistics.median(times) / new_tokens")
SAMPLES = samples.definitions("roi")
ATTACKS = samples.definitions("roi", "attacks")


def variant(cells: dict[str, str] | None = None, replace: dict[str, tuple[str, str]] | None = None,
            keep_solution: bool = False, from_release: bool = False):
    nb = notebook.read(RELEASE) if from_release else samples.solved("roi")
    for gid, source in (cells or {}).items():
        c = notebook.cell(nb, gid)
        c.source = (c.source + "\n\n" + source) if keep_solution else source
    for gid, (old, new) in (replace or {}).items():
        c = notebook.cell(nb, gid)
        assert old in c.source, old
        c.source = c.source.replace(old, new)
    prepared = prepare(notebook.read(SOURCE), nb)
    return prepared


def sample(name: str):
    spec = SAMPLES[name]
    return variant(spec.get("cells"), spec.get("replace"), from_release=spec.get("from_release", False))


VARIANTS = {
    "reference": (lambda: sample("reference"), {"ROI1": 4, "ROI2": 3, "ROI3": 3}),
    "different-but-correct": (lambda: variant({"roi1-solution": DIFFERENT_ROI1, "roi2-solution": DIFFERENT_ROI2,
                                               "roi3-solution": DIFFERENT_ROI3}), {"ROI1": 4, "ROI2": 3, "ROI3": 3}),
    # `partial` (ROI1 solved in the release) is left to tests/test_class_scale.py, which grades every sample.
    **{name: (lambda name=name: sample(name), SAMPLES[name]["expected"]) for name in ("stub", "wrong", "mix")},
    "per-step-seconds": (lambda: variant(replace={"roi3-solution": PER_STEP_SECONDS}),
                         {"ROI1": 4, "ROI2": 3, "ROI3": 0}),
    **{name: (lambda name=name: variant(ATTACKS[name]["cells"], keep_solution=ATTACKS[name].get("keep_solution")),
              ATTACKS[name]["expected"]) for name in ATTACKS},
}

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Each variant through the check stage once: {name: {task: outcome}}."""
    out = {}
    for i, (name, (build, _)) in enumerate(VARIANTS.items()):
        seeds = {t.id: 1000 * i + n for n, t in enumerate(LAB.spec.tasks)}
        outcomes, _ = check_stage.run(LAB, build(), "bwrap", Limits(threads=1), seeds, tmp_path_factory.mktemp(name))
        out[name] = {o.task: o for o in outcomes}
    return out


@needs_bwrap
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_gets_what_a_careful_grader_gives(checked, name):
    got = {task: o.points for task, o in checked[name].items()}
    assert got == VARIANTS[name][1], "\n".join(o.result.line() for o in checked[name].values())


@needs_bwrap
def test_the_checker_accepts_work_that_follows_the_learners_own_roi1(checked):
    wrong = checked["wrong"]
    assert "3600x too large" in wrong["ROI1"].result.message
    assert wrong["ROI2"].result.measured.get("follows_your_cost_per_query")
    assert wrong["ROI3"].result.measured.get("follows_your_cost_per_million_tokens")


@needs_bwrap
def test_the_work_is_counted_on_the_served_model(checked):
    reference = checked["reference"]["ROI3"].result.measured
    assert reference["counted_forward_calls"] >= checks.NEW_TOKENS and reference["counted_batch_size"] > 1
    mix = checked["mix"]
    assert "one sequence at a time" in mix["ROI3"].result.message and "instead of raising ValueError" in \
        mix["ROI1"].result.message


@needs_bwrap
def test_seconds_are_judged_against_the_graders_own_timing(checked):
    reference = checked["reference"]["ROI3"].result.measured
    factor = reference["max_seconds_factor"]
    assert all(1 / factor <= r <= factor for r in reference["seconds_ratio_to_grader"]), reference
    for name in ("forged-seconds", "per-step-seconds"):
        roi3 = checked[name]["ROI3"].result
        assert "the grader timed the same batched greedy decode" in roi3.message, roi3.line()


@needs_bwrap
def test_stub_tasks_are_not_attempted_and_name_their_task(checked):
    for o in checked["stub"].values():
        assert o.result.status == NOT_ATTEMPTED and o.task in o.result.message, o.result.line()


@needs_bwrap
def test_the_formula_is_out_of_reach(checked):
    roi1 = checked["call-the-formula"]["ROI1"].result
    assert roi1.status == ERROR and "dollars_per_million_tokens" in roi1.message, roi1.line()
