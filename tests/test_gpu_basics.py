"""The gpu_basics lab's checks: the reference passes, the stub is 'not attempted', known mistakes are caught,
a correct solution written differently passes, and the formulas are out of the learner's reach.

The checks' logic (`grader.labs.gpu_basics.public`) runs here in-process, as a notebook's self-checks
run it, with the expected values of the grading side for any seed; one batch of variants then goes
through `grader.check_stage` as the autograder runs it (bubblewrap, the learner's answers in a sandboxed
process, GB3's stopwatch judged against the checker's own). The reference is the solution notebook
itself; the samples are the edits of it in grader/labs/gpu_basics/samples.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from grader import check_stage, labs, notebook, samples
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.gpu_basics import grading
from grader.labs.gpu_basics import public as checks
from grader.perf import threshold
from grader.sandbox import Limits
from inferlab import ModelArgs

LAB = labs.load("gpu_basics")
SOURCE = Path(__file__).resolve().parent.parent / "solutions" / "gpu_basics" / "gpu_basics.ipynb"
SAMPLES = samples.definitions("gpu_basics")
CASES = {"GB1": grading.gb1_cases, "GB2": grading.gb2_cases, "GB3": grading.gb3_cases, "GB4": grading.gb4_cases}
VERIFY = {"GB1": checks.verify_gb1, "GB2": checks.verify_gb2, "GB3": checks.verify_gb3_formula,
          "GB4": checks.verify_gb4}


def run_cells(nb) -> dict:
    return notebook.exec_cells(nb, list(LAB.spec.reference_cells))


@pytest.fixture(scope="module")
def reference():
    return run_cells(notebook.read(SOURCE))


@pytest.fixture(scope="module")
def built_samples(tmp_path_factory):
    return samples.build("gpu_basics", tmp_path_factory.mktemp("gpu_basics_samples"))


def answers(ns: dict, **replaced) -> dict:
    """The learner's functions of a namespace, some replaced."""
    return {**{name: ns[name] for name in checks.SIGNATURES}, **replaced}


def verify(task: str, functions: dict, seed: int = checks.PUBLIC_SEED):
    """One task's exact part in-process, on any seed, with the grading side's expected values (as the checker has
    them): GB3 then also tries the stopwatch on the stand-in, not the real model (the batch below times that)."""
    def check():
        ask, maybe = checks.local_answers(functions)
        measured = VERIFY[task](ask, maybe, CASES[task](seed))
        if task == "GB3":
            model = checks.stand_in(seed)
            got = checks.plain(functions["measure_decode_tokens_per_s"](model, checks.STAND_IN_STEPS))
            measured.update(checks.judge_stand_in(got, model, checks.STAND_IN_STEPS))
        return measured
    return run_check(task, check)


def run_all(ns: dict, seed: int = checks.PUBLIC_SEED) -> dict:
    functions = answers(ns, measure_decode_tokens_per_s=ns["measure_decode_tokens_per_s"])
    return {task: verify(task, functions, seed) for task in VERIFY}


# ---------------------------------------------------------------- the grader's own formulas, and where they live

