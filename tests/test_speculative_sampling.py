"""The speculative_sampling lab: the reference and a solution written differently pass, the stub is 'not attempted',
each known mistake is caught with a message that names it, the target's calls are counted where the model runs, and
the distribution test tells the exact sampler from wrong ones across 50 grading seeds, and the timed task (SS5) passes
the reference and fails a correct answer that verifies without its cache.

Two halves. The checks' logic (`grader.labs.speculative_sampling.public`) runs here in-process, as a notebook's
self-checks run it, on the known mistakes (the edits `grader/labs/speculative_sampling/samples.py` defines). Then
one batch of answer variants goes through `grader.check_stage` as the autograder runs it (bubblewrap, one answers
process each, the target and the draft model served from the checker). Last, SS5 through the real timing stage.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from grader import check_stage, labs, notebook, samples
from grader.checks import ERROR, FAILED, INCONCLUSIVE, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.speculative_sampling import grading
from grader.labs.speculative_sampling import public as checks
from grader.labs.speculative_sampling import samples as mistakes
from grader.sandbox import Limits

LAB = labs.load("speculative_sampling")
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "solutions" / LAB.name / f"{LAB.name}.ipynb"
ANSWER_CELLS = ["ss1-solution", "ss2-solution", "ss3-solution", "ss4-solution"]
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def edited(cell_id: str, edit: tuple[str, str]) -> str:
    source = notebook.cell(samples.solved(LAB.name), cell_id).source
    assert edit[0] in source, f"sample edit of {cell_id} no longer applies: {edit[0]!r}"
    return source.replace(*edit)


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    yield notebook.exec_cells(notebook.read(SOURCE), list(LAB.spec.reference_cells))
    torch.set_num_threads(threads)  # the notebook's setup pins one thread; leave the session as it was


def with_cell(reference, source: str) -> dict:
    ns = dict(reference)
    exec(source, ns)
    return ns


def run(task: str, ns: dict, seed: int = checks.PUBLIC_SEED):
    args = {"SS1": ("RollbackKVCache",), "SS2": ("DraftModelDrafter", "speculative_generate"),
            "SS3": ("verify_drafts",), "SS4": ("PromptLookupDrafter", "speculative_generate"),
            "SS5": ("PromptLookupDrafter", "speculative_generate")}[task]
    check = getattr(checks, f"check_{task.lower()}")
    return run_check(task, check, *(ns[a] for a in args), seed=seed)


# ---------------------------------------------------------------- the checks' logic, in-process

def test_reference_passes_the_cheap_checks_on_public_and_drawn_inputs(reference):
    """SS2 and SS4 on the public seed run in the solution notebook's test, and on drawn seeds in the batch below."""
    for task in ("SS1", "SS3"):
        for seed in (checks.PUBLIC_SEED, 12345):
            result = run(task, reference, seed=seed)
            assert result.status == PASSED, result.line()


def test_stub_is_not_attempted_with_task_id(reference):
    nb = notebook.read(SOURCE)
    ns = dict(reference)
    for cell_id in ANSWER_CELLS:
        exec(notebook.strip_solutions(notebook.cell(nb, cell_id).source,
                                      f'raise NotImplementedError("Task {cell_id[:3].upper()} stub")'), ns)
    for task in ("SS1", "SS2", "SS3", "SS4"):
        result = run(task, ns)
        assert result.status == NOT_ATTEMPTED and task in result.message, result.line()
    result = run("SS5", ns)  # nothing of its own to write: the stub it runs into is SS2's
    assert result.status == NOT_ATTEMPTED and "SS2" in result.message, result.line()


@pytest.mark.parametrize("edit, says", [
    (mistakes.NO_ROLLBACK_SS2, "roll the draft cache back"),
    (mistakes.PER_TOKEN_SS2, "verify all gamma drafts in ONE target call"),
    (mistakes.PEEK_TARGET_SS2, "the draft model's greedy continuation"),
])
def test_ss2_mistakes_are_caught(reference, edit, says):
    result = run("SS2", with_cell(reference, edited("ss2-solution", edit)))
    assert result.status == FAILED and says in result.message, result.line()


@pytest.mark.parametrize("edit", [mistakes.NO_RESIDUAL_SS3, mistakes.P_MINUS_Q_SS3, mistakes.ALWAYS_ACCEPT_SS3,
                                  mistakes.GREEDY_ONLY_SS3])
