"""The quantization lab: the reference passes, the stub is 'not attempted', known bad code is caught, a correct answer
written differently passes; the samples grade as a careful human grader would.

Three parts. The checks' judgements (`grader.labs.quantization.public`) run here in-process, as a notebook's
self-checks run them, on the public seed against the stored values and on a drawn seed against the expected
values the grading side computes (`grading.run_check`, the same function the autograder calls). Every sample
is graded that way (cheaply: a task whose cells equal the reference's reuses the reference's verdict). Then
one batch goes through `grader.check_stage` in bubblewrap as the autograder runs it: the reference, the stub,
and one submission that combines three bad answers. Last, the timed task through the real timing stage: the
reference passes and the `slower` sample (INT8 storage, dequantized at every call) fails.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import check_batch
from grader import labs, notebook, samples
from grader.checks import FAILED, INCONCLUSIVE, NOT_ATTEMPTED, PASSED, CheckFailed, run_check
from grader.execute import prepare
from grader.labs.quantization import grading
from grader.labs.quantization import public as checks
from grader.labs.quantization import samples as qz_samples
from grader.sandbox import Limits

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "solutions" / "quantization" / "quantization.ipynb"
RELEASE = REPO / "labs" / "quantization" / "quantization.ipynb"
LAB = labs.load("quantization")
CELLS = list(LAB.spec.reference_cells)
DRAWN = 7
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module", autouse=True)
def interpreted_triton():
    """The notebook's setup cell sets TRITON_INTERPRET before triton is imported; this process must agree."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def reference():
    return notebook.exec_cells(notebook.read(SOURCE), CELLS)


@pytest.fixture(scope="module")
def stub():
    """What a learner starts from: the answer cells of the committed release, untouched."""
    return notebook.exec_cells(notebook.read(RELEASE), CELLS)


def drawn(task: str, ns: dict, seed: int = DRAWN) -> dict:
    """One task's hidden check in-process, with the expected values of the grading side."""
    cache_cls = ns.get("Int8KVCache")
    return grading.run_check(task, checks.local_ask(ns), seed, lambda a, b, s: cache_cls(a, b, s),
                             checks.kv_cache_bytes_of(cache_cls))


def self_checks(ns: dict) -> dict:
    return {
        "QZ1": (checks.check_qz1, ns["quantize_int8"], ns["dequantize_int8"], ns["QuantLinear"]),
        "QZ2": (checks.check_qz2, ns["quantize_int4"], ns["dequantize_int4"]),
        "QZ3": (checks.check_qz3, ns["int4_matmul"]),
        "QZ4": (checks.check_qz4, ns["Int8KVCache"]),
        "QZ5": (checks.check_qz5, ns["perplexity"], ns["quantize_int8"], ns["dequantize_int8"], ns["quantize_int4"],
                ns["dequantize_int4"], ns["QuantLinear"]),
        "QZ6": (checks.check_qz6_speed, ns["QuantLinear"]),
    }


# ---------------------------------------------------------------- in-process: reference, stub, the public values

def test_reference_passes_every_self_check_and_every_drawn_check(reference, monkeypatch):
    monkeypatch.setenv("INFERLAB_AUTOGRADE", "")  # the self-checks run here (not skipped) ...
    for task, (fn, *args) in self_checks(reference).items():
        if task == "QZ6":
            monkeypatch.setenv("INFERLAB_AUTOGRADE", "1")  # ... but QZ6's timing is the timing stage's (below)
        result = run_check(task, fn, *args)
        assert result.status == PASSED, result.line()
    measured = {t.id: run_check(t.id, drawn, t.id, reference) for t in LAB.spec.tasks}
    for task, result in measured.items():
        assert result.status == PASSED, result.line()
    assert measured["QZ1"].measured["min_row_sqnr_db"] > 38
    assert measured["QZ1"].measured["quantized_model_bytes"] < measured["QZ1"].measured["fp32_model_bytes"]
    assert measured["QZ4"].measured["capacity_gain"][0] > 2.5
    assert measured["QZ5"].measured["increase"]["int8"] < 0.01


def test_stub_is_not_attempted_with_task_id(stub, monkeypatch):
    monkeypatch.setenv("INFERLAB_AUTOGRADE", "")
    for task, (fn, *args) in self_checks(stub).items():
        result = run_check(task, fn, *args)
        needs = "QZ1" if task == "QZ6" else task  # QZ6 times QZ1's QuantLinear
        assert result.status == NOT_ATTEMPTED and f"Task {needs}" in result.message, result.line()


def test_stored_public_values_are_what_the_grading_side_computes():
    assert checks.public_expected() == json.loads(json.dumps(grading.public_expected()))