def test_formula_matches_published_sizes_and_built_models():
    published = {"llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "qwen2.5-0.5b": 494_032_768}
    for name, count in published.items():
        assert grading.expected_parameter_count(ModelArgs.from_name(name)) == count
    assert round(grading.expected_parameter_count(ModelArgs.from_name("llama-3-70b")) * 2 / 1e9) == 141  # "140 GB+"
    rng = np.random.default_rng(0)
    for _ in range(15):
        args = grading.random_args(rng)
        assert grading.expected_parameter_count(args) == grading.built_parameter_count(args), args


def test_drawn_inputs_change_with_the_seed():
    shapes = {tuple(vars(grading.random_args(np.random.default_rng(s))).values()) for s in range(6)}
    assert len(shapes) >= 5
    sizes = [grading.expected_parameter_count(grading.decode_model_args(s)) for s in range(8)]
    assert len(set(sizes)) == 8 and all(100e6 <= n <= 250e6 for n in sizes)
    assert grading.gb4_cases(1) != grading.gb4_cases(2)


def test_the_public_module_holds_no_answer():
    """What a notebook imports as `checks` computes no answer (it used to: `checks.expected_parameter_count`);
    its self-checks read stored values, which are what the grading side computes now."""
    for name in ("expected_parameter_count", "expected_forward_flops", "expected_intensity", "expected_weights_read",
                 "expected_decode_tokens_per_s", "expected_memory_needed", "built_parameter_count",
                 "decode_model_args"):
        assert not hasattr(checks, name) and hasattr(grading, name), name
    assert "def expected_" not in Path(checks.__file__).read_text()
    assert checks.stored("GB1") == grading.public_expected()["GB1"]
    assert all(checks.stored(t) == grading.public_expected()[t] for t in VERIFY)


def test_thresholds_have_both_bands_per_profile():
    for profile in ("cpu", "cuda"):
        band = threshold("gpu_basics", "GB3", profile)
        assert band["profile"] == profile and band["calibration"]["note"]
        assert 0 < band["min_measured_over_predicted"] < 1 < band["max_measured_over_predicted"]
        assert 0 < band["min_yours_over_grader"] < 1 < band["max_yours_over_grader"]
    cpu = threshold("gpu_basics", "GB3", "cpu")
    roofline = cpu["calibration"]["ratios"] + cpu["calibration"]["contended_ratios"]
    assert len(roofline) >= 10 and min(roofline) >= 2 * cpu["min_measured_over_predicted"]
    agreement = cpu["calibration"]["reference_over_grader"] + cpu["calibration"]["contended_reference_over_grader"]
    assert len(agreement) >= 10
    assert min(agreement) >= 2 * cpu["min_yours_over_grader"] and max(agreement) <= cpu["max_yours_over_grader"] / 2
    assert threshold("gpu_basics", "GB3", "cuda")["estimate"] is True  # no GPU measured it yet: say so


# ---------------------------------------------------------------- reference and stub, in-process

@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2])
def test_reference_passes_on_public_and_drawn_inputs(reference, seed):
    for task, result in run_all(reference, seed).items():
        assert result.status == PASSED, result.line()


def test_reference_passes_its_own_self_checks(reference):
    """The notebook's self-checks of GB1, GB2 and GB4, on the stored public values."""
    ns = reference
    assert checks.check_gb1(ns["parameter_count"], ns["weight_bytes"], ns["memory_needed"])
    assert checks.check_gb2(ns["weights_read_per_forward"], ns["forward_flops"], ns["arithmetic_intensity"],
                            ns["parameter_count"])
    assert checks.check_gb4(ns["predict_on_hardware"], ns["predict_decode_tokens_per_s"], ns["memory_needed"])


def test_stub_is_not_attempted_with_task_id(built_samples):
    for task, result in run_all(run_cells(notebook.read(built_samples["stub"]))).items():
        assert result.status == NOT_ATTEMPTED, result.line()
        assert f"Task {task}" in result.message


# ---------------------------------------------------------------- the samples' mistakes, one by one

@pytest.fixture(scope="module")
def sample_results(built_samples):
    return {name: run_all(run_cells(notebook.read(built_samples[name])))
            for name in SAMPLES if name not in ("reference", "stub")}


@pytest.mark.parametrize("name", [n for n in SAMPLES if n not in ("reference", "stub")])
def test_sample_mistakes_fail_exactly_the_tasks_they_should(sample_results, name):
    for task, points in SAMPLES[name]["expected"].items():
        assert sample_results[name][task].passed == (points > 0), (name, sample_results[name][task].line())


@pytest.mark.parametrize("name, task, words", [
    ("wrong", "GB1", "n_kv_heads x head_dim outputs"),
    ("wrong", "GB2", "follows from your parameter_count"),  # the later tasks point back at the earlier function
    ("wrong", "GB3", "make GB2's weights_read_per_forward right first"),
    ("wrong", "GB4", "make GB3's prediction right first"),
    ("wrong-bf16", "GB1", "element size of bfloat16"),
    ("wrong-bf16", "GB4", "make GB1's memory_needed right first"),
    ("wrong-flops", "GB2", "a multiply-add is 2 FLOPs"),
    ("prediction-off", "GB3", "divide by the bytes of every weight read"),
    ("no-warmup", "GB3", "warm-up"),
])
def test_sample_failures_say_what_to_fix(sample_results, name, task, words):
    result = sample_results[name][task]
    assert result.status == FAILED and words in result.message, result.line()


# ---------------------------------------------------------------- more realistic mistakes

