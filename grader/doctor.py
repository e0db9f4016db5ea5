"""grader.doctor: what this machine can do for the course, checked rather than assumed."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .catalogue import LABS


@dataclass
class Finding:
    section: str
    name: str
    value: str
    ok: bool = True


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bubblewrap_works() -> tuple[bool, str]:
    """Run `true` in a bubblewrap sandbox with no network: the grader's sandbox in miniature."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False, "bwrap not found (apt-get install bubblewrap)"
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
           "--unshare-all", "--die-with-parent", "true"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False, "bwrap timed out"
    if res.returncode != 0:
        return False, f"bwrap failed: {res.stderr.strip()[:200]}"
    return True, f"works ({bwrap})"


TRITON_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)
x, y = torch.arange(100.0), torch.ones(100)
out = torch.empty(100)
add[(4,)](x, y, out, 100, BLOCK=32)
assert torch.equal(out, x + y), "wrong result"
print("ok")
"""


def triton_interpreter_works() -> tuple[bool, str]:
    """Run a vector-add kernel under TRITON_INTERPRET=1, in a subprocess (the flag is read at import)."""
    if _version("triton") is None:
        return False, "triton not installed (pip install 'inferlab[triton]')"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    try:
        res = subprocess.run([sys.executable, "-c", TRITON_PROBE], capture_output=True, text=True, env=env,
                             timeout=120)
    except subprocess.TimeoutExpired:
        return False, "the interpreter probe timed out"
    if res.returncode != 0 or "ok" not in res.stdout:
        return False, f"the interpreter probe failed: {res.stderr.strip().splitlines()[-1:] or res.stdout}"
    return True, "a vector-add kernel ran under TRITON_INTERPRET=1"


def diagnose(bandwidth_mb: float = 128) -> list[Finding]:
    import torch

    from inferlab.bench import memory_bandwidth
    from inferlab.loading import BUNDLED_DIR, BUNDLED_NAMES

    found = [Finding("versions", "python", platform.python_version())]
    for dist in ("inferlab", "torch", "tokenizers", "safetensors", "transformers", "triton", "nbgrader",
                 "jupyterlab", "ray", "vllm"):
        v = _version(dist)
        found.append(Finding("versions", dist, v or "not installed", ok=v is not None or dist not in
                             ("inferlab", "torch", "tokenizers", "safetensors")))

    import inferlab

    # The runtime that runs: on a hub or after `nbgrader fetch` it is the installed one, not a copy beside the notebooks.
    found.append(Finding("versions", "inferlab source", str(Path(inferlab.__file__).resolve().parent)))
    found.append(Finding("hardware", "cpu", f"{cpu_name()}, {os.cpu_count()} cores, torch threads "
                                            f"{torch.get_num_threads()}"))
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        found.append(Finding("hardware", "gpu", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                                f"{torch.cuda.device_count()} device(s)"))
    else:
        found.append(Finding("hardware", "gpu", "none (CUDA not available): labs run their CPU paths"))
    bw = memory_bandwidth(array_mb=bandwidth_mb, repeats=5)
    found.append(Finding("hardware", "cpu memory bandwidth",
                         f"copy {bw.copy_gb_s:.1f} GB/s, triad {bw.triad_gb_s:.1f} GB/s ({bandwidth_mb:.0f} MB arrays)"))
    if cuda:
        gbw = memory_bandwidth(array_mb=1024, repeats=5, device="cuda")
        found.append(Finding("hardware", "gpu memory bandwidth",
                             f"copy {gbw.copy_gb_s:.0f} GB/s, triad {gbw.triad_gb_s:.0f} GB/s"))

    ok, msg = bubblewrap_works()
    found.append(Finding("grading", "bubblewrap sandbox", msg, ok))
    tri_ok, tri_msg = triton_interpreter_works()
    found.append(Finding("grading", "triton interpreter", tri_msg, tri_ok))
    for name in BUNDLED_NAMES:
        present = (BUNDLED_DIR / name / "model.safetensors").is_file()
        found.append(Finding("models", name, "bundled" if present else "missing: python -m inferlab.train",
                             present))

    for lab in LABS:
        if not lab.gpu_part:
            where = "all parts run here (no GPU part)"
        elif cuda:
            where = f"GPU part runs here: {lab.gpu_part}"
        else:
            where = f"CPU parts only; GPU part skipped: {lab.gpu_part}"
        if lab.needs_triton:
            where += "; Triton kernels " + ("compiled on the GPU" if cuda else
                                            "in the interpreter" if tri_ok else "unavailable (see above)")
        found.append(Finding("labs", lab.name + ("" if lab.available else " (not in this checkout yet)"), where))
    return found
