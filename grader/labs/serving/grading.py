"""grader.labs.serving.grading: the checker's side of the serving lab. Never in a sandbox nor a learner's image.

  SV1 the learner's request_metrics and summarize on a stream trace drawn here; expected values from the
      reference cells (the solution notebook), to the millisecond.
  SV2 the learner's build_app is served in their sandbox on a Unix-domain socket in the folder both sides see
      (`probes.start_server`); this process talks to it with the official openai client and raw HTTP: greedy text
      against the engine's offline output computed here, stream == non-stream, finish_reason, usage, chat, seed,
      stop, the 400 cases, concurrent streams, and a disconnecting client freeing its lane.
  SV3 /metrics before and after this process's own requests.
  SV4 this process's load generator sends a Poisson trace; no request lost or duplicated, greedy tokens,
      concurrency, /metrics against what it saw. Checked once SV2 passes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from ...checks import CheckFailed
from .. import load
from ..common import one_torch_thread
from . import SPEC
from .public import (Offline, Target, metric_cases, serving, verify_api, verify_load, verify_metrics,
                     verify_request_metrics, verify_summary, verify_throughput)

LAB = SPEC.name
MAX_BATCH_SIZE = 4


@functools.lru_cache(maxsize=1)
def reference() -> dict[str, Any]:
    return load(LAB).reference_namespace()


@functools.lru_cache(maxsize=1)
def offline() -> Offline:
    return Offline(reference()["cached_generate"])


def expected_sv1(case: dict[str, Any]) -> dict[str, Any]:
    ns = reference()
    requests = [ns["request_metrics"](r["start_s"], r["chunk_s"], r["output_tokens"]) for r in case["records"] if r["ok"]]
    return {"requests": requests, "summary": ns["summarize"](case["records"], case["duration_s"], case["slo_ms"])}


def public_expected() -> dict[str, Any]:
    from .public import PUBLIC_SEED

    return {"SV1": expected_sv1(metric_cases(PUBLIC_SEED))}


def hidden_sv1(learner, seed: int) -> dict[str, Any]:
    case = metric_cases(seed)
    want = expected_sv1(case)

    def remote_request_metrics(start_s, chunk_s, output_tokens):
        return learner.call("request_metrics", start_s=start_s, chunk_s=chunk_s, output_tokens=output_tokens)

    def remote_summarize(records, duration_s, slo_ms):
        return learner.call("summarize", records=records, duration_s=duration_s, slo_ms=slo_ms)

    verify_request_metrics(remote_request_metrics, case, want["requests"])
    return verify_summary(remote_summarize, case, want["summary"])


class LearnerServer:
    """The learner's build_app, served in their sandbox for the duration of a `with` block."""

    def __init__(self, learner, max_batch_size: int = MAX_BATCH_SIZE):
        self.learner, self.max_batch_size = learner, max_batch_size

    def __enter__(self) -> Target:
        folder = Path(self.learner.private)  # bound at its own path inside the sandbox: both sides see it
        path = folder / f"server-{os.getpid()}-{id(self) % 10_000}.sock"
        if len(str(path)) > 100:  # a Unix socket's path has at most 107 bytes
            raise RuntimeError(f"the shared folder's path is too long for a Unix socket: {path}")
        reply = self.learner.call("start_server", socket_path=str(path), max_batch_size=self.max_batch_size)
        if not isinstance(reply, dict) or "server" not in reply or not path.exists():
            raise CheckFailed("build_app's server did not start listening")
        self.handle = reply["server"]
        return Target(uds=str(path))

    def __exit__(self, *exc) -> None:
        try:
            self.learner.call("stop_server", server=self.handle)
        except Exception:  # noqa: BLE001 (the sandbox stops it anyway)
            pass


def on_server(check):
    """Run the check against the learner's server, started once per answers' process and kept for the next task
    (SV2-SV4 check one server, as a client would meet it; the sandbox stops it with the process)."""
    @functools.wraps(check)
    def run(learner, seed: int) -> dict[str, Any]:
        with one_torch_thread():
            target = getattr(learner, "serving_target", None)
            if target is None:
                target = LearnerServer(learner).__enter__()
                learner.serving_target = target
            return check(target, seed)
    return run


@on_server
def hidden_sv2(target: Target, seed: int) -> dict[str, Any]:
    return verify_api(target, offline(), seed, MAX_BATCH_SIZE)


@on_server
def hidden_sv3(target: Target, seed: int) -> dict[str, Any]:
    return verify_metrics(target, offline(), seed)


@on_server
def hidden_sv4(target: Target, seed: int) -> dict[str, Any]:
    measured = verify_load(target, offline(), seed)
    # The reference server runs here, in the grading process (trusted code, 127.0.0.1), one run at a time with the
    # learner's: a throughput is only comparable with another measured in the same run on the same machine.
    with serving(reference()["build_app"], max_batch_size=MAX_BATCH_SIZE) as reference_server:
        return {**measured, **verify_throughput(target, reference_server, offline(), seed)}


HIDDEN_CHECKS = {"SV1": hidden_sv1, "SV2": hidden_sv2, "SV3": hidden_sv3, "SV4": hidden_sv4}