def test_parameter_count_slips_are_named(reference):
    count = reference["parameter_count"]
    slips = {
        "only when it is not tied": lambda a: count(a) - (0 if a.tie_embeddings else a.vocab_size * a.dim),
        "three matrices": lambda a: count(a) - a.n_layers * a.dim * a.ffn_dim,
        "qkv_bias=True": lambda a: count(a) - (a.n_layers * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
                                               if a.qkv_bias else 0),
        "count the norms": lambda a: count(a) - (2 * a.n_layers + 1) * a.dim,
        "not always dim / n_heads": lambda a: count(a) + 2 * a.n_layers * a.dim * (a.dim - a.n_heads * a.head_dim),
    }
    for words, slip in slips.items():
        result = verify("GB1", answers(reference, parameter_count=slip))
        assert result.status == FAILED and words in result.message, (words, result.line())


def test_memory_slips_are_named(reference):
    weights, bpe = reference["weight_bytes"], reference["bytes_per_element"]

    def no_kv(args, dtype, batch, context):
        return weights(args, dtype)

    def kv_with_n_heads(args, dtype, batch, context):
        return weights(args, dtype) + 2 * args.n_layers * args.n_heads * args.head_dim * bpe(dtype) * context * batch

    for fn, words in ((no_kv, "add the KV cache"), (kv_with_n_heads, "not n_heads")):
        result = verify("GB1", answers(reference, memory_needed=fn))
        assert result.status == FAILED and words in result.message, result.line()


def test_intensity_and_weights_read_slips_are_named(reference):
    count, flops, bpe = reference["parameter_count"], reference["forward_flops"], reference["bytes_per_element"]
    read = reference["weights_read_per_forward"]

    def bytes_grow_with_batch(args, dtype, batch, tokens):
        return flops(args, batch, tokens) / (read(args) * bpe(dtype) * batch)

    result = verify("GB2", answers(reference, weights_read_per_forward=count))  # reads the untied embedding too
    assert result.status == FAILED and "untied" in result.message, result.line()
    result = verify("GB2", answers(reference, arithmetic_intensity=bytes_grow_with_batch))
    assert result.status == FAILED and "do not grow with batch_size" in result.message, result.line()


def test_prediction_and_stopwatch_slips_are_named(reference):
    predict, measure = reference["predict_decode_tokens_per_s"], reference["measure_decode_tokens_per_s"]
    read, bpe = reference["weights_read_per_forward"], reference["bytes_per_element"]

    def gib(args, dtype, bandwidth, batch=1):
        return batch * bandwidth * 2**30 / (read(args) * bpe(dtype))

    def ignores_batch(args, dtype, bandwidth, batch=1):
        return predict(args, dtype, bandwidth, 1)

    for fn, words in ((gib, "not 2**30"), (ignores_batch, "multiply by batch_size")):
        result = verify("GB3", answers(reference, predict_decode_tokens_per_s=fn))
        assert result.status == FAILED and words in result.message, result.line()

    def seconds_per_step(model, steps=10):
        return 1 / measure(model, steps)

    def whole_context(model, steps=10):  # times a 32-token forward as if it were one decode step
        import statistics
        import time

        tokens = torch.zeros(1, 32, dtype=torch.long)
        model(tokens)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
        return 1 / statistics.median(times)

    for fn, words in ((seconds_per_step, "not the time of a step"), (whole_context, "tokens of shape [1, 1]")):
        result = verify("GB3", answers(reference, measure_decode_tokens_per_s=fn))
        assert result.status == FAILED and words in result.message, result.line()


def test_hardware_slips_are_named(reference):
    predict, memory = reference["predict_decode_tokens_per_s"], reference["memory_needed"]
    weights = reference["weight_bytes"]

    def gib(args, dtype, hw, context):
        return predict(args, dtype, hw["bandwidth_gb_s"]), memory(args, dtype, 1, context) <= hw["memory_gb"] * 2**30

    def weights_only(args, dtype, hw, context):
        return predict(args, dtype, hw["bandwidth_gb_s"]), weights(args, dtype) <= hw["memory_gb"] * 1e9

    def says_yes_or_no(args, dtype, hw, context):
        return predict(args, dtype, hw["bandwidth_gb_s"]), "yes"

    for fn, words in ((gib, "says fits=True"), (weights_only, "says fits=True"), (says_yes_or_no, "must be a bool")):
        for seed in range(3):
            result = verify("GB4", answers(reference, predict_on_hardware=fn), seed)
            assert result.status == FAILED and words in result.message, result.line()


def test_wrong_return_types_and_crashes_are_explained(reference):
    result = verify("GB1", answers(reference, parameter_count=lambda a: "many"))
    assert result.status == FAILED and "must return an int" in result.message
    result = verify("GB1", answers(reference, parameter_count=lambda a: np.int64(7)))  # a numpy int is an int
    assert result.status == FAILED and "= 7, but" in result.message, result.line()
    result = verify("GB1", answers(reference, parameter_count=lambda a: a.n_layerz))
    assert result.status == ERROR and "n_layerz" in result.message