def test_ss3_mistakes_are_caught(reference, edit):
    result = run("SS3", with_cell(reference, edited("ss3-solution", edit)))
    assert result.status == FAILED and "does not follow the target's distribution" in result.message, result.line()


def test_rollback_mistakes_are_caught(reference):
    no_length = edited("ss1-solution", ("        self.length = length\n", "        pass\n"))
    result = run("SS1", with_cell(reference, no_length))
    assert result.status == FAILED and "after rollback" in result.message, result.line()
    appends = '''
class RollbackKVCache:
    # Appends at its own length and never rolls back: the tokens after a rejection land after the rejected ones.
    def __init__(self, args, batch_size, max_seq_len, dtype=torch.float32, device="cpu"):
        self.k = torch.zeros(args.n_layers, batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.v = torch.zeros_like(self.k)
        self.length, self.written = 0, [0] * args.n_layers

    def update(self, layer, input_pos, k, v):
        start = self.written[layer]
        self.k[layer, :, :, start:start + k.shape[2]] = k
        self.v[layer, :, :, start:start + k.shape[2]] = v
        self.written[layer] += k.shape[2]
        self.length = self.written[layer]
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

    def rollback(self, length):
        self.length = length
'''
    result = run("SS1", with_cell(reference, appends))
    assert result.status == FAILED and "differ from recomputing" in result.message, result.line()


def test_lookup_mistakes_are_caught(reference):
    copies_the_match = edited("ss4-solution", ("return list(tokens[start + n:start + n + gamma])",  # the n-gram,
                                               "return list(tokens[start:start + gamma])"))  # not what follows it
    result = run("SS4", with_cell(reference, copies_the_match))
    assert result.status == FAILED and "propose the tokens that followed it" in result.message, result.line()
    made_up = "class PromptLookupDrafter:\n    def __init__(self, max_ngram=3):\n        pass\n\n" \
              "    def propose(self, tokens, gamma):\n        return tokens[-gamma:]\n"
    result = run("SS4", with_cell(reference, made_up))
    assert result.status == FAILED and "propose" in result.message, result.line()


def test_ss5_times_only_prompt_lookup_that_is_right_and_saves_calls(reference):
    """The gate of the timed task, in-process: the reference and the answer that verifies without its cache are both
    right with fewer target calls than tokens (only the clock tells them apart); one call per token is not."""
    from inferlab import load_model

    target = load_model("tiny")
    for ns in (reference, with_cell(reference, edited("ss2-solution", mistakes.RECOMPUTE_VERIFY_SS2))):
        generate = checks.counted(ns["speculative_generate"], target, lambda: ns["PromptLookupDrafter"](3))
        result = run_check("SS5", checks.verify_timed_ready, generate, 4, target)
        assert result.passed and result.measured["target_calls_per_token"] < 0.9, result.line()
    per_token = with_cell(reference, edited("ss2-solution", mistakes.PER_TOKEN_SS2))
    generate = checks.counted(per_token["speculative_generate"], target, lambda: per_token["PromptLookupDrafter"](3))
    result = run_check("SS5", checks.verify_timed_ready, generate, 4, target)
    assert result.status == FAILED and "make SS4 pass first" in result.message, result.line()


def test_a_crash_in_learner_code_is_an_error_with_its_line(reference):
    crashes = "def verify_drafts(*args, **kwargs):\n    return [1 / 0]\n"
    result = run("SS3", with_cell(reference, crashes))
    assert result.status == ERROR and "ZeroDivisionError" in result.message, result.line()


# ---------------------------------------------------------------- the distribution test across 50 grading seeds

