"""The gpu_basics lab's checks: the reference passes, the stub is 'not attempted', known mistakes are caught,
and the sample submissions get what a careful grader gives when autograded for real.

The reference is the solution notebook itself (solutions/gpu_basics/gpu_basics.ipynb); the samples are
the edits of it defined in samples/gpu_basics.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from grader import notebook, samples
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.labs import gpu_basics as checks
from grader.perf import threshold
from inferlab import ModelArgs

SOURCE = Path(__file__).resolve().parent.parent / "solutions" / "gpu_basics" / "gpu_basics.ipynb"
CELLS = ["setup", "g1-solution", "g2-solution", "g3-solution", "g4-solution"]
SAMPLES = samples.definitions("gpu_basics")


def run_cells(nb) -> dict:
    return notebook.exec_cells(nb, CELLS)


@pytest.fixture(scope="module")
def reference():
    return run_cells(notebook.read(SOURCE))


@pytest.fixture(scope="module")
def built_samples(tmp_path_factory):
    return samples.build("gpu_basics", tmp_path_factory.mktemp("gpu_basics_samples"))


def sample(built_samples, name) -> dict:
    return run_cells(notebook.read(built_samples[name]))


def g3_without_timing(predict, measure, seed=checks.PUBLIC_SEED):
    """G3's parts that do not time a real model: the formula and the stopwatch on the stand-in."""
    checks.check_g3_formula(predict, seed)
    return checks.check_g3_measure(measure, seed)


def run_all(ns, seed=checks.PUBLIC_SEED) -> dict:
    return {
        "G1": run_check("G1", checks.check_g1, ns["parameter_count"], ns["weight_bytes"], ns["memory_needed"],
                        seed=seed),
        "G2": run_check("G2", checks.check_g2, ns["weights_read_per_forward"], ns["forward_flops"],
                        ns["arithmetic_intensity"], seed=seed),
        "G3": run_check("G3", g3_without_timing, ns["predict_decode_tokens_per_s"], ns["measure_decode_tokens_per_s"],
                        seed=seed),
        "G4": run_check("G4", checks.check_g4, ns["predict_on_hardware"], seed=seed),
    }


# ---------------------------------------------------------------- the grader's own formulas

def test_formula_matches_published_sizes_and_built_models():
    published = {"llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "qwen2.5-0.5b": 494_032_768}
    for name, count in published.items():
        assert checks.expected_parameter_count(ModelArgs.from_name(name)) == count
    assert round(checks.expected_parameter_count(ModelArgs.from_name("llama-3-70b")) * 2 / 1e9) == 141  # "140 GB+"
    rng = np.random.default_rng(0)
    for _ in range(15):
        args = checks.random_args(rng)
        assert checks.expected_parameter_count(args) == checks.built_parameter_count(args), args


def test_drawn_inputs_change_with_the_seed():
    shapes = {tuple(vars(checks.random_args(np.random.default_rng(s))).values()) for s in range(6)}
    assert len(shapes) >= 5
    sizes = [checks.expected_parameter_count(checks.decode_model_args(s)) for s in range(8)]
    assert len(set(sizes)) == 8 and all(100e6 <= n <= 250e6 for n in sizes)


def test_thresholds_have_a_noted_band_per_profile():
    for profile in ("cpu", "cuda"):
        band = threshold("gpu_basics", "G3", profile)
        assert band["profile"] == profile
        assert 0 < band["min_measured_over_predicted"] < 1 < band["max_measured_over_predicted"]
        assert band["calibration"]["note"]
    cpu = threshold("gpu_basics", "G3", "cpu")["calibration"]
    assert len(cpu["ratios"]) + len(cpu["contended_ratios"]) >= 10
    assert min(cpu["ratios"] + cpu["contended_ratios"]) >= 2 * threshold("gpu_basics", "G3", "cpu")[
        "min_measured_over_predicted"]
    assert threshold("gpu_basics", "G3", "cuda")["estimate"] is True  # no GPU measured it yet: say so


# ---------------------------------------------------------------- reference and stub

@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2, 3])
def test_reference_passes_on_public_and_drawn_inputs(reference, seed):
    for task, result in run_all(reference, seed).items():
        assert result.status == PASSED, result.line()


def test_reference_passes_g3_on_a_measured_model(reference):
    """The whole G3 check: a random-weight Llama built from the seed, measured against the prediction."""
    result = run_check("G3", checks.check_g3, reference["predict_decode_tokens_per_s"],
                       reference["measure_decode_tokens_per_s"], seed=6)  # a 126M model: quick
    assert result.status == PASSED, result.line()
    lo, hi = result.measured["band"]
    assert lo <= result.measured["measured_over_predicted"] <= hi
    assert 100 <= result.measured["params_M"] <= 250


def test_stub_is_not_attempted_with_task_id(built_samples):
    for task, result in run_all(sample(built_samples, "stub")).items():
        assert result.status == NOT_ATTEMPTED, result.line()
        assert f"Task {task}" in result.message


# ---------------------------------------------------------------- the samples' mistakes, one by one

@pytest.mark.parametrize("name", [n for n in SAMPLES if n not in ("reference", "stub")])
def test_sample_mistakes_fail_exactly_the_tasks_they_should(built_samples, name):
    results = run_all(sample(built_samples, name))
    for task, points in SAMPLES[name]["expected"].items():
        assert results[task].passed == (points > 0), (name, results[task].line())