def test_the_public_module_holds_no_answer():
    """What a notebook imports as `checks` has no quantization formula: those live in grading.py only."""
    text = Path(checks.__file__).read_text()
    for answer in ("def int8_codes", "def int4_codes", "def int8_kv_bytes", "def int4_bytes", "def int8_linear_bytes",
                   "torch.round(", ".amax(dim=1) / 127", "/ 15)"):
        assert answer not in text, answer
    assert hasattr(grading, "int8_codes") and hasattr(grading, "int4_codes")


def test_drawn_seeds_change_the_inputs():
    shapes = {tuple(tuple(w.shape) for w in checks.int8_cases(s)["weights"]) for s in range(5)}
    groups = {tuple(c["group_size"] for c in checks.int4_cases(s)) for s in range(5)}
    kernels = {tuple(tuple(c["x"].shape) + (c["packed"].shape[0],) for c in checks.kernel_cases(s)) for s in range(5)}
    assert len(shapes) == 5 and len(groups) >= 3 and len(kernels) == 5
    assert all(any(c["packed"].shape[0] % 16 or c["x"].shape[0] % 16 for c in checks.kernel_cases(s)) for s in range(5))


def test_a_torch_matmul_is_not_a_triton_kernel(reference):
    """Right products without a Triton launch: the kernel is the task, the matmul its reference."""
    ns = dict(reference)
    ns["int4_matmul"] = lambda x, p, s, o, g: x @ reference["dequantize_int4"](p, s, o, g).T
    result = run_check("QZ3", drawn, "QZ3", ns)
    assert result.status == FAILED and "no Triton kernel ran" in result.message, result.line()


