"""The paged_attention lab: the reference and a solution written differently pass, the stub is 'not attempted', each
known mistake is caught with a message that names it, and the checker's own bookkeeping (the oracle allocator and the
simulated schedule) agrees with the reference solution.

Two halves. The checks' logic (`grader.labs.paged_attention.public`) runs here in-process, as a notebook's
self-checks run it, on the known mistakes (the edits `grader/labs/paged_attention/samples.py` defines), on public
and drawn seeds. Then one batch of answer variants goes through `grader.check_stage` as the autograder runs it
(bubblewrap, one answers process each, the batcher's model served from the checker): the reference, the stub, a
solution written differently, and one submission with a mistake for every check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import check_batch
from grader import labs, notebook, samples
from grader.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.paged_attention import grading
from grader.labs.paged_attention import public as checks
from grader.labs.paged_attention import samples as mistakes

LAB = labs.load("paged_attention")
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "solutions" / LAB.name / f"{LAB.name}.ipynb"
ANSWER_CELLS = ["pa1-solution", "pa2-solution", "pa3-solution", "pa4-solution"]
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    yield notebook.exec_cells(notebook.read(SOURCE), list(LAB.spec.reference_cells))
    torch.set_num_threads(threads)  # the notebook's setup pins one thread; leave the session as it was


@pytest.fixture(scope="module")
def stub(reference):
    ns = dict(reference)
    for cell_id in ANSWER_CELLS:
        exec(notebook.strip_solutions(notebook.cell(notebook.read(SOURCE), cell_id).source,
                                      f'raise NotImplementedError("Task {cell_id[:3].upper()} stub")'), ns)
    return ns


def with_cell(reference, source: str) -> dict:
    ns = dict(reference)
    exec(source, ns)
    return ns


def scripts_check(task: str, cls, seed: int):
    """PA1/PA3's hidden check, in-process: the fixed and drawn scripts against the oracle's states."""
    scripts = grading.pa1_scripts(seed) if task == "PA1" else grading.pa3_scripts(seed)
    return run_check(task, checks.verify_scripts, lambda s: checks.run_script(cls, s), scripts,
                     [grading.expected_states(s) for s in scripts], task)


def batcher_check(cls, seed: int):
    reference_mean = grading.paged_schedule(checks.batch_case(seed))["mean_concurrency"]
    bar = grading.threshold(LAB.name, "PA4", "cpu")["min_fraction_of_reference"]
    return run_check("PA4", checks.verify_batcher, lambda case, model: checks.LocalBatcher(cls, model, case), seed,
                     reference_mean, bar)


# ---------------------------------------------------------------- a solution written differently

DIFFERENT_PA1 = '''
class BlockAllocator:
    # Lists and explicit counts: the free list is a plain list, a table grows as tokens arrive.
    def __init__(self, num_blocks, block_size):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_block_ids = list(range(num_blocks))
        self.ref_counts = [0 for _ in range(num_blocks)]
        self.block_tables, self.seq_tokens = {}, {}

    def blocks_needed(self, num_tokens):
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, num_tokens):
        return self.blocks_needed(num_tokens) <= len(self.free_block_ids)

    def _take_block(self):
        block = self.free_block_ids.pop(0)
        self.ref_counts[block] += 1
        return block

    def allocate(self, seq_id, token_ids):
        self.block_tables[seq_id], self.seq_tokens[seq_id] = [], []
        for token in token_ids:
            if len(self.seq_tokens[seq_id]) % self.block_size == 0:
                self.block_tables[seq_id].append(self._take_block())
            self.seq_tokens[seq_id].append(token)
        return list(self.block_tables[seq_id])

    def can_append(self, seq_id):
        full = len(self.seq_tokens[seq_id]) % self.block_size == 0
        shared = not full and self.ref_counts[self.block_tables[seq_id][-1]] >= 2
        return bool(self.free_block_ids) or not (full or shared)

    def append(self, seq_id, token_id):
        table, result = self.block_tables[seq_id], None
        if len(self.seq_tokens[seq_id]) % self.block_size == 0:
            table.append(self._take_block())
        elif self.ref_counts[table[-1]] >= 2:
            fresh = self._take_block()
            self.ref_counts[table[-1]] -= 1
            result = (table[-1], fresh)
            table[-1] = fresh
        self.seq_tokens[seq_id].append(token_id)
        return result

    def fork(self, parent_id, child_id):
        self.block_tables[child_id] = self.block_tables[parent_id][:]
        self.seq_tokens[child_id] = self.seq_tokens[parent_id][:]
        for block in self.block_tables[child_id]:
            self.ref_counts[block] += 1
        return self.block_tables[child_id][:]

    def free(self, seq_id):
        table = self.block_tables.pop(seq_id)
        self.seq_tokens.pop(seq_id)
        for block in table[::-1]:
            self.ref_counts[block] -= 1
            if not self.ref_counts[block]:
                self.free_block_ids.append(block)
'''
DIFFERENT_PA2 = '''
class PagedKVCache:
    # One [num_blocks * block_size] slot axis per layer; a view turns positions into slot numbers.
    def __init__(self, args, num_blocks, block_size, dtype=torch.float32, device="cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = torch.zeros(args.n_layers, args.n_kv_heads, num_blocks * block_size, args.head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def view(self, block_tables):
        return BlockTableView(self, block_tables)

    def copy_block(self, src, dst):
        size = self.block_size
        self.k[:, :, dst * size:(dst + 1) * size] = self.k[:, :, src * size:(src + 1) * size].clone()
        self.v[:, :, dst * size:(dst + 1) * size] = self.v[:, :, src * size:(src + 1) * size].clone()

    @property
    def nbytes(self):
        return self.k.numel() * self.k.element_size() * 2


class BlockTableView:
    def __init__(self, cache, block_tables):
        self.cache, self.block_tables = cache, [list(t) for t in block_tables]

    def slots(self, row, positions):
        size = self.cache.block_size
        return [self.block_tables[row][p // size] * size + p % size for p in positions]

    def update(self, layer, input_pos, k, v):
        batch, new = k.shape[0], k.shape[2]
        pos = input_pos if input_pos.dim() == 2 else input_pos.expand(batch, new)
        for row in range(batch):
            index = torch.tensor(self.slots(row, pos[row].tolist()))
            self.cache.k[layer, :, index] = k[row]
            self.cache.v[layer, :, index] = v[row]
        end = int(pos.max()) + 1
        keys, values = [], []
        for row in range(batch):
            index = torch.tensor(self.slots(row, [p if p // self.cache.block_size < len(self.block_tables[row])
                                                  else 0 for p in range(end)]))
            keys.append(self.cache.k[layer, :, index])
            values.append(self.cache.v[layer, :, index])
        return torch.stack(keys), torch.stack(values)
'''
DIFFERENT_PA3 = '''
class PrefixCachingAllocator(BlockAllocator):
    def __init__(self, num_blocks, block_size):
        super().__init__(num_blocks, block_size)
        self.hash_to_block = {}
        self.block_hashes = [None] * num_blocks
        self.block_token_ids = [None] * num_blocks
        self.num_cached_tokens = {}

    @staticmethod
    def block_hash(parent_hash, token_ids):
        return hash((parent_hash, tuple(token_ids)))

    def _take_block(self):
        block = super()._take_block()
        if self.block_hashes[block] is not None and self.hash_to_block.get(self.block_hashes[block]) == block:
            self.hash_to_block.pop(self.block_hashes[block])
        self.block_hashes[block] = None
        self.block_token_ids[block] = None
        return block

    def _full_chunks(self, tokens):
        size = self.block_size
        return [tuple(tokens[i:i + size]) for i in range(0, len(tokens) - size + 1, size)]

    def allocate(self, seq_id, token_ids):
        chunks, hits, parent = self._full_chunks(token_ids), [], -1
        for chunk in chunks[:(len(token_ids) - 1) // self.block_size]:
            h = self.block_hash(parent, chunk)
            block = self.hash_to_block.get(h)
            if block is None or self.block_token_ids[block] != chunk:
                break
            hits.append(block)
            parent = h
        for block in hits:
            if block in self.free_block_ids:
                self.free_block_ids.remove(block)
            self.ref_counts[block] += 1
        rest = token_ids[len(hits) * self.block_size:]
        fresh = [self._take_block() for _ in range(self.blocks_needed(len(rest)))]
        for block, chunk in zip(fresh, self._full_chunks(rest)):
            parent = self.block_hash(parent, chunk)
            self.block_hashes[block], self.block_token_ids[block] = parent, chunk
            self.hash_to_block[parent] = block
        self.block_tables[seq_id], self.seq_tokens[seq_id] = hits + fresh, list(token_ids)
        self.num_cached_tokens[seq_id] = len(hits) * self.block_size
        return hits + fresh

    def append(self, seq_id, token_id):
        copy = super().append(seq_id, token_id)
        tokens, table = self.seq_tokens[seq_id], self.block_tables[seq_id]
        if len(tokens) % self.block_size == 0:
            parent = -1 if len(table) == 1 else self.block_hashes[table[-2]]
            h = self.block_hash(parent, tokens[-self.block_size:])
            self.block_hashes[table[-1]], self.block_token_ids[table[-1]] = h, tuple(tokens[-self.block_size:])
            self.hash_to_block[h] = table[-1]
        return copy
'''
DIFFERENT_PA4 = '''
class PagedBatcher:
    # Requests as dicts; room is made newest-first from a stack of the running ones.
    def __init__(self, model, num_blocks, block_size, max_batch_size, eos_id=None):
        self.model, self.max_batch_size, self.eos_id = model, max_batch_size, eos_id
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.cache = PagedKVCache(model.args, num_blocks, block_size)
        self.waiting, self.running = [], []

    def add_request(self, request_id, prompt, max_new_tokens):
        self.waiting.append({"id": request_id, "prompt": list(prompt), "n": max_new_tokens, "out": []})

    @property
    def has_unfinished(self):
        return len(self.waiting) + len(self.running) > 0

    def _done(self, r):
        return len(r["out"]) == r["n"] or (self.eos_id is not None and r["out"][-1] == self.eos_id)

    def step(self):
        out = {}
        with torch.no_grad():
            kept = []
            for r in list(self.running):
                if r not in self.running:
                    continue
                while not self.allocator.can_append(r["id"]) and self.running[-1] is not r:
                    victim = self.running.pop()
                    self.allocator.free(victim["id"])
                    self.waiting.insert(0, victim)
                if not self.allocator.can_append(r["id"]):
                    self.running.pop()
                    self.allocator.free(r["id"])
                    self.waiting.insert(0, r)
                    continue
                pair = self.allocator.append(r["id"], r["out"][-1])
                if pair:
                    self.cache.copy_block(*pair)
            if self.running:
                view = self.cache.view([self.allocator.block_tables[r["id"]] for r in self.running])
                last = torch.tensor([[r["out"][-1]] for r in self.running])
                pos = torch.tensor([[len(r["prompt"]) + len(r["out"]) - 1] for r in self.running])
                chosen = self.model(last, pos, view)[:, 0].argmax(-1).tolist()
                for r, token in zip(list(self.running), chosen):
                    r["out"].append(token)
                    out[r["id"]] = token
                    if self._done(r):
                        self.running.remove(r)
                        self.allocator.free(r["id"])
            while self.waiting and len(self.running) < self.max_batch_size:
                r = self.waiting[0]
                context = r["prompt"] + r["out"]
                if not self.allocator.can_allocate(len(context)):
                    break
                self.waiting.pop(0)
                table = self.allocator.allocate(r["id"], context)
                logits = self.model(torch.tensor([context]), torch.arange(len(context)), self.cache.view([table]))
                r["out"].append(int(logits[0, -1].argmax()))
                out[r["id"]] = r["out"][-1]
                if self._done(r):
                    self.allocator.free(r["id"])
                else:
                    self.running.append(r)
        return out
'''
DIFFERENT = {"pa1-solution": DIFFERENT_PA1, "pa2-solution": DIFFERENT_PA2, "pa3-solution": DIFFERENT_PA3,
             "pa4-solution": DIFFERENT_PA4}


# ---------------------------------------------------------------- the checks, in-process

@pytest.mark.parametrize("seed", [checks.PUBLIC_SEED, 7])
def test_reference_passes_every_check_on_public_and_drawn_inputs(reference, seed):
    if seed == checks.PUBLIC_SEED:  # the self-checks, on the stored public values
        for task, check, name in (("PA1", checks.check_pa1, "BlockAllocator"), ("PA2", checks.check_pa2, "PagedKVCache"),
                                  ("PA3", checks.check_pa3, "PrefixCachingAllocator"),
                                  ("PA4", checks.check_pa4, "PagedBatcher")):
            result = run_check(task, check, reference[name])
            assert result.status == PASSED, result.line()
    else:  # the hidden checks' logic, on a drawn seed
        for result in (scripts_check("PA1", reference["BlockAllocator"], seed),
                       run_check("PA2", checks.check_pa2, reference["PagedKVCache"], seed=seed),
                       scripts_check("PA3", reference["PrefixCachingAllocator"], seed)):
            assert result.status == PASSED, result.line()


def test_a_solution_written_differently_passes(reference):
    ns = dict(reference)
    for source in DIFFERENT.values():
        exec(source, ns)
    for result in (scripts_check("PA1", ns["BlockAllocator"], 3), run_check("PA2", checks.check_pa2, ns["PagedKVCache"],
                                                                            seed=3),
                   scripts_check("PA3", ns["PrefixCachingAllocator"], 3)):
        assert result.status == PASSED, result.line()


def test_the_oracle_and_the_reference_agree_on_many_random_scripts(reference):
    """The checker's own allocator (grading.Allocator) and the notebook's give the same states on 40 drawn scripts."""
    for seed in range(20):
        for prefix, cls in ((False, reference["BlockAllocator"]), (True, reference["PrefixCachingAllocator"])):
            script = grading.random_script(seed, prefix)
            assert checks.run_script(cls, script) == grading.expected_states(script), (seed, prefix)


def test_drawn_scripts_cover_every_operation_and_edge():
    ops, results = set(), set()
    for seed in range(6):
        for prefix in (False, True):
            script = grading.random_script(seed, prefix)
            ops |= {op[0] for op in script["ops"]}
            results |= {repr(s["result"]) for s in grading.expected_states(script) if isinstance(s["result"], bool)}
    assert ops == {"allocate", "append", "fork", "free", "can_allocate", "can_append"} and results == {"True", "False"}
    # copy on write happens, and a prefix hit, in the fixed scripts
    states = [grading.expected_states(s) for s in grading.fixed_pa1_scripts()]
    assert any(op[0] == "append" and isinstance(s["result"], list) for script, st in zip(grading.fixed_pa1_scripts(),
                                                                                            states)
               for op, s in zip(script["ops"], st))
    assert any(n > 0 for script in grading.fixed_pa3_scripts() for s in grading.expected_states(script)
               for _, n in s["cached"])
    assert grading.pa1_scripts(1) != grading.pa1_scripts(2)


def test_simulated_schedule_equals_the_reference_batcher(reference):
    """PA4's bar is a fraction of the concurrency `paged_schedule` computes from the lengths alone: it must be the
    reference batcher's, counted where the model runs."""
    for seed in (1, 5):
        case = checks.batch_case(seed)
        batcher = checks.LocalBatcher(reference["PagedBatcher"], checks.batch_model(case), case)
        with torch.no_grad():
            run = checks.run_batch(batcher, case)
        batcher.close()
        assert float(np.mean(run["pressed_rows"] or run["decode_rows"])) == grading.paged_schedule(case)["mean_concurrency"]
        assert run["prefills"] - len(case["requests"]) == grading.paged_schedule(case)["preemptions"] > 0


