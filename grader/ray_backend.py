"""grader.ray_backend: grade a class as Ray tasks (`inferlab autograde LAB --backend ray`).

Each submission is one Ray task that asks for the CPUs and GPUs of the lab's grading profile
(`resources` in `grader/thresholds/<lab>.json`). The task runs the same worker process as the
local backend (`python -m grader.grade_one`), so the sandbox, the limits and the stages are
the same; it runs in a temporary folder of whichever node Ray picked, and returns the result
and the executed notebook to the driver. Nodes need the course image (the grader, the labs'
sources), not the course's storage: the driver ships each submission's bytes with its task,
and only the driver writes results, executed notebooks, the gradebook and feedback.

Without an address, Ray starts on this machine, bound to 127.0.0.1, with its CPUs; with one
(`auto` on a cluster's head node, `ray://HOST:10001` from outside), tasks go to that cluster.
A task whose node or worker dies is retried by Ray; one that still fails becomes a
`grader-error` result naming the reason, which the next run regrades.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .perf import THRESHOLDS_DIR
from .sandbox import Limits, die_with_parent

RETRIES = 2  # Ray re-runs a task whose worker process or node died this many times
DEFAULT_RESOURCES = {"cpu": {"cpus": 1, "gpus": 0}, "gpu": {"cpus": 2, "gpus": 1}}


def submission_resources(lab: str, limits: Limits) -> dict[str, float]:
    """What one submission's task asks Ray for: the lab's grading profile (gpu when `limits.gpus`)."""
    profile = "gpu" if limits.gpus else "cpu"
    path = THRESHOLDS_DIR / f"{lab}.json"
    declared = json.loads(path.read_text()).get("resources", {}) if path.is_file() else {}
    wanted = {**DEFAULT_RESOURCES[profile], **declared.get(profile, {})}
    gpus = max(limits.gpus, wanted["gpus"]) if profile == "gpu" else 0
    return {"num_cpus": max(1, int(wanted["cpus"])), "num_gpus": gpus}


def portable_job(job: dict) -> dict:
    """The job as a node sees it: no path of the driver's (results, course, output) goes with it."""
    keep = ("lab", "student", "fingerprint", "timestamp", "sandbox", "limits", "seed")
    return {**{k: job[k] for k in keep}, "submission_name": Path(job["submission"]).name,
            "source_sha256": hashlib.sha256(Path(job["source"]).read_bytes()).hexdigest()}


