"""The serving lab: the reference and a server written differently pass, the stub is 'not attempted', and each
known mistake is caught by the check that exists for it, with a message that names it.

Two halves. The checks' pure logic (SV1's metric definitions, the server's request parsing, the load
generator's input) runs here in-process, as a notebook's self-checks run it. Then one batch of samples goes
through `grader.check_stage` as the autograder runs it: the learner's server starts in its bubblewrap sandbox on a
Unix-domain socket in the folder both sides see, and the checker talks to it with the official openai client.
The reference is the solution notebook itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import check_batch
from grader import labs, notebook, samples
from grader.checks import FAILED, NOT_ATTEMPTED, PASSED, run_check
from grader.execute import prepare
from grader.labs.serving import public as checks
from grader.labs.serving import samples as mistakes

LAB = labs.load("serving")
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "solutions" / LAB.name / f"{LAB.name}.ipynb"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    yield notebook.exec_cells(notebook.read(SOURCE), list(LAB.spec.reference_cells))
    torch.set_num_threads(threads)  # the notebook's setup pins one thread; leave the session as it was


def with_cell(reference, cell_id: str, source: str) -> dict:
    ns = dict(reference)
    exec(source, ns)
    return ns


# ---------------------------------------------------------------- SV1: the metric definitions, in-process

@pytest.mark.parametrize("seed", [0, 11, 12345])
def test_sv1_reference_and_rewritten_pass_on_drawn_traces(reference, seed):
    from grader.labs.serving import grading

    case = checks.metric_cases(seed)
    want = grading.expected_sv1(case)
    for ns in (reference, with_cell(reference, "sv1-solution", mistakes.edited("sv1-solution", mistakes.S1_REWRITTEN))):
        checks.verify_request_metrics(ns["request_metrics"], case, want["requests"])
        checks.verify_summary(ns["summarize"], case, want["summary"])


def test_sv1_public_self_check(reference):
    assert run_check("SV1", checks.check_sv1, reference["request_metrics"], reference["summarize"]).status == PASSED


def test_tpot_over_all_tokens_is_caught_and_named(reference):
    ns = with_cell(reference, "sv1-solution", mistakes.edited("sv1-solution", mistakes.S1_TPOT_ALL_TOKENS))
    result = run_check("SV1", checks.check_sv1, ns["request_metrics"], ns["summarize"])
    assert result.status == FAILED and "(E2EL - TTFT) / (tokens - 1)" in result.message


def test_goodput_and_failed_requests_follow_vllm(reference):
    case = checks.metric_cases(3)
    out = reference["summarize"](case["records"], case["duration_s"], {"ttft": 1e9, "tpot": 1e9, "e2el": 1e9})
    assert out["failed"] == 1 and out["completed"] == len(case["records"]) - 1
    assert out["goodput"] == pytest.approx(out["request_throughput"])  # no limit binds: every completed request
    tight = reference["summarize"](case["records"], case["duration_s"], {"ttft": 0.0})
    assert tight["goodput"] == 0.0


def test_the_stub_is_not_attempted():
    nb = notebook.read(ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb")
    ns = {"np": __import__("numpy")}
    exec(notebook.cell(nb, "sv1-solution").source, ns)
    assert run_check("SV1", checks.check_sv1, ns["request_metrics"], ns["summarize"]).status == NOT_ATTEMPTED


# ---------------------------------------------------------------- bad input gets a clear message

def test_bad_requests_get_400_with_a_message(reference):
    import httpx

    with checks.serving(reference["build_app"], max_batch_size=2) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            cases = {b"not json": "not valid JSON",
                     json.dumps({"prompt": "x", "max_tokens": 0}).encode(): "'max_tokens' must be a positive integer",
                     json.dumps({"prompt": "x", "stop": [1]}).encode(): "'stop' must be",
                     json.dumps({"prompt": 3}).encode(): "'prompt' must be",
                     json.dumps({"prompt": "x", "top_p": 0}).encode(): "'top_p'",
                     json.dumps({"prompt": "x", "seed": "a"}).encode(): "'seed' must be an integer",
                     json.dumps([1, 2]).encode(): "JSON object"}
            for body, said in cases.items():
                response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
                assert response.status_code == 400, body
                assert said in response.json()["error"]["message"], (body, response.text)
            chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
            assert chat.status_code == 400 and "messages" in chat.json()["error"]["message"]
            unknown = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
            assert unknown.status_code == 404 and "tiny" in unknown.json()["error"]["message"]
            assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_the_load_generator_refuses_bad_input_with_a_message(reference):
    with pytest.raises(ValueError, match="max_concurrency must be a positive integer"):
        asyncio.run(reference["benchmark"]("http://127.0.0.1:9", [], max_concurrency=0))


def test_the_bench_refuses_bad_options(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_vllm", ROOT / "bench" / "serving_vllm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rate", "0"])
    assert "--rate" in capsys.readouterr().err


@pytest.mark.parametrize("yours, reference, verdict, runs", [
    ([100.0], [101.0, 99.0], "passed", 1),  # the reference's own range: 0.99-1.01 of it
    ([62.0], [100.0, 98.0], "failed", 1),  # a batch of one: 0.63 at best, under 0.79
    ([75.0, 95.0, 85.0], [100.0, 90.0, 110.0, 100.0], "inconclusive", 3),  # every run straddles 0.79
    ([78.0, 95.0, 96.0], [100.0, 95.0, 99.0, 100.0], "passed", 3),  # straddles, then two clear passes
    ([70.0, 95.0, 72.0], [80.0, 100.0, 98.0, 100.0], "inconclusive", 3),  # one clear each way: no verdict
])
def test_sv4_throughput_is_right_or_says_it_cannot_tell(monkeypatch, yours, reference, verdict, runs):
    """SV4's verdict rule alone, with the load runs replaced by their token rates (the servers themselves are
    graded in the batch below): the learner's runs each sit between two of the reference's; the whole range of
    the fraction must be on one side of the bar, else more runs, else inconclusive (never a wrong verdict)."""
    from grader.checks import CheckFailed, TooNoisy

    rates = iter(r for pair in zip(reference, yours + [None]) for r in pair if r is not None)
    monkeypatch.setattr(checks, "load_trace", lambda offline, seed, n: [])
    monkeypatch.setattr(checks, "run_load", lambda server, trace: (
        [{"ok": True, "usage": {"completion_tokens": next(rates)}}], 1.0))
    assert checks.threshold(LAB.name, "SV4")["min_throughput_fraction_of_reference"] == 0.79
    try:
        measured, got = checks.verify_throughput(None, None, None, seed=0), "passed"
    except TooNoisy as err:
        measured, got = err.measured, "inconclusive"
    except CheckFailed as err:
        measured, got = err.measured, "failed"
    assert (got, measured["runs"]) == (verdict, runs), measured


def test_samples_build_from_the_source(tmp_path):
    paths = samples.build(LAB.name, tmp_path)
    assert set(paths) == set(mistakes.SAMPLES)
    assert '\\n".encode()' in notebook.cell(notebook.read(paths["wrong-sse"]), "sv2-solution").source


# ---------------------------------------------------------------- the check stage: the autograder's verdicts

def variant(name: str):
    spec = mistakes.SAMPLES[name]
    nb = notebook.read(ROOT / "labs" / LAB.name / f"{LAB.name}.ipynb") if spec.get("from_release") \
        else samples.solved(LAB.name)
    for gid, source in spec["cells"].items():
        notebook.cell(nb, gid).source = source
    return prepare(notebook.read(SOURCE), nb), spec["expected"]


# Every sample but tpot-all-tokens (SV1's mistake, caught in-process above at no cost): each costs a sandbox and
# four server starts.
VARIANTS = ("reference", "stub", "rewritten", "wrong-sse", "one-at-a-time", "blocks-loop")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    return check_batch(LAB, {name: (lambda name=name: variant(name)[0]) for name in VARIANTS}, tmp_path_factory)


@needs_bwrap
@pytest.mark.parametrize("name", VARIANTS)
def test_each_sample_gets_what_a_careful_grader_gives(checked, name):
    points, results, tampered = checked[name]
    assert points == mistakes.SAMPLES[name]["expected"], "\n".join(r.line() for r in results.values())
    assert not tampered


@needs_bwrap
def test_each_mistake_is_caught_by_its_own_check_with_a_message(checked):
    assert "blank line" in checked["wrong-sse"][1]["SV2"].message
    assert "one request at a time" in checked["one-at-a-time"][1]["SV4"].message
    assert "tokens must be sent as they are made" in checked["blocks-loop"][1]["SV2"].message
    assert checked["stub"][1]["SV2"].status == NOT_ATTEMPTED