@pytest.mark.parametrize("name, task, words", [
    ("wrong", "G1", "n_kv_heads x head_dim outputs"),
    ("wrong-bf16", "G1", "element size of bfloat16"),
    ("wrong-bf16", "G4", "says fits=False"),
    ("wrong-flops", "G2", "a multiply-add is 2 FLOPs"),
    ("prediction-off", "G3", "divide by the bytes of every weight read"),
    ("no-warmup", "G3", "warm-up"),
])
def test_sample_failures_say_what_to_fix(built_samples, name, task, words):
    result = run_all(sample(built_samples, name))[task]
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
        result = run_check("G1", checks.check_g1, slip, reference["weight_bytes"], reference["memory_needed"])
        assert result.status == FAILED and words in result.message, (words, result.line())


def test_memory_slips_are_named(reference):
    weights, bpe = reference["weight_bytes"], reference["bytes_per_element"]

    def no_kv(args, dtype, batch, context):
        return weights(args, dtype)

    def kv_with_n_heads(args, dtype, batch, context):
        return weights(args, dtype) + 2 * args.n_layers * args.n_heads * args.head_dim * bpe(dtype) * context * batch

    for fn, words in ((no_kv, "add the KV cache"), (kv_with_n_heads, "not n_heads")):
        result = run_check("G1", checks.check_g1, reference["parameter_count"], weights, fn)
        assert result.status == FAILED and words in result.message, result.line()


def test_intensity_and_weights_read_slips_are_named(reference):
    count, flops, bpe = reference["parameter_count"], reference["forward_flops"], reference["bytes_per_element"]
    read = reference["weights_read_per_forward"]

    def reads_embedding_too(args):
        return count(args)

    def bytes_grow_with_batch(args, dtype, batch, tokens):
        return flops(args, batch, tokens) / (read(args) * bpe(dtype) * batch)

    result = run_check("G2", checks.check_g2, reads_embedding_too, flops, reference["arithmetic_intensity"])
    assert result.status == FAILED and "untied" in result.message, result.line()
    result = run_check("G2", checks.check_g2, read, flops, bytes_grow_with_batch)
    assert result.status == FAILED and "do not grow with batch_size" in result.message, result.line()


def test_prediction_and_stopwatch_slips_are_named(reference):
    predict, measure = reference["predict_decode_tokens_per_s"], reference["measure_decode_tokens_per_s"]
    read, bpe = reference["weights_read_per_forward"], reference["bytes_per_element"]

    def gib(args, dtype, bandwidth, batch=1):
        return batch * bandwidth * 2**30 / (read(args) * bpe(dtype))

    def ignores_batch(args, dtype, bandwidth, batch=1):
        return predict(args, dtype, bandwidth, 1)

    for fn, words in ((gib, "not 2**30"), (ignores_batch, "multiply by batch_size")):
        result = run_check("G3", g3_without_timing, fn, measure)
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
        result = run_check("G3", g3_without_timing, predict, fn)
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
            result = run_check("G4", checks.check_g4, fn, seed=seed)
            assert result.status == FAILED and words in result.message, result.line()


def test_wrong_return_types_and_crashes_are_explained(reference):
    result = run_check("G1", checks.check_g1, lambda a: "many", reference["weight_bytes"], reference["memory_needed"])
    assert result.status == FAILED and "must return an int" in result.message
    result = run_check("G1", checks.check_g1, lambda a: a.n_layerz, reference["weight_bytes"],
                       reference["memory_needed"])
    assert result.status == ERROR and "n_layerz" in result.message


def test_band_catches_a_prediction_from_the_wrong_bandwidth(reference):
    """The band itself: a prediction that uses the H100's datasheet bandwidth instead of this machine's
    is far above anything measured here; one in bytes/s read as GB/s is far below."""
    device, dtype = checks.roofline_setting()
    model = checks.random_llama(checks.decode_model_args(7), 7, dtype, device)
    band = threshold("gpu_basics", "G3")
    lo, hi = band["min_measured_over_predicted"], band["max_measured_over_predicted"]
    predict = reference["predict_decode_tokens_per_s"]
    with checks.one_cpu_thread(device):
        run = checks.roofline_measurement(model, predict, rounds=3)
    del model
    assert lo <= run["ratio"] <= hi, run
    h100 = predict(checks.decode_model_args(7), dtype, 3350.0) if device == "cpu" else None
    if h100 is not None:
        assert run["measured_tok_s"] / h100 < lo
    assert run["measured_tok_s"] / (predict(checks.decode_model_args(7), dtype, run["bandwidth_gb_s"]) / 1e9) > hi


# ---------------------------------------------------------------- autograded for real

@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_samples_autograded_in_the_sandbox(built_samples, tmp_path):
    """A small batch through the real autograder (bwrap, 2 workers, clean re-run of the hidden tests)."""
    from grader.autograde import autograde
    from grader.sandbox import Limits

    chosen = ("reference", "stub", "no-warmup")  # the rest are proven above without the sandbox
    subs = tmp_path / "submissions"
    subs.mkdir()
    for name in chosen:
        shutil.copy(built_samples[name], subs / f"{name}.ipynb")
    outcomes = autograde("gpu_basics", subs, tmp_path / "out", workers=2, sandbox="bwrap", limits=Limits(wall_s=240),
                         progress=False)
    results = {o.student: json.loads(o.result_path.read_text()) for o in outcomes}
    assert set(results) == set(chosen)
    for name in chosen:
        got = {notebook.task_of(t["cell"]): t["points"] for t in results[name]["tasks"]}
        assert got == SAMPLES[name]["expected"], (name, json.dumps(results[name]["tasks"], indent=1))
    g3 = next(c for c in results["reference"]["checks"] if c["task"] == "G3")
    assert g3["measured"]["band"][0] <= g3["measured"]["measured_over_predicted"] <= g3["measured"]["band"][1]