# ---------------------------------------------------------------- GB3's measurement, judged (no clock needed)

BAND = {"min_measured_over_predicted": 0.11, "max_measured_over_predicted": 1.25, "min_yours_over_grader": 0.5,
        "max_yours_over_grader": 2.0, "profile": "cpu"}


def judged(yours: list[float], ours: list[float] = (20.0, 21.0, 19.0), predicted: float = 50.0):
    run = {"yours": list(yours), "ours": list(ours), "bandwidths": [30.0] * len(ours)}
    return run_check("GB3", checks.judge_measurement, run, [predicted] * len(ours), BAND, 170_000_000, torch.float32)


def test_a_measurement_is_judged_against_the_graders_own():
    assert judged([19.0, 22.0, 20.0]).passed  # honest: about the grader's own number
    forged = judged([60.0, 60.0, 60.0])  # a number that is not this model's rate (here: above the roofline, too)
    assert forged.status == FAILED and "the grader's stopwatch, alternating with yours" in forged.message
    seconds = judged([1 / 19.0, 1 / 22.0, 1 / 20.0])
    assert seconds.status == FAILED and "not the time of a step" in seconds.message, seconds.line()
    above = judged([39.0, 40.0, 41.0], ours=(30.0, 30.0, 30.0), predicted=31.0)  # agrees, but beats the memory
    assert above.status == FAILED and "the roofline" in above.message, above.line()


def test_a_disturbed_machine_is_not_the_learners_fault():
    """The grader's own stopwatch far under the roofline band: the self-check says rerun; the autograder does
    not score it (check_stage.Starved, a grader error)."""
    result = judged([0.5, 0.5, 0.5], ours=(0.5, 0.5, 0.5), predicted=50.0)
    assert result.status == FAILED and "machine was disturbed" in result.message
    with pytest.raises(checks.Disturbed):
        checks.judge_measurement({"yours": [0.5], "ours": [0.5], "bandwidths": [30.0]}, [50.0], BAND, 1, torch.float32)
    assert issubclass(check_stage.Starved, check_stage.GraderFault)


# ---------------------------------------------------------------- autograded: the checker's process and the sandbox

DIFFERENT = {
    "gb1-solution": '''
import math

def parameter_count(args):
    # Written differently from the reference: every tensor's shape listed, then multiplied out.
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    layer = [(q, args.dim), (kv, args.dim), (kv, args.dim), (args.dim, q), (args.ffn_dim, args.dim),
             (args.ffn_dim, args.dim), (args.dim, args.ffn_dim), (args.dim,), (args.dim,)]
    layer += [(q,), (kv,), (kv,)] if args.qkv_bias else []
    layer += [(args.dim,)] if args.out_bias else []
    shapes = [(args.vocab_size, args.dim), (args.dim,)] + layer * args.n_layers
    shapes += [] if args.tie_embeddings else [(args.vocab_size, args.dim)]
    return sum(math.prod(s) for s in shapes)

def weight_bytes(args, dtype):
    return parameter_count(args) * dtype.itemsize

def memory_needed(args, dtype, batch_size, context_len):
    kv_bytes = math.prod((2, args.n_layers, batch_size, args.n_kv_heads, context_len, args.head_dim)) * dtype.itemsize
    return weight_bytes(args, dtype) + kv_bytes
''',
    "gb2-solution": '''
def weights_read_per_forward(args):
    untied_table = 0 if args.tie_embeddings else args.vocab_size * args.dim
    return parameter_count(args) - untied_table

def forward_flops(args, batch_size, n_tokens):
    return weights_read_per_forward(args) * 2 * n_tokens * batch_size

def arithmetic_intensity(args, dtype, batch_size, n_tokens):
    return 2.0 * batch_size * n_tokens / dtype.itemsize  # the weights read cancel out
''',
    "gb3-solution": '''
import time

def predict_decode_tokens_per_s(args, dtype, bandwidth_gb_s, batch_size=1):
    seconds_per_step = weights_read_per_forward(args) * dtype.itemsize / (bandwidth_gb_s * 1e9)
    return batch_size / seconds_per_step

def measure_decode_tokens_per_s(model, steps=10):
    # Two warm-up steps, perf_counter around each step, the middle of the sorted times.
    param = next(model.parameters())
    with torch.no_grad():
        token = torch.zeros((1, 1), dtype=torch.long, device=param.device)
        pos = torch.tensor([0], device=param.device)
        for _ in range(2):
            model(token, pos)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(token, pos)
            times.append(time.perf_counter() - start)
    return 1.0 / sorted(times)[len(times) // 2]
''',
    "gb4-solution": '''
def predict_on_hardware(args, dtype, hardware, context_len):
    rate = predict_decode_tokens_per_s(args, dtype, hardware["bandwidth_gb_s"])
    return float(rate), bool(memory_needed(args, dtype, 1, context_len) / 1e9 <= hardware["memory_gb"])
''',
}
CALL_THE_FORMULA = '''
try:  # the notebook's `checks` used to hold the formulas; the grading side is out of the sandbox's reach
    weights_read_per_forward = checks.expected_weights_read
    forward_flops, arithmetic_intensity = checks.expected_forward_flops, checks.expected_intensity
except AttributeError:
    from grader.labs.gpu_basics.grading import (expected_forward_flops as forward_flops,
                                                expected_intensity as arithmetic_intensity,
                                                expected_weights_read as weights_read_per_forward)
'''