def test_stub_is_not_attempted_with_task_id(stub):
    for task, check, name in (("PA1", checks.check_pa1, "BlockAllocator"), ("PA2", checks.check_pa2, "PagedKVCache"),
                              ("PA3", checks.check_pa3, "PrefixCachingAllocator"),
                              ("PA4", checks.check_pa4, "PagedBatcher")):
        result = run_check(task, check, stub[name])
        assert result.status == NOT_ATTEMPTED and "Task PA" in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.FORGETS_DECREF, "ref_counts is"),
    (mistakes.NO_COPY_ON_WRITE, "append returns (src, dst)"),
    (mistakes.FREES_TO_FRONT, "free_block_ids is"),
], ids=["forgets-decref", "no-copy-on-write", "frees-to-front"])
def test_pa1_mistakes_are_caught(reference, edits, says):
    ns = with_cell(reference, mistakes.edited("pa1-solution", edits))
    result = scripts_check("PA1", ns["BlockAllocator"], 11)
    assert result.status == FAILED and says in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.OFF_BY_ONE_BLOCK, "block_tables[row][p // block_size]"),
    (mistakes.COPIES_ONE_LAYER, "copy_block(src, dst) copies every layer"),
], ids=["off-by-one-block", "copies-one-layer"])
def test_pa2_mistakes_are_caught(reference, edits, says):
    ns = with_cell(reference, mistakes.edited("pa2-solution", edits))
    for seed in (0, 4):
        result = run_check("PA2", checks.check_pa2, ns["PagedKVCache"], seed=seed)
        assert result.status in (FAILED, ERROR) and says in result.message, result.line()


