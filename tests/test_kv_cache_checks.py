"""The kv_cache lab's checks: the reference passes, the stub is 'not attempted', known bad code is caught.

The reference is the solution notebook itself (solutions/kv_cache/kv_cache.ipynb), so the
checks are proven against the one source learners' answers are compared with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grader import notebook
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.labs import kv_cache as checks

SOURCE = Path(__file__).resolve().parent.parent / "solutions" / "kv_cache" / "kv_cache.ipynb"
SOLUTION_CELLS = ["setup", "k1-solution", "k2-solution", "k3-solution", "k4-solution"]


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


@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 1, 2, 3])
def test_reference_passes_k1_k3_on_public_and_drawn_inputs(reference, seed):
    for task, args in (("K1", (checks.check_k1, reference["ContiguousKVCache"])),
                       ("K3", (checks.check_k3, reference["kv_cache_bytes"], reference["ContiguousKVCache"]))):
        result = run_check(task, *args, seed=seed)
        assert result.status == PASSED, result.line()


def test_drawn_seeds_change_the_model_shapes():
    import numpy as np

    shapes = {tuple(vars(checks.random_args(np.random.default_rng(s))).values()) for s in range(6)}
    assert len(shapes) >= 4


def test_reference_passes_k2(reference, tiny):
    result = run_check("K2", checks.check_k2, reference["cached_generate"], seed=5, model=tiny, new_tokens=16)
    assert result.status == PASSED, result.line()


def test_reference_passes_k4_measurement(reference, tiny):
    result = run_check("K4", checks.check_k4_measurement, reference["measure_speedups"], tiny, [16, 320], 16)
    assert result.status == PASSED, result.line()
    assert result.measured["speedups"][-1] > result.measured["speedups"][0]


def test_stub_is_not_attempted_with_task_id(stub, tiny):
    results = [
        run_check("K1", checks.check_k1, stub["ContiguousKVCache"]),
        run_check("K2", checks.check_k2, stub["cached_generate"], model=tiny, new_tokens=4),
        run_check("K3", checks.check_k3, stub["kv_cache_bytes"], stub["ContiguousKVCache"]),
        run_check("K4", checks.check_k4_measurement, stub["measure_speedups"], tiny, [16, 32], 4),
    ]
    for r in results:
        assert r.status == NOT_ATTEMPTED, r.line()
        assert f"task {r.task}" in r.message


def test_off_by_one_position_is_caught(reference, tiny):
    """The 'wrong' submission: decode steps at position len(prompt) + i + 1."""
    ns = dict(reference)
    source = notebook.cell(notebook.read(SOURCE), "k2-solution").source
    exec(source.replace("len(prompt) + i]", "len(prompt) + i + 1]"), ns)
    result = run_check("K2", checks.check_k2, ns["cached_generate"], model=tiny, new_tokens=12)
    assert result.status == FAILED and "differs from naive_generate" in result.message, result.line()


def test_cache_writing_the_wrong_slot_is_caught(reference):
    class ShiftedCache(reference["ContiguousKVCache"]):
        def update(self, layer, input_pos, k, v):
            return super().update(layer, input_pos + 1, k, v)

    result = run_check("K1", checks.check_k1, ShiftedCache)
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
        result = run_check("K1", checks.check_k1, RepeatingCache, seed=seed)
        if result.status == FAILED:
            assert "n_kv_heads" in result.message
            break
    else:
        pytest.fail("a cache that stores n_heads copies was never caught")


def test_memory_formula_mistakes_are_caught(reference):
    cache_cls = reference["ContiguousKVCache"]

    def uses_n_heads(args, batch_size, seq_len, dtype):
        return 2 * args.n_layers * args.n_heads * args.head_dim * torch.tensor([], dtype=dtype).element_size() \
            * seq_len * batch_size

    result = run_check("K3", checks.check_k3, uses_n_heads, cache_cls)
    assert result.status == FAILED and "n_kv_heads (not n_heads)" in result.message

    class LyingCache(cache_cls):
        @property
        def nbytes(self):
            return self.k.nbytes  # forgets V

    result = run_check("K3", checks.check_k3, reference["kv_cache_bytes"], LyingCache)
    assert result.status == FAILED and "cache.nbytes says" in result.message


def test_crash_in_learner_code_is_an_error_with_its_line(reference):
    def crashes(args, batch_size, seq_len, dtype):
        return args.n_layerz  # a typo

    result = run_check("K3", checks.check_k3, crashes, reference["ContiguousKVCache"])
    assert result.status == ERROR and "AttributeError" in result.message and "n_layerz" in result.message


def test_k4_times_only_correct_code(reference, tiny):
    """K4's hidden test is the gate to timing: the reference passes it, the off-by-one answer does not."""
    assert run_check("K4", checks.check_k4_ready, reference["cached_generate"], seed=4, model=tiny).passed
    ns = dict(reference)
    exec(notebook.cell(notebook.read(SOURCE), "k2-solution").source.replace(
        "len(prompt) + i]", "len(prompt) + i + 1]"), ns)
    result = run_check("K4", checks.check_k4_ready, ns["cached_generate"], seed=4, model=tiny)
    assert result.status == FAILED and "must first be correct" in result.message, result.line()


def test_code_that_edits_the_model_is_caught(reference, tiny):
    """Dropping layers makes generation faster and, compared on the edited model, 'equal' to the baseline."""
    fast = reference["cached_generate"]

    def drops_layers(model, prompt, n, **kw):
        model.layers = model.layers[:1]
        return fast(model, prompt, n, **kw)

    import copy

    result = run_check("K2", checks.check_k2, drops_layers, model=copy.deepcopy(tiny), new_tokens=6)
    assert result.status == FAILED and "changed the model" in result.message, result.line()


def test_tokens_that_claim_to_equal_anything_are_caught(reference, tiny):
    class AlwaysEqual(int):
        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

        __hash__ = int.__hash__

    def lies(model, prompt, n, **kw):
        return [AlwaysEqual(0)] * n

    result = run_check("K2", checks.check_k2, lies, model=tiny, new_tokens=6)
    assert result.status == FAILED and "differs from naive_generate" in result.message, result.line()