def variant(name: str, built: dict) -> object:
    if name == "different-but-correct":
        nb = samples.solved("gpu_basics")
        for gid, source in DIFFERENT.items():
            notebook.cell(nb, gid).source = source
    elif name == "call-the-formula":
        nb = samples.solved("gpu_basics")
        notebook.cell(nb, "gb2-solution").source = CALL_THE_FORMULA
    else:
        nb = notebook.read(built[name])
    prepared = prepare(notebook.read(SOURCE), nb)
    return prepared


BATCH = {
    "reference": SAMPLES["reference"]["expected"],
    "different-but-correct": {"GB1": 3, "GB2": 2, "GB3": 3, "GB4": 2},
    "stub": SAMPLES["stub"]["expected"],
    "wrong": SAMPLES["wrong"]["expected"],
    "no-warmup": SAMPLES["no-warmup"]["expected"],
    # Takes GB2's answers from the formulas instead of writing them: nothing to call, so no GB2, and GB3 and GB4,
    # which build on weights_read_per_forward, do not work either.
    "call-the-formula": {"GB1": 3, "GB2": 0, "GB3": 0, "GB4": 0},
}


@pytest.fixture(scope="module")
def checked(built_samples, tmp_path_factory):
    """Each variant through the check stage once: {name: (points by task, outcomes)}."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    out = {}
    for i, name in enumerate(BATCH):
        seeds = {t.id: 100 * i + n for n, t in enumerate(LAB.spec.tasks)}
        outcomes, _ = check_stage.run(LAB, variant(name, built_samples), "bwrap", Limits(threads=1), seeds,
                                      tmp_path_factory.mktemp(name))
        out[name] = ({o.task: o.points for o in outcomes}, {o.task: o.result for o in outcomes})
    return out


@pytest.mark.parametrize("name", list(BATCH))
def test_each_variant_gets_what_a_careful_grader_gives(checked, name):
    points, results = checked[name]
    assert points == BATCH[name], "\n".join(r.line() for r in results.values())


def test_the_stopwatch_is_judged_on_work_counted_by_the_checker(checked):
    """GB3 passed on the stand-in the checker serves (its calls counted there) and on a random Llama, where the
    learner's number agreed with the checker's own measurement of the same model, taken in turns."""
    for name in ("reference", "different-but-correct"):
        gb3 = checked[name][1]["GB3"].measured
        assert gb3["stand_in_calls"] >= checks.STAND_IN_STEPS and 100 <= gb3["params_M"] <= 250
        low, high = gb3["agreement_band"]
        assert low <= gb3["yours_over_grader"] <= high and gb3["rounds"] == checks.MEASURE_ROUNDS
    no_warmup = checked["no-warmup"][1]["GB3"]
    assert no_warmup.status == FAILED and "warm-up" in no_warmup.message, no_warmup.line()


def test_messages_point_at_the_earlier_function_and_the_formula_is_out_of_reach(checked):
    wrong = checked["wrong"][1]
    assert "follows from your parameter_count" in wrong["GB2"].message, wrong["GB2"].line()
    assert "weights_read_per_forward right first" in wrong["GB3"].message, wrong["GB3"].line()
    gb2 = checked["call-the-formula"][1]["GB2"]
    assert gb2.status == ERROR and "weights_read_per_forward is not defined" in gb2.message, gb2.line()
    for result in checked["stub"][1].values():
        assert result.status == NOT_ATTEMPTED and "Task GB" in result.message, result.line()
