"""grader.sandbox: run a learner's Jupyter kernel where it can harm nothing.

Only the *kernel* runs inside the sandbox (and, for the check and timing stages, the answers'
and timing workers). The notebook stays in the grading process outside, which sends one cell at
a time over Unix-domain sockets (ZeroMQ's `ipc` transport) in a private folder; the labs' grading
side (hidden inputs, expected values) is never on a disk the learner's code can see
(`hide_grading_side`), and the kernel needs no network at all.

Backends:
* `bwrap` (bubblewrap): new user, PID, network, IPC and UTS namespaces; the system, the
  Python environment and the `inferlab`/`grader` packages read-only; a private writable
  temp dir; nothing else of the host (no `solutions/`, no gradebook, no other submission).
  Resource limits come from `prlimit` (address space, processes, file size, open files,
  CPU seconds); the grader enforces wall time and output size.
* `docker`: the same policy as `docker run` flags (`--network none --read-only --tmpfs
  /tmp --memory --pids-limit --cap-drop ALL`, `--gpus` on GPU hosts), for machines that
  have an engine.
* `none`: the kernel runs as a plain process with the same resource limits. For trusted
  code and debugging only: it isolates nothing.
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from jupyter_client import AsyncKernelManager

BACKENDS = ("bwrap", "docker", "none")


def die_with_parent() -> None:
    """In a child process, before exec: be killed when the process that started it dies (Linux), so a
    killed driver, grading worker or Ray worker leaves nothing running behind (sandboxes die in turn)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: orphans are then left to the hard time limits
        pass


@dataclass(frozen=True)
class Limits:
    """Per-submission limits. Wall time and output are enforced by the executor, the rest by the OS."""

    memory_mb: int = 6144  # address space; torch reserves far more virtual memory than it touches
    processes: int = 512  # threads count as processes for this limit
    wall_s: float = 600.0
    output_bytes: int = 2_000_000
    file_mb: int = 256  # largest file the kernel may write
    tmp_mb: int = 512  # the sandbox's whole writable disk (a RAM-backed tmpfs): filling it fails writes, not the host
    open_files: int = 1024
    cpu_s: int = 1800
    threads: int = 0  # torch/OpenMP threads per kernel; 0: the machine's cores divided among the workers
    gpus: int = 0

    def prlimit_args(self) -> list[str]:
        return ["prlimit", f"--as={self.memory_mb * 2**20}", f"--nproc={self.processes}",
                f"--fsize={self.file_mb * 2**20}", f"--nofile={self.open_files}", f"--cpu={self.cpu_s}", "--"]


def python_roots() -> list[Path]:
    """Folders the kernel's Python needs, read-only: the interpreter, the venv, and editable packages."""
    import importlib.util

    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sysconfig.get_paths()["stdlib"]).parent}
    for package in ("inferlab", "grader"):  # located, not imported: importing inferlab would load torch here
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the {package} package is not installed in this Python: pip install -e .")
        roots.add(Path(spec.origin).resolve().parent)  # labs/inferlab (editable install) or site-packages
    for p in site.getsitepackages():
        roots.add(Path(p))
    real = {r.resolve() for r in roots if r.exists()}
    # Keep only outermost folders: binding a parent already exposes its children.
    return sorted(r for r in real if not any(o != r and o in r.parents for o in real))


def kernel_env(limits: Limits, home: str) -> dict[str, str]:
    # More OpenMP threads than cores, across parallel kernels, slows torch down by orders of magnitude
    # (threads spin waiting for each other): the batch driver sets threads = cores // workers.
    n = str(limits.threads or os.cpu_count() or 1)
    return {"OMP_WAIT_POLICY": "PASSIVE", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "TORCH_NUM_THREADS": n,
            "MPLBACKEND": "module://matplotlib_inline.backend_inline", "MPLCONFIGDIR": f"{home}/.mpl",
            "PYTHONDONTWRITEBYTECODE": "1", "IPYTHONDIR": f"{home}/.ipython", "JUPYTER_PLATFORM_DIRS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            # Self-checks that would only repeat what the autograder measures itself (timing) skip their work.
            "INFERLAB_AUTOGRADE": "1"}


def hide_grading_side(private: Path) -> list[str]:
    """bwrap arguments that put a stub over each lab's grading side (expected values, samples, attacks) and an
    empty folder over their bytecode caches: learner code can import the labs' public checks, never these."""
    from .labs import grading_side_paths

    stub = Path(private) / "grading-side-hidden.py"
    stub.write_text('raise ImportError("the grading side of a lab is not available to learner code")\n')
    args = []
    for path in grading_side_paths():
        args += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", str(stub), str(path)]
    return args


