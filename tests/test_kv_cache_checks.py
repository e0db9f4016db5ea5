"""The kv_cache lab's checks: the reference passes, the stub is 'not attempted', known bad code is caught.

The checks' logic (`grader.labs.kv_cache.public`) runs here in-process, as a notebook's
self-checks run it; the same logic driven out of process by the checker is proven in
tests/test_check_stage.py. The reference is the solution notebook itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from grader import labs, notebook
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.labs.common import random_args
from grader.labs.kv_cache import grading
from grader.labs.kv_cache import public as checks

SOURCE = Path(__file__).resolve().parent.parent / "solutions" / "kv_cache" / "kv_cache.ipynb"
SOLUTION_CELLS = list(labs.load("kv_cache").spec.reference_cells)


@pytest.fixture(scope="module")
def reference():
    return notebook.exec_cells(notebook.read(SOURCE), SOLUTION_CELLS)


@pytest.fixture(scope="module")
def stub():
    nb = notebook.read(SOURCE)
    for cell_id in SOLUTION_CELLS[1:]:
        c = notebook.cell(nb, cell_id)
        c.source = notebook.strip_solutions(c.source)
    return notebook.exec_cells(nb, SOLUTION_CELLS)


def kv3(bytes_fn, cache_cls, seed):
    """KV3 in-process on any seed: expected values from the grading side, as the checker computes them."""
    cases = checks.byte_cases(seed)
    return checks.verify_bytes(bytes_fn, checks.cache_bytes_of(cache_cls), cases, grading.expected_bytes(cases))


@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2, 3])
def test_reference_passes_kv1_kv3_on_public_and_drawn_inputs(reference, seed):
    assert run_check("KV1", checks.check_kv1, reference["ContiguousKVCache"], seed=seed).status == PASSED
    result = run_check("KV3", kv3, reference["kv_cache_bytes"], reference["ContiguousKVCache"], seed)
    assert result.status == PASSED, result.line()


def test_public_self_check_of_kv3_reads_stored_values_that_equal_the_formula(reference):
    """The notebook's KV3 self-check compares with stored values; they are what the grading side computes."""
    assert checks.public_expected() == grading.public_expected()
    assert run_check("KV3", checks.check_kv3, reference["kv_cache_bytes"], reference["ContiguousKVCache"]).passed


def test_the_public_module_holds_no_answer():
    """What a notebook imports as `checks` has no formula for KV3 (it used to: `checks.expected_kv_bytes`)."""
    assert not hasattr(checks, "expected_kv_bytes") and hasattr(grading, "expected_kv_bytes")
    assert "def expected_kv_bytes" not in Path(checks.__file__).read_text()


def test_drawn_seeds_change_the_model_shapes():
    shapes = {tuple(vars(random_args(np.random.default_rng(s))).values()) for s in range(6)}
    assert len(shapes) >= 4


def test_reference_passes_kv2_with_one_position_per_new_token(reference, tiny):
    result = run_check("KV2", checks.verify_generate, checks.counted(reference["cached_generate"]), 5, tiny, 16)
    assert result.status == PASSED, result.line()
    assert result.measured["most_positions_per_new_token"] < 4


def test_recompute_fails_kv2_on_the_work_counted(tiny):
    """The 'slow' sample: right tokens, no cache. A careful grader gives it no KV2 points, and neither does the check."""
    from inferlab import naive_generate

    def recompute(model, prompt, n, **kw):
        return naive_generate(model, prompt, n, **kw)

    result = run_check("KV2", checks.verify_generate, checks.counted(recompute), 5, tiny, 16)
    assert result.status == FAILED and "the tokens are right, but the model processed" in result.message, result.line()


def test_generation_on_another_copy_of_the_model_is_caught(reference, tiny):
    """Right tokens from a model of its own (say, load_model('tiny') again): the model it was given did nothing."""
    from inferlab import load_model

    own = load_model("tiny")

    def elsewhere(model, prompt, n, **kw):
        return reference["cached_generate"](own, prompt, n, **kw)

    result = run_check("KV2", checks.verify_generate, checks.counted(elsewhere), 5, tiny, 8)
    assert result.status in (FAILED, ERROR), result.line()


def test_reference_passes_kv4_measurement(reference, tiny):
    result = run_check("KV4", checks.check_kv4_measurement, reference["measure_speedups"], tiny, [16, 320], 16)
    assert result.status == PASSED, result.line()
    assert result.measured["speedups"][-1] > result.measured["speedups"][0]


def test_stub_is_not_attempted_with_task_id(stub, tiny):
    results = [
        run_check("KV1", checks.check_kv1, stub["ContiguousKVCache"]),
        run_check("KV2", checks.verify_generate, checks.counted(stub["cached_generate"]), 0, tiny, 4),
        run_check("KV3", checks.check_kv3, stub["kv_cache_bytes"], stub["ContiguousKVCache"]),
        run_check("KV4", checks.check_kv4_measurement, stub["measure_speedups"], tiny, [16, 32], 4),
    ]
    for r in results:
        assert r.status == NOT_ATTEMPTED, r.line()
        assert f"task {r.task}".lower() in r.message.lower()


