"""Verdicts out of reach of learner code: the checker process, the answers' sandbox, and the lab registry.

One batch of answer variants goes through `grader.check_stage` as the autograder runs it (bubblewrap,
one answers process each): the reference and a correct solution written differently pass; the stub,
the `slow` sample (no cache) and attacks that used to score (reading the checker's state through
frames and the garbage collector, patching a `torch.Tensor` method, calling the check module's
formula) get none of the points they sought.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grader import check_stage, labs, notebook, wire
from grader.execute import prepare
from grader.labs.kv_cache import attacks, samples
from grader.samples import solved
from grader.sandbox import Limits, bwrap_command

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

LAB = labs.load("kv_cache")
SOURCE = notebook.read(Path(__file__).resolve().parent.parent / "solutions" / "kv_cache" / "kv_cache.ipynb")

DIFFERENT_KV1 = '''
class ContiguousKVCache:
    # Written differently from the reference: one buffer per layer, index_copy_, and the whole buffer returned.
    def __init__(self, args, batch_size, max_seq_len, dtype=torch.float32, device="cpu"):
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]

    def update(self, layer, input_pos, k, v):
        self.keys[layer].index_copy_(2, input_pos, k)
        self.values[layer].index_copy_(2, input_pos, v)
        return self.keys[layer], self.values[layer]  # every slot: the causal mask hides the empty ones

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
'''
DIFFERENT_KV2 = '''
def cached_generate(model, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, eos_id=None):
    # Prefills all but the last prompt token, then feeds one token per step from there.
    check_length(model, len(prompt), max_new_tokens)
    param = next(model.parameters())
    cache = ContiguousKVCache(model.args, 1, len(prompt) + max_new_tokens, dtype=param.dtype, device=param.device)
    gen = make_generator(seed)
    with torch.no_grad():
        if len(prompt) > 1:
            model(torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1), cache)
        token, pos, out = prompt[-1], len(prompt) - 1, []
        while len(out) < max_new_tokens:
            logits = model(torch.tensor([[token]]), torch.tensor([pos]), cache)
            token = int(sample(logits[:, -1], temperature, top_k, top_p, gen))
            out.append(token)
            pos += 1
            if token == eos_id:
                break
    return out
'''
DIFFERENT_KV3 = '''
import math
def kv_cache_bytes(args, batch_size, seq_len, dtype):
    return math.prod((2, args.n_layers, batch_size, args.n_kv_heads, seq_len, args.head_dim)) * dtype.itemsize
'''


def variant(cells: dict[str, str] | None = None, from_release: bool = False, keep_solution: bool = False):
    nb = notebook.read(Path(__file__).resolve().parent.parent / "labs" / "kv_cache" / "kv_cache.ipynb") \
        if from_release else solved("kv_cache")
    for gid, source in (cells or {}).items():
        c = notebook.cell(nb, gid)
        c.source = (c.source + "\n\n" + source) if keep_solution else source
    prepared = prepare(SOURCE, nb)
    return prepared


VARIANTS = {
    "reference": (variant(), {"KV1": 3, "KV2": 3, "KV3": 2, "KV4": 2}),
    "different-but-correct": (variant({"kv1-solution": DIFFERENT_KV1, "kv2-solution": DIFFERENT_KV2,
                                       "kv3-solution": DIFFERENT_KV3}), {"KV1": 3, "KV2": 3, "KV3": 2, "KV4": 2}),
    "stub": (variant(from_release=True), {"KV1": 0, "KV2": 0, "KV3": 0, "KV4": 0}),
    "slow": (variant(samples.SAMPLES["slow"]["cells"]), samples.SAMPLES["slow"]["expected"]),
    **{name: (variant(attacks.ATTACKS[name]["cells"], keep_solution=attacks.ATTACKS[name].get("keep_solution", False)),
              attacks.ATTACKS[name]["expected"])
       for name in ("read-checker-state", "patch-tensor-method", "call-the-formula", "deferred-output")},
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Each variant through the check stage once: {name: (points by task, outcomes, replaced names)}."""
    out = {}
    for i, (name, (nb, _)) in enumerate(VARIANTS.items()):
        seeds = {t.id: 1000 * i + n for n, t in enumerate(LAB.spec.tasks)}
        outcomes, tampered = check_stage.run(LAB, nb, "bwrap", Limits(threads=1), seeds,
                                             tmp_path_factory.mktemp(name))
        out[name] = ({o.task: o.points for o in outcomes}, outcomes, tampered)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_gets_what_a_careful_grader_gives(checked, name):
    points, outcomes, _ = checked[name]
    assert points == VARIANTS[name][1], "\n".join(o.result.line() for o in outcomes)