def bwrap_command(inner: list[str], sockets: Path, limits: Limits) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("the bwrap sandbox needs bubblewrap: apt-get install bubblewrap "
                           "(or choose --sandbox docker on a host with a Docker engine)")
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--uid", "1000", "--gid", "1000",
           "--hostname", "sandbox", "--clearenv"]
    # /tmp first: a tmpfs mounted later would hide any bind below it (a checkout under /tmp, say).
    cmd += ["--size", str(limits.tmp_mb * 2**20), "--tmpfs", "/tmp"]
    for system in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc/alternatives", "/etc/ssl", "/etc/fonts",
                   "/etc/ld.so.cache", "/etc/localtime"):
        if os.path.exists(system):
            cmd += ["--ro-bind", system, system]
    for root in python_roots():
        cmd += ["--ro-bind", str(root), str(root)]
    cmd += hide_grading_side(sockets)
    home = "/tmp/home"
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    if limits.gpus:  # the minimal /dev has no GPU: bind the NVIDIA device nodes the driver needs
        for node in sorted(glob.glob("/dev/nvidia*")):
            cmd += ["--dev-bind", node, node]
    cmd += ["--dir", home, "--dir", "/tmp/work",
            "--bind", str(sockets), str(sockets), "--remount-ro", "/", "--chdir", "/tmp/work"]
    for key, value in kernel_env(limits, home).items():
        cmd += ["--setenv", key, value]
    return cmd + limits.prlimit_args() + inner


def docker_command(inner: list[str], sockets: Path, limits: Limits, image: str) -> list[str]:
    cmd = ["docker", "run", "--rm", "-i", "--network", "none", "--read-only", "--tmpfs", f"/tmp:rw,size={limits.tmp_mb}m",
           "--memory", f"{limits.memory_mb}m", "--pids-limit", str(limits.processes), "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--user", "1000:1000", "--cpus", str(limits.threads or os.cpu_count() or 1),
           "-v", f"{sockets}:{sockets}", "-w", "/tmp"]
    if limits.gpus:
        cmd += ["--gpus", str(limits.gpus)]
    for key, value in kernel_env(limits, "/tmp/home").items():
        cmd += ["-e", f"{key}={value}"]
    return cmd + [image] + inner


def sandboxed(inner: list[str], backend: str, limits: Limits, private: Path,
              image: str = "inferlab-grader:latest") -> list[str]:
    """`inner` (a command starting with this Python) wrapped in the chosen sandbox; `private` is the
    one host folder it may write (bind-mounted at the same path)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sandbox {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "bwrap":
        return bwrap_command(inner, private, limits)
    if backend == "docker":
        return docker_command(["python", *inner[1:]], private, limits, image)
    return limits.prlimit_args() + inner


def start_sandboxed(module: str, backend: str, limits: Limits, private: Path,
                    cores: set[int] | None = None) -> subprocess.Popen:
    """`python -m module` in the sandbox, spoken to over its stdin/stdout, in a process group of its own that dies
    with this process; pinned to `cores` (with everything it starts) when given. `private` is its writable folder."""
    private = Path(private).resolve()
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o777)  # the sandboxed user (uid 1000) writes here
    cmd = sandboxed([sys.executable, "-m", module], backend, limits, private)
    if backend == "docker" and cores:  # the container's processes are the engine's, not children of ours
        cmd[2:2] = ["--cpuset-cpus", ",".join(map(str, sorted(cores)))]

    def start() -> None:  # in the child, before exec: the sandbox and everything in it inherit the cores
        if cores:
            os.sched_setaffinity(0, cores)
        die_with_parent()

    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=sandbox_env(backend, limits, private), start_new_session=True, preexec_fn=start)


def stop_sandboxed(proc: subprocess.Popen) -> None:
    """Kill the sandbox and anything the code in it started (its whole process group), and close the pipes."""
    try:
        os.killpg(proc.pid, 9)  # SIGKILL
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass


def sandbox_env(backend: str, limits: Limits, private: Path) -> dict[str, str]:
    """The environment to start the sandbox command with: never the grader's own (tokens, paths, seeds)."""
    if backend == "none":
        return {**kernel_env(limits, str(private)), "PATH": os.environ.get("PATH", "")}
    return {"PATH": os.environ.get("PATH", "")}


class SandboxedKernelManager(AsyncKernelManager):
    """A KernelManager whose kernel process is started inside the chosen sandbox, talking over ipc sockets."""

    def __init__(self, backend: str, limits: Limits, sockets: Path, image: str = "inferlab-grader:latest", **kw):
        if backend not in BACKENDS:
            raise ValueError(f"unknown sandbox {backend!r}; choose one of {', '.join(BACKENDS)}")
        sockets = Path(sockets).resolve()  # the kernel runs in another working directory
        sockets.mkdir(parents=True, exist_ok=True)
        os.chmod(sockets, 0o777)  # the sandboxed user (uid 1000) creates its sockets here
        super().__init__(kernel_name="python3", transport="ipc", ip=str(sockets / "kernel"),
                         connection_file=str(sockets / "connection.json"), **kw)
        self.backend, self.limits, self.sockets, self.image = backend, limits, sockets, image

    def format_kernel_cmd(self, extra_arguments=None) -> list[str]:
        inner = [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file]
        return sandboxed(inner, self.backend, self.limits, self.sockets, self.image)

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        kw["env"] = sandbox_env(self.backend, self.limits, self.sockets)
        # The kernel's own stdout/stderr (start-up banners, crashes) go to a log, not the grader's console.
        log = open(self.sockets / "kernel.log", "ab")  # noqa: SIM115 (closed by close_log)
        self._kernel_log = log
        kw["stdout"], kw["stderr"] = log, log
        return await super()._async_launch_kernel(kernel_cmd, **kw)

    def close_log(self) -> None:
        log = getattr(self, "_kernel_log", None)
        if log is not None and not log.closed:
            log.close()

    @property
    def kernel_log(self) -> str:
        path = self.sockets / "kernel.log"
        return path.read_text(errors="replace") if path.exists() else ""