def test_bad_inputs_must_raise_a_value_error_that_names_them(reference):
    ns = dict(reference)
    real = reference["quantize_int4"]

    def accepts_anything(weight, group_size):
        return real(weight[:, : weight.shape[1] // group_size * group_size], group_size) if group_size in (32, 64, 128, 256) \
            else real(weight, 32)
    ns["quantize_int4"] = accepts_anything
    result = run_check("QZ2", drawn, "QZ2", ns)
    assert result.status == FAILED and "raise a ValueError" in result.message, result.line()


# ---------------------------------------------------------------- every sample, in-process

def sample_namespace(reference: dict, name: str, path: Path) -> tuple[dict, dict]:
    """The sample's answer cells run on top of the reference's setup (exactly as its notebook defines them)."""
    nb = notebook.read(path)
    ns = notebook.exec_cells(notebook.read(SOURCE), ["setup"]) if name == "stub" else dict(reference)
    sources = {}
    for gid in CELLS[1:]:
        source = notebook.cell(nb, gid).source
        sources[gid] = source
        if source != notebook.cell(notebook.read(SOURCE), gid).source or name == "stub":
            exec(compile(source, f"<cell {gid}>", "exec"), ns)
    return ns, sources


@pytest.fixture(scope="module")
def graded_in_process(reference, tmp_path_factory):
    """{sample: ({task: points}, {task: CheckResult})}, a task's verdict reused from the reference where the
    cells it runs are the reference's."""
    from grader.checks import run_check as classify

    ref_sources = {gid: notebook.cell(notebook.read(SOURCE), gid).source for gid in CELLS[1:]}
    ref_results, out = {}, {}
    paths = samples.build(LAB.name, tmp_path_factory.mktemp("samples"))
    for name in ["reference", *[n for n in qz_samples.SAMPLES if n != "reference"]]:
        ns, sources = sample_namespace(reference, name, paths[name])
        points, results = {}, {}
        for task in LAB.spec.tasks:
            unmet = [t for t in task.requires if not results[t].passed]
            same = all(sources[c] == ref_sources[c] for c in task.cells) and name != "stub"
            if unmet:
                result = classify(task.id, lambda: (_ for _ in ()).throw(CheckFailed(f"builds on {unmet}")))
            elif same and task.id in ref_results:
                result = ref_results[task.id]
            else:
                result = classify(task.id, drawn, task.id, ns)
            results[task.id] = result
            points[task.id] = task.points if result.passed else 0
        if name == "reference":
            ref_results = results
        out[name] = (points, results)
    return out


@pytest.mark.parametrize("name", list(qz_samples.SAMPLES))
def test_each_sample_gets_what_a_careful_grader_gives(graded_in_process, name):
    points, results = graded_in_process[name]
    expected = dict(qz_samples.SAMPLES[name]["expected"])
    if qz_samples.SAMPLES[name].get("timed") == "failed":  # its gate passes here; the timing stage fails it (below)
        expected["QZ6"] = LAB.spec.task("QZ6").points
    assert points == expected, "\n".join(r.line() for r in results.values())


@pytest.mark.parametrize("name, task, says", [
    ("truncating", "QZ2", "the codes are truncated"),
    ("wrong-nibble-order", "QZ2", "the nibbles are swapped"),
    ("per-tensor-scales", "QZ1", "every row got the same scale, which is per-tensor quantization"),
    ("aligned-only-kernel", "QZ3", "mask the loads and stores at the edges"),
    ("fp32-labelled-int8", "QZ1", "no fp32 copy of the weight"),
    ("claims-bytes-not-held", "QZ1", "not even in a submodule"),
    ("stub", "QZ1", "Task QZ1"),
])
def test_each_mistake_is_named(graded_in_process, name, task, says):
    result = graded_in_process[name][1][task]
    assert says in result.message, result.line()


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB.name, tmp_path)
    assert set(paths) == set(qz_samples.SAMPLES)
    nb = notebook.read(paths["wrong-nibble-order"])
    assert "packed = (q[:, 0::2] << 4) | q[:, 1::2]" in notebook.cell(nb, "qz2-solution").source


# ---------------------------------------------------------------- the check stage: the autograder's verdicts

COMBINED_BAD = {**qz_samples.ALL, "QZ1": 0, "QZ2": 0, "QZ3": 0, "QZ5": 0, "QZ6": 0}


def variant(name: str):
    if name == "combined-bad":  # fp32 weights labelled INT8, truncating INT4, a kernel right only on aligned shapes
        nb = samples.solved(LAB.name)
        c1 = notebook.cell(nb, "qz1-solution")
        c1.source = c1.source + "\n\n" + qz_samples.FP32_LABELLED_INT8.strip() + "\n"
        for gid, (old, new) in (("qz2-solution", qz_samples.TRUNCATES), ("qz3-solution", qz_samples.ALIGNED_ONLY)):
            c = notebook.cell(nb, gid)
            c.source = c.source.replace(old, new)
        return prepare(notebook.read(SOURCE), nb), COMBINED_BAD
    spec = qz_samples.SAMPLES[name]
    nb = notebook.read(RELEASE) if spec.get("from_release") else samples.solved(LAB.name)
    return prepare(notebook.read(SOURCE), nb), spec["expected"]


CHECKED = ("reference", "stub", "combined-bad")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    return check_batch(LAB, {name: (lambda name=name: variant(name)[0]) for name in CHECKED}, tmp_path_factory)


@needs_bwrap
@pytest.mark.parametrize("name", CHECKED)
def test_the_check_stage_gives_what_a_careful_grader_gives(checked, name):
    points, results, tampered = checked[name]
    assert points == variant(name)[1], "\n".join(r.line() for r in results.values())
    assert tampered == []


@needs_bwrap
def test_the_check_stage_counts_bytes_and_launches_in_the_learner_s_process(checked):
    _, ref, _ = checked["reference"]
    assert ref["QZ1"].measured["quantized_model_bytes"] < ref["QZ1"].measured["fp32_model_bytes"]
    assert ref["QZ4"].measured["relative_logit_error"] < 0.02
    _, bad, _ = checked["combined-bad"]
    assert "no fp32 copy of the weight" in bad["QZ1"].message, bad["QZ1"].line()
    assert "truncated" in bad["QZ2"].message and "mask the loads" in bad["QZ3"].message
    assert "builds on QZ1" in bad["QZ5"].message and "builds on QZ1" in bad["QZ6"].message
    _, stub, _ = checked["stub"]
    assert all(r.status == NOT_ATTEMPTED for r in stub.values())


# ---------------------------------------------------------------- the timing stage, in bubblewrap

@needs_bwrap
def test_timing_stage_passes_the_reference_and_fails_int8_that_dequantizes_every_call(tmp_path):
    """QZ6 through the real timing stage (fewer rounds than grading): fp32 decode, the reference's INT8 and the
    submission's, interleaved in two sandboxed processes. A machine too busy to tell is inconclusive, never a
    wrong verdict."""
    from grader.perf_stage import time_submission

    source = notebook.read(SOURCE)
    spec = dataclasses.replace(LAB.spec.timed, rounds=(3, 6))
    ref = time_submission(LAB.name, prepare(source, samples.solved(LAB.name)), source, "bwrap", Limits(threads=1),
                          seed=11, spec=spec, workdir=tmp_path)
    assert ref.status in (PASSED, INCONCLUSIVE), ref.line()
    slow_nb = samples.solved(LAB.name)
    cell = notebook.cell(slow_nb, "qz1-solution")
    cell.source = cell.source.replace(*qz_samples.DEQUANTIZE_EVERY_CALL)
    slow = time_submission(LAB.name, prepare(source, slow_nb), source, "bwrap", Limits(threads=1), seed=12,
                           spec=spec, workdir=tmp_path)
    assert slow.status in (FAILED, INCONCLUSIVE), slow.line()
    assert PASSED in (ref.status,) or FAILED in (slow.status,), (ref.line(), slow.line())
    if slow.status == FAILED:
        assert "dequantizing the whole weight" in slow.message, slow.line()


def test_grading_side_is_what_the_registry_finds():
    assert LAB.grading is grading and set(grading.HIDDEN_CHECKS) == {t.id for t in LAB.spec.tasks}
    assert LAB.timed.task == "QZ6" and LAB.spec.task("QZ5").requires == ("QZ1", "QZ2")
