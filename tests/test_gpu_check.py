"""bench/gpu_check.py (`make gpu-check`): refuses to run without a GPU, and its --cpu-dry-run goes end to end."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
THRESHOLDS = REPO / "grader" / "thresholds"
RESULTS_MD = REPO / "bench" / "results-gpu.md"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def gpu_profiles() -> list[tuple[str, str, str, dict]]:
    found = []
    for path in sorted(THRESHOLDS.glob("*.json")):
        for profile, tasks in json.loads(path.read_text())["profiles"].items():
            if profile != "cpu":
                found += [(path.stem, profile, task, entry) for task, entry in tasks.items()]
    return found


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here: the script would run for real")
def test_without_a_gpu_it_exits_3_at_once_and_says_what_to_do(tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    res = run("--out", str(out), timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr
    assert time.perf_counter() - started < 30
    message = res.stderr
    assert message.startswith("no CUDA GPU visible: make gpu-check needs one; it calibrates the cuda profile")
    for needle in ("gpu_basics", "kv_cache", "continuous_batching", "Triton", "run it on a GPU machine".lower(),
                   "docs/gpu-check.md", "--cpu-dry-run"):
        assert needle.lower() in message.lower(), needle
    assert not out.exists(), "it must write nothing when it refuses to run"


@pytest.mark.slow
def test_cpu_dry_run_goes_end_to_end_and_writes_only_into_out(tmp_path):
    """Every step on the CPU with one round each (under a minute on 2 cores), --commit-thresholds included,
    which in a dry run writes under OUT/commit-preview/ and leaves the repository alone."""
    watched = sorted(THRESHOLDS.glob("*.json")) + [RESULTS_MD, RESULTS_MD.with_suffix(".json")]
    before = digest(watched)
    committed = {p.stem: json.loads(p.read_text()) for p in THRESHOLDS.glob("*.json")}
    out = tmp_path / "out"
    res = run("--cpu-dry-run", "--commit-thresholds", "--out", str(out), "--budget-s", "300", timeout=360)
    assert res.returncode == 0, res.stdout + res.stderr

    results = json.loads((out / "results-gpu.json").read_text())
    assert results["mode"] == "cpu-dry-run" and results["profile"] == "cpu-dry-run"
    assert results["state"] == "finished"
    steps = {s["name"]: s for s in results["steps"]}
    labs = gpu_check().calibrated_labs()[0]
    assert {"gpu_basics", "kv_cache", "continuous_batching"} <= set(labs)
    assert set(steps) == set(labs) | {"triton"}
    for lab in labs:
        step = steps[lab]
        assert step["status"] == "done", step
        proposal = json.loads((out / "thresholds" / f"{lab}.json").read_text())
        assert set(committed[lab]["profiles"]) | {"cpu-dry-run"} == set(proposal["profiles"])
        for task, entry in proposal["profiles"]["cpu-dry-run"].items():
            calibration = entry["calibration"]
            assert calibration["rounds_capped_at"] == 1 and calibration["measured_on"] == "CPU"
            assert calibration["calibrated_by"] == "bench/gpu_check.py --cpu-dry-run"
            assert "estimate" not in entry
        preview = json.loads((out / "commit-preview" / "grader" / "thresholds" / f"{lab}.json").read_text())
        assert preview["profiles"]["cpu-dry-run"] == proposal["profiles"]["cpu-dry-run"]
        assert {k: v for k, v in preview["profiles"].items() if k != "cpu-dry-run"} == committed[lab]["profiles"]

    triton = steps["triton"]
    if importlib.util.find_spec("triton") is None:
        assert triton["status"] == "unavailable" and "pip install" in triton["reason"]
    else:
        assert triton["status"] == "done", triton
        for path in triton["paths"]:
            assert path["interpreter"] and path["device"] == "cpu"
            assert path["max_abs_error"] <= path["tolerance"]

    md = (out / "results-gpu.md").read_text()
    assert "CPU dry run: not a GPU measurement" in md
    assert "roi: left out: no GPU part" in md
    assert (out / "commit-preview" / "bench" / "results-gpu.md").read_text() == md
    assert digest(watched) == before, "a dry run must write nothing outside --out"


def test_a_step_that_does_not_fit_the_budget_is_skipped_and_reported(tmp_path):
    out = tmp_path / "out"
    res = run("--cpu-dry-run", "--out", str(out), "--budget-s", "1", timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    results = json.loads((out / "results-gpu.json").read_text())
    assert results["steps"] and all(s["status"] == "skipped" for s in results["steps"])
    assert "would exceed the budget" in (out / "results-gpu.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install 'inferlab[triton]'); the dev extra brings it on Linux")
def test_the_triton_paths_run_in_the_interpreter_on_cpu():
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['gpu_check'] = m; spec.loader.exec_module(m)\n"
            "print(json.dumps({name: path('cpu', True) for name, path in m.TRITON_PATHS}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert results
    for name, result in results.items():
        assert result["max_abs_error"] <= result["tolerance"], name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install 'inferlab[triton]'); the dev extra brings it on Linux")
def test_the_softmax_kernel_compiles_for_hopper_without_a_gpu():
    """Triton's compiler needs no GPU: the kernel `make gpu-check` launches on an H100/H200 builds to sm_90 here,
    so a mistake that only compilation finds (the interpreter runs plain Python) shows before a GPU is lent."""
    code = ("import importlib.util, sys, triton\n"
            "from triton.compiler import ASTSource\n"
            "from triton.backends.compiler import GPUTarget\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['gpu_check'] = m; spec.loader.exec_module(m)\n"
            "signature = {'out_ptr': '*fp32', 'in_ptr': '*fp32', 'in_stride': 'i32', 'out_stride': 'i32',\n"
            "             'n_cols': 'i32', 'BLOCK': 'constexpr'}\n"
            "kernel = triton.compile(ASTSource(fn=m.softmax_kernel, signature=signature, constexprs={'BLOCK': 1024}),\n"
            "                        target=GPUTarget('cuda', 90, 32))\n"
            "print(len(kernel.asm['cubin']), [l.strip() for l in kernel.asm['ptx'].splitlines() if '.target' in l])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    size, targets = res.stdout.split(" ", 1)
    assert int(size) > 0 and "sm_90" in targets


def test_a_gpu_run_commits_its_measurement_over_the_estimate_and_reports_it(tmp_path):
    """What only a GPU run does, on a made-up measurement: the merge into grader/thresholds (here a copy) and
    the report of a GPU machine."""
    m = gpu_check()
    measured = {"GB3": {"min_measured_over_predicted": 0.01, "max_measured_over_predicted": 1.25,
                        "calibration": {"ratios": [0.02, 0.03], "median_ratio": 0.025, "date": "2026-12-01",
                                        "measured_on": "GPU", "note": "measured"}}}
    path = m.commit_thresholds("gpu_basics", "cuda", measured, tmp_path)
    assert path == tmp_path / "grader" / "thresholds" / "gpu_basics.json"
    data = json.loads(path.read_text())
    committed = json.loads((THRESHOLDS / "gpu_basics.json").read_text())
    assert data["profiles"]["cuda"]["GB3"] == measured["GB3"] and "estimate" not in data["profiles"]["cuda"]["GB3"]
    assert data["profiles"]["cpu"] == committed["profiles"]["cpu"]
    assert not [e for e in m.estimates([THRESHOLDS, path.parent]) if e["lab"] == "gpu_basics"]

    machine = {"gpu": "NVIDIA H200", "gpu_short_name": "h200", "driver": "580.159.04", "cuda": "13.0",
               "gpu_memory": "140 GiB", "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3",
               "host_cpu": "some CPU, 16 cores", "torch_threads": 16}
    results = {"mode": "gpu", "profile": "cuda", "state": "finished", "state_detail": "Run on NVIDIA H200: 2 of 3 "
               "steps done; not done: kv_cache", "date": "2026-12-01T00:00:00+00:00", "budget_s": 480,
               "elapsed_s": 300.0, "machine": machine, "left_out": [["roi", "no GPU part"]], "committed": True,
               "steps": [
                   {"name": "gpu_basics", "kind": "calibrate", "status": "done", "seconds": 40.0, "measured_on": "GPU",
                    "entry": measured},
                   {"name": "triton", "kind": "triton", "status": "done", "seconds": 9.0, "paths": [
                       {"name": "row_softmax (bench/gpu_check.py)", "status": "done", "device": "cuda",
                        "interpreter": False, "shape": [4096, 1000], "max_abs_error": 6e-8, "tolerance": 1e-5,
                        "triton_ms": 0.02, "torch_ms": 0.03, "first_call_s": 1.2}]},
                   {"name": "kv_cache", "kind": "calibrate", "status": "timed out", "seconds": 120.0,
                    "reason": "stopped at its cap of 120 s"}]}
    md = m.markdown({**results, "estimates": []})
    for needle in ("NVIDIA H200, 140 GiB (short name `h200`; thresholds written to the `cuda` profile)",
                   "580.159.04 / 13.0", "| gpu_basics | GB3 | done | GPU | ratios 0.02-0.03; median_ratio 0.025 |",
                   "| row_softmax (bench/gpu_check.py) | done | cuda | 4096x1000 | 6e-08 (1e-05) | 0.02 | 0.03 | 1.2 |",
                   "* kv_cache: timed out: stopped at its cap of 120 s", "* roi: left out: no GPU part",
                   "**Run on NVIDIA H200: 2 of 3 steps done; not done: kv_cache**"):
        assert needle in md, needle
    assert "dry run" not in md.lower() and "Not yet run on a GPU" not in md


def test_every_gpu_threshold_is_measured_or_says_it_is_an_estimate():
    """A GPU profile's entry either records when it was measured or is marked `"estimate": true`, and
    bench/results-gpu.md lists every estimate (and says so plainly while nothing was measured on a GPU)."""
    md = RESULTS_MD.read_text()
    entries = gpu_profiles()
    for lab, profile, task, entry in entries:
        assert entry.get("estimate") is True or "date" in entry.get("calibration", {}), (lab, profile, task)
        if entry.get("estimate"):
            assert "ESTIMATE" in entry["calibration"]["note"].upper()
            assert f"{lab} {task} (`{profile}`)" in md, f"bench/results-gpu.md does not list {lab} {task} {profile}"
    if not any(not e.get("estimate") for *_, e in entries):
        assert "Not yet run on a GPU: every GPU threshold is an estimate." in md