def test_a_cache_that_holds_memory_per_sequence_is_caught(reference):
    ns = with_cell(reference, mistakes.edited("pa2-solution", [
        ("        self.v = torch.zeros(shape, dtype=dtype, device=device)\n",
         "        self.v = torch.zeros(shape, dtype=dtype, device=device)\n"
         "        self.spare = torch.zeros(num_blocks, args.max_seq_len)  # a max-length buffer on the side\n")]))
    result = run_check("PA2", checks.check_pa2, ns["PagedKVCache"])
    assert result.status == FAILED and "its tensors hold" in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.NO_TOKEN_CHECK, "colliding hash"),
    (mistakes.CACHES_LAST_BLOCK, "prompt fully cached on a block boundary"),
], ids=["no-token-check", "caches-last-block"])
def test_pa3_mistakes_are_caught(reference, edits, says):
    ns = with_cell(reference, mistakes.edited("pa3-solution", edits))
    result = run_check("PA3", checks.check_pa3, ns["PrefixCachingAllocator"])
    assert result.status == FAILED and says in result.message, result.line()


@pytest.mark.parametrize("edits, says", [
    (mistakes.RESERVES_UP_FRONT, "do not reserve slots for tokens not generated yet"),
    (mistakes.PREEMPT_FORGETS_TOKENS, "tokens for max_new_tokens="),
], ids=["reserves-up-front", "preempt-forgets-tokens"])
def test_pa4_mistakes_are_caught(reference, edits, says):
    ns = with_cell(reference, mistakes.edited("pa4-solution", edits))
    result = batcher_check(ns["PagedBatcher"], 2)
    assert result.status == FAILED and says in result.message, result.line()


