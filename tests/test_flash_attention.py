"""The flash_attention lab: the reference and answers written differently pass, the stub is 'not attempted', each
known mistake fails the check that exists for it, with a message that names it.

Two halves. The checks' logic (`grader.labs.flash_attention.public`) runs here in-process, as a notebook's
self-checks run it, on the reference and on each mistake of `grader/labs/flash_attention/samples.py`. Then
one batch of samples goes through `grader.check_stage` as the autograder runs it (bubblewrap, one answers
process each, Triton under its interpreter): each gets the grade a careful grader gives it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import check_batch
from grader import labs, notebook, samples
from grader.checks import FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.flash_attention import grading
from grader.labs.flash_attention import public as checks
from grader.labs.flash_attention import attacks
from grader.labs.flash_attention import samples as mistakes

LAB = labs.load("flash_attention")
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "solutions" / LAB.name / f"{LAB.name}.ipynb"
ANSWER_CELLS = ["fa1-solution", "fa2-solution", "fa3-solution", "fa4-solution"]
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def reference():
    threads, interpret = torch.get_num_threads(), os.environ.get("TRITON_INTERPRET")
    yield notebook.exec_cells(notebook.read(SOURCE), list(LAB.spec.reference_cells))
    # The notebook's setup pins one thread and, without a GPU, sets TRITON_INTERPRET: leave the session as it was.
    torch.set_num_threads(threads)
    if interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = interpret


def with_cell(reference, source: str) -> dict:
    ns = dict(reference)
    exec(source, ns)
    return ns


def with_edit(reference, cell_id: str, edit) -> dict:
    return with_cell(reference, mistakes.edited(cell_id, edit))


# ---------------------------------------------------------------- in-process: the checks' logic

def test_reference_passes_every_self_check(reference):
    ns = reference
    fa1 = run_check("FA1", checks.check_fa1, ns["tiled_attention"])
    assert fa1.status == PASSED, fa1.line()
    assert fa1.measured["ratio_to_naive"] < 0.1  # about 0.07 with 128 x 128 tiles at N = 2048
    fa2 = run_check("FA2", checks.check_fa2, ns["flash_attention_forward"], ns["flash_attention_fn"], ns)
    assert fa2.status == PASSED, fa2.line()
    assert ns["flash_attention_forward"] is reference["flash_attention_forward"]  # the counter was put back
    for task, check, args in (("FA3", checks.check_fa3, (ns["flash_bytes_moved"], ns["naive_bytes_moved"])),
                              ("FA4", checks.check_fa4, (ns["flash_attention_backward"],))):
        result = run_check(task, check, *args)
        assert result.status == PASSED, result.line()


def test_answers_written_differently_pass_on_drawn_seeds(reference):
    different = with_cell(with_cell(with_cell(reference, mistakes.DIFFERENT_FA1), mistakes.DIFFERENT_FA3),
                          mistakes.DIFFERENT_FA4)
    tiled = different["tiled_attention"]
    for seed in (3, 11):
        checks.verify_tiled(lambda q, k, v, c, bq, bk: tiled(q, k, v, c, bq, bk), seed)
        checks.verify_backward(different["flash_attention_backward"], seed)
        cases = checks.byte_cases(seed)
        checks.verify_bytes(different["flash_bytes_moved"], different["naive_bytes_moved"], cases,
                            grading.expected_bytes(cases))


def test_stub_is_not_attempted_with_task_id(reference):
    ns = dict(reference)
    nb = notebook.read(SOURCE)
    for cell_id in ANSWER_CELLS:
        exec(notebook.strip_solutions(notebook.cell(nb, cell_id).source,
                                      f'raise NotImplementedError("Task {cell_id[:3].upper()} stub")'), ns)
    result = run_check("FA1", checks.check_fa1, ns["tiled_attention"])
    assert result.status == NOT_ATTEMPTED and "FA1" in result.message, result.line()
    result = run_check("FA2", checks.check_fa2, ns["flash_attention_forward"], ns["flash_attention_fn"], ns)
    assert result.status == NOT_ATTEMPTED and "FA2" in result.message, result.line()


def test_running_sum_not_rescaled_fails_equality(reference):
    ns = with_edit(reference, "fa1-solution", mistakes.NO_RESCALE_FA1)
    result = run_check("FA1", checks.verify_tiled,
                       lambda q, k, v, c, bq, bk: ns["tiled_attention"](q, k, v, c, bq, bk), 5)
    assert result.status == FAILED and "rescale both the sum" in result.message, result.line()


@pytest.mark.parametrize("edit", ["DIAGONAL_UNMASKED_FA2", "NO_RESCALE_FA2"])
def test_kernel_mistakes_fail_equality(reference, edit):
    ns = with_edit(reference, "fa2-solution", getattr(mistakes, edit))
    fn = ns["flash_attention_forward"]
    result = run_check("FA2", checks.verify_kernel,
                       lambda q, k, v, c, bm, bn: fn(q, k, v, causal=c, block_m=bm, block_n=bn), 5)
    assert result.status == FAILED and "differs from attention" in result.message, result.line()
    if edit == "DIAGONAL_UNMASKED_FA2":
        assert "causal=True" in result.message  # only the causal cases go wrong


def test_memory_catches_materialised_scores_sdpa_and_hidden_work(reference):
    """Work hidden from torch's meter (numpy) shows in the process's resident memory (read from /proc)."""
    naive = checks.naive_memory()
    q, k, v = checks.memory_inputs(1)
    for source, says in ((mistakes.MATERIALISES_FA1, "never build the [N, N] scores"),
                         (mistakes.SDPA_FA1, "not a library's fused attention"),
                         (mistakes.NUMPY_FA1, "resident memory grew")):
        fn = with_cell(reference, source)["tiled_attention"]
        with checks.ResidentPeak(os.getpid()) as resident:
            out, measured = checks.measure_peak(lambda: fn(q, k, v, causal=True, block_q=128, block_k=128))
        result = run_check("FA1", checks.verify_memory, measured, out, (q, k, v), naive, resident.growth_bytes)
        assert result.status == FAILED and says in result.message, (source[:60], result.line())


def test_bypassed_seam_and_byte_mistakes_are_caught(reference):
    ns = with_edit(reference, "fa2-solution", mistakes.BYPASS_SEAM)
    result = run_check("FA2", checks.check_fa2, ns["flash_attention_forward"], ns["flash_attention_fn"], ns)
    assert result.status == FAILED and "called flash_attention_forward 0 times" in result.message, result.line()
    ns = with_edit(reference, "fa3-solution", mistakes.CAUSAL_IGNORED_FA3)
    result = run_check("FA3", checks.check_fa3, ns["flash_bytes_moved"], ns["naive_bytes_moved"])
    assert result.status == FAILED and "causal=True" in result.message, result.line()
    ns = with_edit(reference, "fa4-solution", mistakes.NO_SCALE_FA4)
    result = run_check("FA4", checks.check_fa4, ns["flash_attention_backward"])
    assert result.status == FAILED and "dq" in result.message, result.line()


def test_the_public_module_holds_no_answer():
    text = Path(checks.__file__).read_text()
    for answer in ("@triton.jit", "def tiled_attention", "def flash_bytes_moved", "def flash_attention_backward",
                   "alpha"):
        assert answer not in text, answer
    assert checks.public_expected() == grading.public_expected()


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB.name, tmp_path)
    assert set(paths) == set(mistakes.SAMPLES)
    edited = notebook.read(paths["mistakes"])
    assert "l = l + p.sum(-1, keepdim=True)" in notebook.cell(edited, "fa1-solution").source


# ---------------------------------------------------------------- the check stage: the autograder's verdicts

# Every sample but two whose catches are shown in-process above (numpy work, SDPA), and the attack.
BATCH = ("reference", "stub", "different", "mistakes", "not-tiled")
ATTACK_BATCH = ("forged-meter",)
GRADES = {**{name: mistakes.SAMPLES[name]["expected"] for name in BATCH},
          **{name: attacks.ATTACKS[name]["expected"] for name in ATTACK_BATCH}}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("samples")
    paths = {**samples.build(LAB.name, out_dir, list(BATCH)),
             **samples.build(LAB.name, out_dir, list(ATTACK_BATCH), kind="attacks")}
    return check_batch(LAB, {name: (lambda name=name: prepare(notebook.read(SOURCE), notebook.read(paths[name])))
                             for name in GRADES}, tmp_path_factory, seed_offset=7)


@needs_bwrap
@pytest.mark.parametrize("name", list(GRADES))
def test_check_stage_gives_each_sample_its_grade(checked, name):
    points, results, tampered = checked[name]
    assert points == GRADES[name], {t: r.line() for t, r in results.items()}
    flagged = attacks.ATTACKS[name]["flags"] if name in attacks.ATTACKS else mistakes.SAMPLES[name]["flags"]
    assert bool(tampered) == flagged, tampered


@needs_bwrap
def test_check_stage_reads_memory_from_outside(checked):
    _, results, _ = checked["reference"]
    measured = results["FA1"].measured
    assert isinstance(measured["rss_growth_bytes"], int), measured
    assert measured["ratio_to_naive"] < 0.1
    _, forged, tampered = checked["forged-meter"]
    assert "resident memory grew" in forged["FA1"].message, forged["FA1"].line()
    assert any("measure_peak" in name for name in tampered), tampered
    _, stub, _ = checked["stub"]
    assert all(r.status == NOT_ATTEMPTED for r in stub.values()), {t: r.line() for t, r in stub.items()}