def test_off_by_one_position_is_caught(reference, tiny):
    """The 'wrong' submission: decode steps at position len(prompt) + i + 1."""
    ns = dict(reference)
    source = notebook.cell(notebook.read(SOURCE), "kv2-solution").source
    exec(source.replace("len(prompt) + i]", "len(prompt) + i + 1]"), ns)
    result = run_check("KV2", checks.verify_generate, checks.counted(ns["cached_generate"]), 0, tiny, 12)
    assert result.status == FAILED and "was fed position 29 where position 28 comes next" in result.message, \
        result.line()
    # KV4 is then not timed: it requires KV2 (the lab's spec), whatever the long prompt shows.
    assert "KV2" in labs.load("kv_cache").spec.task("KV4").requires


def test_kv4_times_only_a_cached_generation_on_a_long_prompt(reference, tiny):
    from inferlab import naive_generate

    assert run_check("KV4", checks.verify_ready, checks.counted(reference["cached_generate"]), 4, tiny).passed
    result = run_check("KV4", checks.verify_ready, checks.counted(lambda m, p, n, **kw: naive_generate(m, p, n)), 4, tiny)
    assert result.status == FAILED and "positions" in result.message, result.line()


def test_cache_writing_the_wrong_slot_is_caught(reference):
    class ShiftedCache(reference["ContiguousKVCache"]):
        def update(self, layer, input_pos, k, v):
            return super().update(layer, input_pos + 1, k, v)

    result = run_check("KV1", checks.check_kv1, ShiftedCache)
    assert result.status == FAILED and "differ from recomputing" in result.message, result.line()


def test_cache_that_repeats_kv_heads_is_caught(reference):
    base = reference["ContiguousKVCache"]

    class RepeatingCache(base):
        """Expands K/V to n_heads before storing: correct logits, 'n_heads / n_kv_heads' times the memory."""

        def __init__(self, args, batch_size, max_seq_len, **kw):
            super().__init__(args, batch_size, max_seq_len, **kw)
            self.groups = args.n_heads // args.n_kv_heads
            self.k = self.k.repeat_interleave(self.groups, dim=2)
            self.v = self.v.repeat_interleave(self.groups, dim=2)

        def update(self, layer, input_pos, k, v):
            return super().update(layer, input_pos, k.repeat_interleave(self.groups, 1),
                                  v.repeat_interleave(self.groups, 1))

    for seed in range(10):  # some drawn shapes are MHA, where repeating is harmless; GQA ones must fail
        result = run_check("KV1", checks.check_kv1, RepeatingCache, seed=seed)
        if result.status != PASSED:
            assert "n_kv_heads" in result.message, result.line()
            break
    else:
        pytest.fail("a cache that stores n_heads copies was never caught")


def test_memory_formula_mistakes_are_caught(reference):
    cache_cls = reference["ContiguousKVCache"]

    def uses_n_heads(args, batch_size, seq_len, dtype):
        return 2 * args.n_layers * args.n_heads * args.head_dim * torch.tensor([], dtype=dtype).element_size() \
            * seq_len * batch_size

    result = run_check("KV3", kv3, uses_n_heads, cache_cls, 1)
    assert result.status == FAILED and "n_kv_heads (not n_heads)" in result.message

    class LyingCache(cache_cls):
        @property
        def nbytes(self):
            return self.k.nbytes  # forgets V

    result = run_check("KV3", kv3, reference["kv_cache_bytes"], LyingCache, 1)
    assert result.status == FAILED and "cache.nbytes says" in result.message


def test_crash_in_learner_code_is_an_error_with_its_line(reference):
    def crashes(args, batch_size, seq_len, dtype):
        return args.n_layerz  # a typo

    result = run_check("KV3", kv3, crashes, reference["ContiguousKVCache"], 2)
    assert result.status == ERROR and "AttributeError" in result.message and "n_layerz" in result.message


def test_tokens_that_claim_to_equal_anything_are_caught(tiny):
    class AlwaysEqual(int):
        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

        __hash__ = int.__hash__

    def lies(model, prompt, n, **kw):
        return [AlwaysEqual(0)] * n

    result = run_check("KV2", checks.verify_generate, checks.counted(lies), 0, tiny, 6)
    assert result.status == FAILED and "differs from naive_generate" in result.message, result.line()


@pytest.mark.parametrize("seed", range(6))
def test_an_off_by_one_decode_position_fails_kv2_on_every_seed(seed, tiny):
    """The 'wrong' sample feeds decode steps one position too far, leaving a hole in the cache. Its tokens often
    still match (the hole's zero key gets little attention); the positions fed, counted where the model runs, never
    do: a careful grader gives it no KV2 points, on any seed."""
    nb = notebook.read(SOURCE)
    answer = notebook.cell(nb, "kv2-solution")
    assert "len(prompt) + i]" in answer.source
    answer.source = answer.source.replace("len(prompt) + i]", "len(prompt) + i + 1]")
    wrong = notebook.exec_cells(nb, SOLUTION_CELLS)
    result = run_check("KV2", checks.verify_generate, checks.counted(wrong["cached_generate"]), seed, tiny, 16)
    assert result.status == FAILED, result.line()