def test_the_slow_sample_is_told_what_the_cache_must_save(checked):
    kv2 = next(o for o in checked["slow"][1] if o.task == "KV2")
    assert "the tokens are right, but the model processed" in kv2.result.message
    assert kv2.result.measured["positions"] > 5 * kv2.result.measured["with_cache"]


def test_replaced_tensor_methods_are_flagged_not_believed(checked):
    _, outcomes, tampered = checked["patch-tensor-method"]
    assert any(name.startswith("torch.Tensor.") for name in tampered), tampered
    assert not any(o.result.passed for o in outcomes if o.task in ("KV1", "KV2"))


def test_the_formula_is_out_of_reach(checked):
    kv3 = next(o for o in checked["call-the-formula"][1] if o.task == "KV3")
    assert not kv3.result.passed and "kv_cache_bytes is not defined" in kv3.result.message, kv3.result.line()


def test_stub_tasks_are_not_attempted_and_name_their_task(checked):
    for o in checked["stub"][1]:
        assert o.result.status == "not attempted" and "KV" in o.result.message, o.result.line()


def test_a_broken_environment_is_a_grader_fault_not_a_zero(tmp_path):
    """A locked cell that fails in the sandbox (here: a model file that is not there) is the grader's fault."""
    nb = variant()
    setup = notebook.cell(nb, "setup")
    setup.source = setup.source.replace('load_model("tiny")', 'load_model("no-such-model")')
    with pytest.raises(check_stage.GraderFault, match="locked cell 'setup'"):
        check_stage.run(LAB, nb, "bwrap", Limits(threads=1), {t.id: 1 for t in LAB.spec.tasks}, tmp_path)


def test_learner_code_cannot_import_or_read_the_grading_side(tmp_path):
    """In the sandbox, each lab's grading.py, samples.py and attacks.py are stubs, and their bytecode is gone."""
    import py_compile

    grading = labs.LABS_DIR / "kv_cache" / "grading.py"
    cache = grading.parent / "__pycache__"
    made = not cache.exists()  # a grading host that writes bytecode leaves grading's next to its source
    py_compile.compile(str(grading), cfile=str(cache / "grading.cpython-test.pyc"))
    probe = tmp_path / "probe.py"
    probe.write_text(f'''
import os, sys
try:
    import grader.labs.kv_cache.grading
    print("IMPORTED")
except ImportError as err:
    print("IMPORT BLOCKED", err)
print("READ", "expected_kv_bytes" in open({str(grading)!r}).read())
print("PYC", os.listdir({str(grading.parent / "__pycache__")!r}))
from grader.labs.kv_cache import public
print("PUBLIC", public.LAB)
''')
    private = tmp_path / "private"
    private.mkdir()
    cmd = bwrap_command([sys.executable, str(probe)], private, Limits())
    cmd[cmd.index("--bind") + 1:cmd.index("--bind") + 3] = [str(tmp_path), str(tmp_path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}).stdout
    finally:
        (cache / "grading.cpython-test.pyc").unlink()
        if made:
            shutil.rmtree(cache)
    assert "IMPORT BLOCKED" in out and "READ False" in out and "PYC []" in out and "PUBLIC kv_cache" in out, out


def test_wire_carries_plain_data_only():
    message = {"tokens": torch.arange(6).view(2, 3), "n": True.__class__(1), "xs": [1, 2.5, "a", None]}
    back = wire.decode(wire.encode(message))
    assert torch.equal(back["tokens"], message["tokens"]) and back["xs"] == [1, 2.5, "a", None]

    class Sneaky(int):
        def __eq__(self, other):
            return True

    assert type(wire.decode(wire.encode({"t": Sneaky(3)}))["t"]) is int
    with pytest.raises(wire.WireError):
        wire.encode({"f": lambda: 0})
    for bad in (b"[1, 2]", b"not json", b'{"__st__": "!!"}', b'{"x": {"__tensor__": "t9"}}'):
        with pytest.raises(wire.WireError):
            wire.decode(bad)


