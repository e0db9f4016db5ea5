"""grader.labs.serving.probes: what the checker may ask of a learner's serving answers, in their sandboxed process.

The sandbox has a network of its own, so the learner's server listens on a Unix-domain socket in the one folder
the checker and the sandbox both see; the checker then talks to it with the official openai client, over HTTP,
from outside. The server runs on a thread of this process (its own event loop) between probe calls, until
`stop_server`. None of these probes holds an expected value or decides anything: `grading.py` does that.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import os
import threading
from typing import Any

SERVERS: dict[int, dict[str, Any]] = {}
START_TIMEOUT_S = 60.0


def start_server(session, socket_path: str, max_batch_size: int = 8) -> dict[str, Any]:
    """SV2-SV4: build_app(model, tokenizer, max_batch_size) served on `socket_path` by a thread of this process."""
    from aiohttp import web

    from inferlab import load_model, load_tokenizer

    build_app = session.answer("build_app")
    # A fresh model from the bundled weights: the checker's expected tokens come from the same files.
    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")
    app = build_app(model, tokenizer, max_batch_size)
    if not isinstance(app, web.Application):
        raise TypeError(f"build_app must return an aiohttp web.Application, got {type(app).__name__}")
    state: dict[str, Any] = {"error": None}
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        state["runner"] = runner
        await web.UnixSite(runner, socket_path).start()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve())
        except Exception as err:  # noqa: BLE001 (reported to the checker by the probe call below)
            state["error"] = f"{type(err).__name__}: {err}"
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="learner-server", daemon=True)
    thread.start()
    if not ready.wait(START_TIMEOUT_S):
        raise TimeoutError(f"the server did not start listening within {START_TIMEOUT_S:.0f} s")
    if state["error"]:
        raise RuntimeError(f"the server could not start: {state['error']}")
    handle = len(SERVERS)
    SERVERS[handle] = {"loop": loop, "thread": thread, "runner": state["runner"], "path": socket_path}
    return {"server": handle, "socket": socket_path, "listening": os.path.exists(socket_path)}


def stop_server(session, server: int) -> bool:
    entry = SERVERS.pop(server, None)
    if entry is None:
        return False
    loop = entry["loop"]
    future = asyncio.run_coroutine_threadsafe(entry["runner"].cleanup(), loop)
    try:
        future.result(timeout=10)
    except Exception:  # noqa: BLE001 (a server that will not stop still stops with the sandbox)
        pass
    loop.call_soon_threadsafe(loop.stop)
    entry["thread"].join(timeout=5)
    return True


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return number


def request_metrics(session, start_s: float, chunk_s: list[float], output_tokens: int) -> dict[str, Any]:
    """SV1: the learner's request_metrics on the checker's trace, as plain numbers."""
    out = session.answer("request_metrics")(start_s, list(chunk_s), output_tokens)
    if not isinstance(out, dict):
        return {"returned": type(out).__name__}
    plain: dict[str, Any] = {}
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        if key in out:
            plain[key] = _number(out[key], f"request_metrics' {key!r}")
    if "itl_ms" in out:
        plain["itl_ms"] = [_number(v, "each of request_metrics' itl_ms") for v in list(out["itl_ms"])]
    return plain


def summarize(session, records: list[dict], duration_s: float, slo_ms: dict | None) -> dict[str, Any]:
    """SV1: the learner's summarize on the checker's records, as plain numbers (non-numbers left out)."""
    out = session.answer("summarize")(records, duration_s, slo_ms)
    if not isinstance(out, dict):
        return {"returned": type(out).__name__}
    plain = {}
    for key, value in out.items():
        if isinstance(key, str) and isinstance(value, numbers.Real) and not isinstance(value, bool):
            plain[key[:60]] = float(value)  # numpy numbers too
    return plain


PROBES = {"start_server": start_server, "stop_server": stop_server, "request_metrics": request_metrics,
          "summarize": summarize}
