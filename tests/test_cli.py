"""The `inferlab` command line, run as a user runs it: as a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


INFERLAB = [str(Path(sys.executable).with_name("inferlab"))]


def run(*args, timeout=120):
    return subprocess.run(INFERLAB + list(args), capture_output=True, text=True, timeout=timeout)


def test_help_is_instant_and_has_examples():
    start = time.perf_counter()
    res = run("--help")
    assert res.returncode == 0 and time.perf_counter() - start < 3
    assert "inferlab generate --model tiny" in res.stdout
    for command in ("doctor", "generate", "release", "calibrate", "autograde", "report"):
        res = run(command, "--help")
        assert res.returncode == 0 and "Example" in res.stdout
    for command in ("release", "calibrate", "autograde", "report"):  # every command that writes files
        assert "--out" in run(command, "--help").stdout


def test_generate_streams_code_and_reports_speed():
    res = run("generate", "--model", "tiny", "--prompt", "def fib(n):", "--max-new-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def fib(n):")
    assert "tokens/s" in res.stdout


def test_sampled_generation_is_seeded():
    args = ("generate", "--prompt", "import os", "--max-new-tokens", "16", "--temperature", "0.9", "--top-p", "0.9")
    a, b = run(*args, "--seed", "1"), run(*args, "--seed", "1")
    body = lambda r: r.stdout.split("\n\n[")[0]
    assert a.returncode == 0 and body(a) == body(b)


def test_non_positive_max_new_tokens_is_a_usage_error():
    res = run("generate", "--max-new-tokens", "0")
    assert res.returncode == 2
    assert "Usage:" in res.stderr and "--max-new-tokens" in res.stderr


def test_unknown_model_lists_bundled_names():
    res = run("generate", "--model", "gpt-99")
    assert res.returncode == 1
    assert "tiny" in res.stderr and "tiny-draft" in res.stderr


def test_prompt_longer_than_context_gives_both_lengths():
    res = run("generate", "--prompt", "x = 1\n" * 600, "--max-new-tokens", "4")
    assert res.returncode == 1
    assert "but the model's context is 512 tokens" in res.stderr


def test_doctor_reports_the_machine():
    res = run("doctor", "--bandwidth-mb", "32", timeout=300)
    assert res.returncode == 0, res.stderr
    for needle in ("torch", "cpu memory bandwidth", "GB/s", "bubblewrap sandbox", "triton interpreter",
                   "kv_cache", "tiny-draft"):
        assert needle in res.stdout
    if shutil.which("bwrap"):
        assert "works" in res.stdout.split("bubblewrap sandbox")[1].splitlines()[0]


def test_cli_module_imports_nothing_heavy():
    """`--help` stays instant because torch and the model load only inside commands."""
    code = "import sys, grader.cli; print(sorted(m for m in ('torch', 'inferlab', 'transformers') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_grading_commands_reject_bad_input(tmp_path):
    res = run("autograde", "no_such_lab", "--submissions", str(tmp_path))
    assert res.returncode == 1 and "no_such_lab" in res.stderr
    res = run("report", "--results", str(tmp_path), "--out", str(tmp_path / "r"))
    assert res.returncode == 1 and "no grading results" in res.stderr
    res = run("calibrate", "no_such_lab", "--out", str(tmp_path))
    assert res.returncode == 1 and "no lab package grader/labs/no_such_lab" in res.stderr


def test_autograde_help_documents_verdicts_preflight_and_exit_codes():
    res = run("autograde", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for needle in ("--retry-inconclusive", "--no-preflight", "inconclusive", "preflight",
                   "3 some task is inconclusive", "4 the preflight failed"):
        assert needle in text, needle
    demo = " ".join(run("demo", "--help").stdout.split())
    assert "--no-preflight" in demo and "inconclusive" in demo