def test_every_platform_lab_agrees_with_its_notebook():
    for name in labs.names():
        lab = labs.load(name)
        nb = notebook.read(Path(__file__).resolve().parent.parent / "solutions" / name / f"{name}.ipynb")
        assert labs.notebook_problems(lab.spec, nb) == []
        assert set(lab.grading.HIDDEN_CHECKS) == {t.id for t in lab.spec.tasks}


def test_a_spec_that_contradicts_itself_is_refused():
    from grader.labs.spec import LabSpec, LabSpecError, Task

    with pytest.raises(LabSpecError, match="two or more capital letters"):
        LabSpec("x_lab", "X", (Task("X1", "t", 1, ("x1-solution",)),), (), ())
    with pytest.raises(LabSpecError, match="expected XY2"):
        LabSpec("x_lab", "XY", (Task("XY1", "t", 1, ("c",)), Task("XY3", "t", 1, ("c",))), (), ())
    with pytest.raises(LabSpecError, match="not an earlier task"):
        LabSpec("x_lab", "XY", (Task("XY1", "t", 1, ("c",), requires=("XY2",)),), (), ())


def test_a_notebook_that_contradicts_its_spec_is_reported():
    nb = notebook.read(Path(__file__).resolve().parent.parent / "solutions" / "kv_cache" / "kv_cache.ipynb")
    notebook.cell(nb, "kv2-self-check").source = 'self_check("KV3", checks.check_kv2, cached_generate)\n'
    notebook.cell(nb, "kv3-hidden").metadata["nbgrader"]["points"] = 5
    problems = labs.notebook_problems(LAB.spec, nb)
    assert any("belongs to KV2 but calls self_check('KV3')" in p for p in problems), problems
    assert any("task KV3: the notebook gives 5 points" in p for p in problems), problems


def test_a_check_that_cannot_tell_is_inconclusive_and_so_are_the_tasks_built_on_it(tmp_path):
    """Right or "don't know": a hidden check that raises `TooNoisy` (a timing whose range straddles its bar) makes
    its task inconclusive, not a fail; a task that requires it is inconclusive too; the result lists both, so the
    gradebook asks for their grades and `--retry-inconclusive` regrades them. The lab is kv_cache with its checks
    replaced: KV2 cannot tell, KV4 requires KV2."""
    from types import SimpleNamespace

    from grader.checks import TooNoisy

    def cannot_tell(learner, seed):
        raise TooNoisy("too noisy to tell: the range 70% to 95% straddles the bar of 79%", low=0.7, high=0.95)

    checks = {"KV1": lambda learner, seed: {"ok": 1}, "KV2": cannot_tell, "KV3": lambda learner, seed: None,
              "KV4": lambda learner, seed: pytest.fail("KV4 requires KV2, whose grade is not known: not run")}
    lab = SimpleNamespace(spec=LAB.spec, grading=SimpleNamespace(HIDDEN_CHECKS=checks))
    result = {"tasks": [], "checks": [], "points": 0.0}
    executed = variant()
    check_stage.apply(lab, result, executed, "bwrap", Limits(threads=1), {t.id: 1 for t in LAB.spec.tasks}, tmp_path)
    status = {c["task"]: c["status"] for c in result["checks"]}
    assert status == {"KV1": "passed", "KV2": "inconclusive", "KV3": "passed", "KV4": "inconclusive"}, status
    assert result["inconclusive"] == ["KV2", "KV4"]
    unknown = {t["cell"] for t in result["tasks"] if t.get("inconclusive")}
    assert unknown == {LAB.spec.task("KV2").graded_cell, LAB.spec.task("KV4").graded_cell}
    assert result["points"] == LAB.spec.task("KV1").points + LAB.spec.task("KV3").points
    kv2 = next(c for c in result["checks"] if c["task"] == "KV2")
    assert "--retry-inconclusive" in kv2["message"] and kv2["measured"] == {"low": 0.7, "high": 0.95}
    kv4 = next(c for c in result["checks"] if c["task"] == "KV4")
    assert "not known yet" in kv4["message"]
    assert "INCONCLUSIVE" in "".join(o.text for o in notebook.cell(executed, LAB.spec.task("KV2").graded_cell).outputs)