def grade_on_node(job: dict, submission: bytes | None, hard_limit_s: float) -> dict[str, Any]:
    """The body of one Ray task: grade one submission in a private temporary folder of this node."""
    from .autograde import source_path

    node = socket.gethostname()
    source = source_path(job["lab"])
    if hashlib.sha256(source.read_bytes()).hexdigest() != job["source_sha256"]:
        return {"node": node, "returncode": None, "result": None, "executed": None,
                "reason": f"node {node} has a different version of lab {job['lab']!r}'s source than the driver: "
                          "run the same course image (or commit) on every Ray node"}
    with tempfile.TemporaryDirectory(prefix="inferlab-ray-") as tmp:
        tmp = Path(tmp)
        submitted = tmp / "submission" / job["submission_name"]
        submitted.parent.mkdir()
        if submission is not None:
            submitted.write_bytes(submission)
        (tmp / "work").mkdir()
        local = {**job, "submission": str(submitted), "source": str(source), "result": str(tmp / "result.json"),
                 "executed": str(tmp / "executed.ipynb"), "workdir": str(tmp / "work")}
        (tmp / "job.json").write_text(json.dumps(local))
        proc = subprocess.Popen([sys.executable, "-m", "grader.grade_one", str(tmp / "job.json")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=die_with_parent)
        overdue = False
        try:
            _, stderr = proc.communicate(timeout=hard_limit_s)
        except subprocess.TimeoutExpired:
            overdue = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
        result_path, executed_path = tmp / "result.json", tmp / "executed.ipynb"
        return {"node": node, "returncode": proc.returncode, "overdue": overdue,
                "stderr": stderr.decode(errors="replace")[-2000:],
                "result": result_path.read_text() if result_path.is_file() else None,
                "executed": executed_path.read_text() if executed_path.is_file() else None}


def why_unreachable(address: str, timeout_s: float = 5.0) -> str:
    """'' when the head at `address` (HOST:PORT or ray://HOST:PORT) accepts a connection, else why not.

    Ray itself retries an unreachable head for minutes before it gives up; this answers in seconds.
    `auto` is left to Ray, which fails at once when no cluster runs on this machine."""
    if address == "auto":
        return ""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return "expected HOST:PORT, ray://HOST:PORT or auto"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        return f"nothing answers at {host}:{port} ({err.strerror or err})"
    return ""


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start Ray on this machine bound to 127.0.0.1.

    Returns whether this call started Ray (then the caller shuts it down again)."""
    import ray

    if ray.is_initialized():
        return False
    # The grader's modules must import on every node: they travel as the working directory's
    # packages only when the nodes lack them (a cluster runs the course image, which has them).
    common = dict(log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    if address:
        unreachable = why_unreachable(address)
        if unreachable:
            raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {unreachable}; check --ray-address "
                               "(`auto` on the head node, ray://HEAD:10001 from outside) and that the cluster is up")
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise RuntimeError(f"cannot reach the Ray cluster at {address!r} ({err}): check --ray-address "
                               "(`auto` on the head node, ray://HEAD:10001 from outside) and that the cluster is up") from None
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 **common)
    return True


def run_jobs_ray(jobs: list[dict], lab: str, workers: int | None, limits: Limits, progress: bool,
                 address: str | None = None, desc: str | None = None) -> list:
    """Run each job as a Ray task; at most `workers` in flight (None: as many as Ray can place)."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    try:
        import ray
    except ImportError:
        raise RuntimeError("the ray backend needs Ray: pip install -e '.[cluster]'") from None
    from tqdm import tqdm

    from .autograde import _outcome, hard_limit_s

    started = connect(address)
    try:
        resources = submission_resources(lab, limits)
        task = ray.remote(max_retries=RETRIES, **resources)(grade_on_node)
        if address is None and resources["num_gpus"] and not ray.cluster_resources().get("GPU"):
            raise RuntimeError("the GPU profile asks each task for a GPU, and this machine has none visible to Ray")
        bar = tqdm(total=len(jobs), desc=desc or f"grading {lab} (ray)", unit="submission",
                   disable=not progress or not jobs)
        pending, running, done = list(jobs), {}, []
        while pending or running:
            while pending and (workers is None or len(running) < workers):
                job = pending.pop(0)
                path = Path(job["submission"])
                data = path.read_bytes() if path.is_file() else None
                ref = task.remote(portable_job(job), data, hard_limit_s(limits))
                running[ref] = job
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                job = running.pop(ref)
                done.append(_collect(job, ref, _outcome))
                bar.update(1)
        bar.close()
        return done
    finally:
        if started:
            ray.shutdown()


def _collect(job: dict, ref, outcome):
    """Write what a task returned into the driver's results (the driver is the only writer)."""
    import ray
    from ray.exceptions import RayError

    try:
        reply = ray.get(ref)
    except RayError as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        return outcome(job, -1, "", False, reason=f"the Ray task failed after {RETRIES} retries "
                                                  f"({type(err).__name__}: {first})")
    if reply["result"]:
        result = json.loads(reply["result"])
        result.update(submission=job["submission"], node=reply["node"])
        if reply["executed"]:
            executed = Path(job["executed"])
            executed.parent.mkdir(parents=True, exist_ok=True)
            executed.write_text(reply["executed"])
            result["executed"] = str(executed)
        tmp = Path(job["result"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(job["result"])
    where = f" on node {reply['node']}"
    reason = reply.get("reason", "")
    if not reason and reply["returncode"] not in (0, None):
        from .autograde import _exit

        reason = (f"the grading worker{where} ran past its hard time limit and was killed" if reply["overdue"] else
                  f"the grading worker{where} exited with {_exit(reply['returncode'])} before writing a result")
    code = 0 if reply["result"] and not reason else (reply["returncode"] or -1)
    return outcome(job, code, reply.get("stderr", ""), reply.get("overdue", False), reason=reason)


__all__ = ["connect", "grade_on_node", "portable_job", "run_jobs_ray", "submission_resources"]
