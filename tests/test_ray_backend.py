"""The Ray backend's parts that need no cluster: what a task carries, what it asks for, bad input.

Grading on a real local Ray cluster, with a worker killed mid-task, is in tests/test_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grader.autograde import autograde, source_path
from grader.catalogue import REPO_ROOT
from grader.ray_backend import portable_job, submission_resources, why_unreachable
from grader.sandbox import Limits


def test_a_task_carries_no_path_of_the_driver(tmp_path):
    job = {"lab": "kv_cache", "student": "ada", "submission": str(tmp_path / "course/submitted/ada/kv_cache/kv_cache.ipynb"),
           "source": str(source_path("kv_cache")), "fingerprint": "f", "timestamp": None, "sandbox": "bwrap",
           "limits": {}, "seed": None, "result": str(tmp_path / "results/ada.json"),
           "executed": str(tmp_path / "autograded/ada/kv_cache/kv_cache.ipynb"), "workdir": str(tmp_path)}
    portable = portable_job(job)
    assert str(tmp_path) not in json.dumps(portable), "a node must not be told (or write) the driver's paths"
    assert portable["submission_name"] == "kv_cache.ipynb" and len(portable["source_sha256"]) == 64


def test_tasks_ask_for_the_lab_profile_resources():
    assert submission_resources("kv_cache", Limits()) == {"num_cpus": 1, "num_gpus": 0}
    declared = json.loads((REPO_ROOT / "grader/thresholds/kv_cache.json").read_text())["resources"]["gpu"]
    assert submission_resources("kv_cache", Limits(gpus=1)) == {"num_cpus": declared["cpus"], "num_gpus": 1}
    assert submission_resources("kv_cache", Limits(gpus=2))["num_gpus"] == 2


def test_unreachable_addresses_are_named_in_seconds():
    assert "expected HOST:PORT" in why_unreachable("nonsense")
    assert "nothing answers at 127.0.0.1:9" in why_unreachable("127.0.0.1:9", timeout_s=2)
    assert "nothing answers" in why_unreachable("ray://127.0.0.1:9", timeout_s=2)
    assert why_unreachable("auto") == ""  # left to Ray, which fails at once without a local cluster


def test_api_rejects_an_unknown_backend_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'bwrap'; choose one of local, ray"):
        autograde("kv_cache", tmp_path, tmp_path / "out", backend="bwrap")


@pytest.mark.parametrize("args, message", [
    (["--ray-address", "auto"], "--ray-address needs --backend ray"),
    (["--backend", "ray", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster at '127.0.0.1:9'"),
])
def test_cli_bad_ray_options_fail_with_the_fix(tmp_path, args, message):
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "ada.ipynb").write_text((REPO_ROOT / "labs/kv_cache/kv_cache.ipynb").read_text())
    run = subprocess.run([sys.executable, "-c", "from grader.cli import main; main()", "autograde", "kv_cache",
                          "--submissions", str(subs), "--out", str(tmp_path / "out"), *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_autograde_help_shows_a_ray_example():
    run = subprocess.run([sys.executable, "-c", "from grader.cli import main; main()", "autograde", "--help"],
                         capture_output=True, text=True)
    assert "--backend ray --ray-address auto" in run.stdout and "--ray-address" in run.stdout
    assert Path(REPO_ROOT / "infra/k8s/raycluster.yaml").is_file()
