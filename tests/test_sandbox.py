"""The sandboxed kernel: no network, no view of the course's answers, a read-only system, a clean environment."""

from __future__ import annotations

import os
import shutil

import pytest
from nbformat.v4 import new_code_cell, new_notebook

from grader.catalogue import REPO_ROOT
from grader.execute import execute
from grader.sandbox import Limits, bwrap_command, docker_command

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed "
                                "(apt-get install bubblewrap; .ci/run installs it)")

PROBES = {
    "network": "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=2); print('OPEN')\n"
               "except OSError as e:\n    print('closed')",
    "solutions": f"import os; print(os.path.exists({str(REPO_ROOT / 'solutions')!r}))",
    "write": f"try:\n    open({str(REPO_ROOT / 'grader' / 'pwned.txt')!r}, 'w'); print('wrote')\nexcept OSError:\n    print('denied')",
    "write_elsewhere": f"try:\n    open({str(REPO_ROOT / 'pwned.txt')!r}, 'w'); print('wrote')\nexcept OSError:\n    print('denied')",
    "env": "import os; print(sorted(k for k in os.environ if 'SECRET' in k or 'GRADING' in k))",
    "runtime": "import inferlab, torch; m = inferlab.load_model('tiny'); print(m.num_parameters > 0)",
    "memory": "try:\n    x = bytearray(16 * 2**30); print('allocated')\nexcept MemoryError:\n    print('refused')",
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    os.environ["GRADING_SECRET_TOKEN"] = "do-not-leak"  # the kernel must not inherit the grader's environment
    try:
        nb = new_notebook(cells=[new_code_cell(src) for src in PROBES.values()])
        run = execute(nb, "bwrap", Limits(wall_s=120, memory_mb=4096), tmp_path_factory.mktemp("sandbox"))
    finally:
        del os.environ["GRADING_SECRET_TOKEN"]
    assert not run.error, run.error + run.kernel_log
    return {name: "".join(o.get("text", "") for o in c.outputs).strip() for name, c in zip(PROBES, run.notebook.cells)}


def test_no_network(probed):
    assert probed["network"] == "closed"


def test_no_view_of_solutions_and_read_only_repo(probed):
    assert probed["solutions"] == "False"
    assert probed["write"] == "denied" and not (REPO_ROOT / "grader" / "pwned.txt").exists()
    # Elsewhere a write either fails or lands in the sandbox's own private file system, never on the host.
    assert not (REPO_ROOT / "pwned.txt").exists()


def test_clean_environment(probed):
    assert probed["env"] == "[]"


def test_the_runtime_works_inside(probed):
    assert probed["runtime"] == "True"


def test_memory_limit(probed):
    assert probed["memory"] == "refused"


def test_wall_time_limit_stops_an_endless_cell(tmp_path):
    nb = new_notebook(cells=[new_code_cell("while True:\n    pass"), new_code_cell("print('after')")])
    run = execute(nb, "bwrap", Limits(wall_s=15), tmp_path)
    assert run.timed_out and "time limit" in run.error and run.seconds < 40


def test_docker_backend_has_equivalent_flags(tmp_path):
    cmd = docker_command(["python", "-m", "ipykernel_launcher"], tmp_path, Limits(memory_mb=2048, gpus=1), "img")
    joined = " ".join(cmd)
    for flag in ("--network none", "--read-only", "--memory 2048m", "--pids-limit", "--cap-drop ALL", "--gpus 1"):
        assert flag in joined
    bw = " ".join(bwrap_command(["python"], tmp_path, Limits()))
    assert "--unshare-all" in bw and "--remount-ro /" in bw and "prlimit" in bw


def test_a_deep_output_folder_does_not_break_the_kernel_sockets(tmp_path):
    """Unix socket paths hold 107 bytes: a grading folder deeper than that budget allows puts the kernel's
    sockets in the system's temporary folder instead (this once failed every submission under a deep --out)."""
    from pathlib import Path

    from grader.execute import SOCKET_FOLDER_MAX, socket_parent

    assert socket_parent(Path("/tmp/g")) == "/tmp/g"
    deep = tmp_path / ("d" * (SOCKET_FOLDER_MAX + 1))
    assert socket_parent(deep) is None
    assert socket_parent(None) is None