def test_the_public_module_holds_no_answer():
    """What a notebook imports as `checks` allocates nothing and schedules nothing: the oracle lives in grading.py."""
    text = Path(checks.__file__).read_text()
    for answer in ("class BlockAllocator", "def allocate", "hash_to_block", "def paged_schedule", "free.pop(0)",
                   "popleft()"):
        assert answer not in text, answer


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB.name, tmp_path)
    assert set(paths) == set(mistakes.SAMPLES)
    built = notebook.read(paths["off-by-one-block"])
    assert "(positions + 1) // size" in notebook.cell(built, "pa2-solution").source


def test_the_release_leaks_no_solution():
    """The release itself is regenerated and compared by tests/test_release.py; here, the lines that would answer."""
    released = (ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb").read_text()
    for line in ("self.free_block_ids.popleft()", "self.tables.gather(1, positions // size)",
                 "cacheable = (len(token_ids) - 1) // size", "preempt(self.running[-1])"):
        assert line not in released, line


# ---------------------------------------------------------------- the check stage: the autograder's verdicts

def variant(cells: dict[str, str] | None = None, from_release: bool = False):
    nb = notebook.read(ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb") if from_release else samples.solved(LAB.name)
    for gid, source in (cells or {}).items():
        notebook.cell(nb, gid).source = source
    return prepare(notebook.read(SOURCE), nb)


# One submission with one mistake per check: a leaked reference (PA1), an off-by-one block index (PA2), a hash
# trusted without comparing tokens (PA3), and blocks reserved up front (PA4, caught at its first step by the
# block count, before the wrong tokens of PA2's cache could show).
MISTAKES = {"pa1-solution": mistakes.edited("pa1-solution", mistakes.FORGETS_DECREF),
            "pa2-solution": mistakes.edited("pa2-solution", mistakes.OFF_BY_ONE_BLOCK),
            "pa3-solution": mistakes.edited("pa3-solution", mistakes.NO_TOKEN_CHECK),
            "pa4-solution": mistakes.edited("pa4-solution", mistakes.RESERVES_UP_FRONT)}
VARIANTS = {
    "reference": (variant(), mistakes.ALL),
    "stub": (variant(from_release=True), mistakes.NONE),
    "different-but-correct": (variant(DIFFERENT), mistakes.ALL),
    "one-mistake-per-check": (variant(MISTAKES), mistakes.NONE),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Each variant through the check stage once: {name: (points by task, outcomes)}."""
    return check_batch(LAB, {name: nb for name, (nb, _) in VARIANTS.items()}, tmp_path_factory)


@needs_bwrap
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_gets_what_a_careful_grader_gives(checked, name):
    points, results, _ = checked[name]
    assert points == VARIANTS[name][1], "\n".join(r.line() for r in results.values())


@needs_bwrap
def test_the_checker_counts_concurrency_and_names_each_mistake(checked):
    _, ref, _ = checked["reference"]
    pa4 = ref["PA4"].measured
    assert pa4["fraction_of_reference"] == 1.0 and pa4["concurrency_vs_reservation"] > 1.5, pa4
    assert pa4["paged_waste"] < 0.2 < pa4["reservation_waste"], pa4
    _, bad, _ = checked["one-mistake-per-check"]
    assert "ref_counts is" in bad["PA1"].message, bad["PA1"].line()
    assert "differ from contiguous attention" in bad["PA2"].message, bad["PA2"].line()
    assert "colliding hash" in bad["PA3"].message, bad["PA3"].line()
    assert "do not reserve slots" in bad["PA4"].message, bad["PA4"].line()
    _, stub, _ = checked["stub"]
    assert all(r.status == NOT_ATTEMPTED and "PA" in r.message for r in stub.values())


def test_grading_side_is_what_the_registry_finds():
    assert LAB.grading is grading and set(grading.HIDDEN_CHECKS) == {t.id for t in LAB.spec.tasks}
    assert LAB.timed is None and not LAB.calibrates