def vectorized_sampler(rule: str):
    """The verify step for all of a case's draft sets at once: 'exact', or a known mistake ('no-residual', 'p-minus-q').
    The same maths as the notebook's loop, vectorized so that 50 seeds cost a second."""
    def sample(case):
        gamma, T, drafts = case["gamma"], case["temperature"], case["drafts"]  # drafts [N, gamma]
        p = checks.filtered_probs(case["target_logits"] / T, case["top_k"], case["top_p"])  # [gamma + 1, V]
        q = checks.filtered_probs(case["draft_logits"] / T, case["top_k"], case["top_p"])  # [gamma, V]
        gen = torch.Generator().manual_seed(case["sampler_seed"])
        n = drafts.shape[0]
        rows = torch.arange(gamma)
        p_x, q_x = p[rows, drafts], q[rows, drafts]  # [N, gamma]
        u = torch.rand(n, gamma, generator=gen)
        accept = (u < p_x - q_x) if rule == "p-minus-q" else (u * q_x < p_x)
        k = torch.where(accept.all(1), gamma, (~accept).float().argmax(1))  # [N]: drafts accepted
        replacement = []
        for i in range(gamma):
            dist = p[i] if rule == "no-residual" else (p[i] - q[i]).clamp(min=0)
            replacement.append(torch.multinomial(dist / dist.sum(), n, replacement=True, generator=gen))
        replacement.append(torch.multinomial(p[gamma], n, replacement=True, generator=gen))
        last = torch.stack(replacement, 1)[torch.arange(n), k]  # [N]
        places = torch.arange(gamma + 1)[None, :]  # [1, gamma + 1]
        out = torch.where(places < k[:, None], torch.cat([drafts, drafts[:, :1]], 1), -1)  # accepted drafts, then -1
        return out.scatter(1, k[:, None], last[:, None])
    return sample


def test_the_distribution_check_passes_the_exact_sampler_and_fails_wrong_ones_across_50_seeds(reference):
    """The grading path's verdict (`verify_sampler`) on 50 grading seeds: the exact rule passes every time (each
    test's false-alarm rate is 1e-3 and a failed test is repeated once), skipping the residual or accepting with
    p - q fails every time. The notebook's own verify_drafts passes the same test on 5 of those seeds."""
    greedy = reference["verify_drafts"]
    counts = {}
    for rule in ("exact", "no-residual", "p-minus-q"):
        counts[rule] = sum(run_check("SS3", checks.verify_sampler, vectorized_sampler(rule), greedy, seed).passed
                           for seed in range(1000, 1050))
    print(f"distribution check passes out of 50 grading seeds: {counts}")
    assert counts == {"exact": 50, "no-residual": 0, "p-minus-q": 0}, counts
    for seed in range(1000, 1005):
        assert run("SS3", reference, seed=seed).status == PASSED


# ---------------------------------------------------------------- the check stage: the autograder's verdicts

