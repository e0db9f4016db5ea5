"""Attacks on the grader (grader/labs/kv_cache/attacks.py), graded in one batch as a class would be.

Each attack must get what its honest part deserves, be flagged where it cheated, and leave
no trace outside its sandbox; every other submission in the batch is graded as usual.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from grader import notebook, samples
from grader.autograde import autograde
from grader.report import flags_of
from grader.sandbox import Limits

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")]

LAB = "kv_cache"
ATTACKS = samples.definitions(LAB, "attacks")
HOST_TRACES = [Path("/var/tmp/inferlab-pwned"), Path("/tmp/inferlab-pwned")]


# The attacks on the timed task itself: graded with the timing stage. The others are graded without it
# (`timing=False`: KV4 is then left inconclusive wherever its gate passed), which saves a timed run each.
TIMING_ATTACKS = ("patch-bench-clock", "cut-corners-when-timed")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    import inferlab

    traces = HOST_TRACES + [Path(inferlab.__file__).parent / "PWNED"]
    for trace in traces:
        trace.unlink(missing_ok=True)
    root = tmp_path_factory.mktemp("attacks")
    untimed = [name for name in ATTACKS if name not in TIMING_ATTACKS]
    samples.build(LAB, root / "untimed", untimed, kind="attacks")
    samples.build(LAB, root / "timed", list(TIMING_ATTACKS), kind="attacks")
    samples.build(LAB, root / "timed", ["reference"])  # an honest neighbour in the same batch
    start = time.perf_counter()
    results = {}
    for batch, timing in (("untimed", False), ("timed", True)):
        outcomes = autograde(LAB, root / batch, root / f"out-{batch}", workers=2, sandbox="bwrap",
                             limits=Limits(wall_s=150), progress=False, timing=timing,
                             preflight=False)  # the batch has its own honest reference, checked below
        results.update({o.student: json.loads(o.result_path.read_text()) for o in outcomes})
    seconds = time.perf_counter() - start
    return results, seconds, traces


def awarded(result: dict) -> dict[str, float | str]:
    """Points per task; "inconclusive" for a task left untimed."""
    return {notebook.task_of(t["cell"]): "inconclusive" if t.get("inconclusive") else t["points"]
            for t in result["tasks"]}


def output_of(result: dict, cell_id: str) -> str:
    executed = notebook.read(result["executed"])
    return "".join(o.get("text", "") for o in notebook.cell(executed, cell_id).outputs)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_gets_what_its_honest_part_deserves(graded, name):
    results, _, _ = graded
    result = results[name]
    assert result["status"] == "graded", result.get("error")
    expected = dict(ATTACKS[name]["expected"])
    if name not in TIMING_ATTACKS and expected["KV4"]:
        expected["KV4"] = "inconclusive"  # its gate passed; it was not timed in this batch
    assert awarded(result) == expected, json.dumps(result["tasks"], indent=1)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_flagged_where_it_cheated(graded, name):
    results, _, _ = graded
    assert bool(flags_of(results[name])) == ATTACKS[name]["flags"], flags_of(results[name])


def test_the_honest_neighbour_is_graded_as_usual(graded):
    results, _, _ = graded
    assert results["reference"]["points"] == 10 and not flags_of(results["reference"])


def test_forgeries_earn_nothing_and_are_flagged(graded):
    """Verdicts come from the checker's process: a forged result line, a patched `grade` or `print`, fake checks
    or pinned random inputs change nothing it computes; what the learner's process replaced is flagged."""
    results, _, _ = graded
    for name in ("forge-self-check", "forge-print", "fake-checks"):
        assert results[name]["points"] == 0, name
    forged = results["forge-self-check"].get("tampered", [])
    assert "grader.checks.self_check" in forged, forged
    assert "builtins.print" in results["forge-print"].get("tampered", [])
    # Pinned random inputs do nothing to the checker's draws: the honest answers under them get full marks.
    assert awarded(results["seed-game"]) == {"KV1": 3, "KV2": 3, "KV3": 2, "KV4": "inconclusive"} and "numpy.random.default_rng" in results["seed-game"]["tampered"]
    assert any("replaced at run time" in f for f in flags_of(results["seed-game"]))


def test_nothing_left_the_sandbox(graded):
    results, _, traces = graded
    assert not [t for t in traces if t.exists()], "a submission wrote outside its sandbox"
    written = output_of(results["write-outside"], "kv3-solution")
    assert "BLOCKED" in written and "WROTE /tmp/inferlab-pwned" in written  # its own private /tmp only
    assert "NETWORK: blocked" in output_of(results["network"], "kv3-solution")
    assert "GRADEBOOK FOUND: []" in output_of(results["gradebook"], "kv3-solution")
    assert "SEEDS FOUND: []" in output_of(results["env-snoop"], "kv3-solution")


def test_resource_attacks_are_contained(graded):
    import os
    import subprocess

    results, _, _ = graded
    forks = output_of(results["fork-bomb"], "kv3-solution")
    if os.geteuid() != 0:  # Linux exempts root from RLIMIT_NPROC, even in a user namespace
        assert "FORK STOPPED" in forks, forks  # the sandbox's process limit held
    leftover = subprocess.run(["pgrep", "-f", "ipykernel_launcher|grader.perf_worker|grader.answer_worker"], capture_output=True,
                              text=True).stdout.split()
    assert not leftover, f"processes outlived their sandbox: {leftover}"
    assert results["output-flood"]["output_truncated"]
    bomb = next(t for t in results["memory-bomb"]["tasks"] if t["cell"] == "kv3-hidden")
    assert not bomb["passed"]
    executed = notebook.read(results["memory-bomb"]["executed"])
    assert any(o.get("ename") == "MemoryError" for o in notebook.cell(executed, "kv3-solution").outputs)