def variant(cells: dict[str, str] | None = None, from_release: bool = False):
    nb = notebook.read(ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb") if from_release else samples.solved(LAB.name)
    for gid, source in (cells or {}).items():
        notebook.cell(nb, gid).source = source
    return prepare(notebook.read(SOURCE), nb)


D = mistakes
VARIANTS = {
    "reference": (variant(), D.ALL),
    "stub": (variant(from_release=True), {"SS1": 0, "SS2": 0, "SS3": 0, "SS4": 0, "SS5": 0}),
    "different-but-correct": (variant({"ss1-solution": D.DIFFERENT_SS1, "ss2-solution": D.DIFFERENT_SS2,
                                       "ss3-solution": D.DIFFERENT_SS3, "ss4-solution": D.DIFFERENT_SS4}), D.ALL),
    # Two mistakes in one submission each, so that the batch stays small: every check still sees its own.
    "no-rollback+no-residual": (variant({"ss2-solution": edited("ss2-solution", D.NO_ROLLBACK_SS2),
                                         "ss3-solution": edited("ss3-solution", D.NO_RESIDUAL_SS3)}),
                                {"SS1": 2, "SS2": 0, "SS3": 0, "SS4": 0, "SS5": 0}),
    "target-per-token+p-minus-q": (variant({"ss2-solution": edited("ss2-solution", D.PER_TOKEN_SS2),
                                            "ss3-solution": edited("ss3-solution", D.P_MINUS_Q_SS3)}),
                                   {"SS1": 2, "SS2": 0, "SS3": 0, "SS4": 0, "SS5": 0}),
    "peeks-at-target+always-accept": (variant({"ss2-solution": edited("ss2-solution", D.PEEK_TARGET_SS2),
                                               "ss3-solution": edited("ss3-solution", D.ALWAYS_ACCEPT_SS3)}),
                                      {"SS1": 2, "SS2": 0, "SS3": 0, "SS4": 0, "SS5": 0}),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Each variant through the check stage once: {name: (points by task, outcomes)}."""
    out = {}
    for i, (name, (nb, _)) in enumerate(VARIANTS.items()):
        seeds = {t.id: 1000 * i + n for n, t in enumerate(LAB.spec.tasks)}
        outcomes, _ = check_stage.run(LAB, nb, "bwrap", Limits(threads=1), seeds, tmp_path_factory.mktemp(name))
        out[name] = ({o.task: o.points for o in outcomes}, {o.task: o.result for o in outcomes})
    return out


@needs_bwrap
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_gets_what_a_careful_grader_gives(checked, name):
    points, results = checked[name]
    assert points == VARIANTS[name][1], "\n".join(r.line() for r in results.values())


@needs_bwrap
def test_the_checker_counts_the_target_calls_it_serves(checked):
    _, ref = checked["reference"]
    assert ref["SS2"].measured["target_calls_per_token"] < 0.75, ref["SS2"].line()
    _, lazy = checked["target-per-token+p-minus-q"]
    assert "the tokens are right, but the target was called" in lazy["SS2"].message, lazy["SS2"].line()
    assert lazy["SS2"].measured["target_calls"] >= checks.NEW_TOKENS
    _, peek = checked["peeks-at-target+always-accept"]
    assert "the draft model's greedy continuation" in peek["SS2"].message, peek["SS2"].line()
    _, stub = checked["stub"]
    assert all(r.status == NOT_ATTEMPTED and "SS" in r.message for r in stub.values())
    _, broken = checked["no-rollback+no-residual"]
    assert "SS4 builds on SS2, which did not pass" in broken["SS4"].message
    assert "SS5 builds on SS4, which did not pass" in broken["SS5"].message
    assert ref["SS5"].measured["target_calls_per_token"] < 0.9, ref["SS5"].line()


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB.name, tmp_path)
    assert set(paths) == set(mistakes.SAMPLES)
    no_rollback = notebook.cell(notebook.read(paths["no-rollback"]), "ss2-solution").source
    assert "no rollback: the rejected drafts stay" in no_rollback


def test_grading_side_is_what_the_registry_finds():
    assert LAB.grading is grading and set(grading.HIDDEN_CHECKS) == {t.id for t in LAB.spec.tasks}
    assert LAB.spec.task("SS4").requires == ("SS2",) and LAB.spec.task("SS5").requires == ("SS4",)
    assert LAB.timed.task == "SS5" and LAB.timed.gate == "ss5-hidden"


def test_the_public_module_holds_no_answer():
    text = Path(checks.__file__).read_text()
    for answer in ("def speculative_generate", "class RollbackKVCache", "def verify_drafts", "(p[i] - q[i])",
                   "class PromptLookupDrafter"):
        assert answer not in text


# ---------------------------------------------------------------- the timing stage, in bubblewrap

@needs_bwrap
def test_timing_stage_passes_the_reference_and_fails_a_verify_pass_without_the_cache(tmp_path):
    """SS5 through the real timing stage (fewer rounds than grading): cached target-only decoding, the reference's
    prompt lookup and the submission's, interleaved in two sandboxed processes, a held-out code prompt per round. A
    machine too busy to tell is inconclusive, never a wrong verdict."""
    from grader.perf_stage import time_submission

    source = notebook.read(SOURCE)
    spec = dataclasses.replace(LAB.spec.timed, rounds=(3, 6))
    ref = time_submission(LAB.name, prepare(source, samples.solved(LAB.name)), source, "bwrap", Limits(threads=1),
                          seed=11, spec=spec, workdir=tmp_path)
    assert ref.status in (PASSED, INCONCLUSIVE), ref.line()
    slow_nb = samples.solved(LAB.name)
    notebook.cell(slow_nb, "ss2-solution").source = edited("ss2-solution", mistakes.RECOMPUTE_VERIFY_SS2)
    slow = time_submission(LAB.name, prepare(source, slow_nb), source, "bwrap", Limits(threads=1), seed=12,
                           spec=spec, workdir=tmp_path)
    assert slow.status in (FAILED, INCONCLUSIVE), slow.line()
    assert PASSED in (ref.status,) or FAILED in (slow.status,), (ref.line(), slow.line())
    print(f"SS5 timed: reference {ref.line()} | verify without the cache {slow.line()}")
    if slow.status == FAILED:
        assert "prompt-lookup speculation is" in slow.message, slow.line()
