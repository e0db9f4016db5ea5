"""grader.labs.serving.public: the serving lab's checks (book ch. 9), tasks SV1 to SV4, as a notebook sees them.

The notebook imports this module as `checks`. The checks of SV2-SV4 talk to the learner's server over HTTP,
with the official `openai` client and a small load generator of their own, and compare with what they compute
themselves: greedy tokens of the bundled `tiny` model (the engine's offline output), and the traffic they sent.
SV1's expected numbers on the public trace are stored in `public_expected.json`, never computed here.

The autograder runs the same `verify_*` functions in its own process, on seeds drawn at grading time, against
the learner's server started in a sandboxed process on a Unix-domain socket (`probes.start_server`,
`grading.py`).

The learner's surface, fixed by the notebook:
  SV1 `request_metrics(start_s, chunk_s, output_tokens) -> {ttft_ms, tpot_ms, itl_ms, e2el_ms}` and
      `summarize(records, duration_s, slo_ms) -> {completed, ..., p99_tpot_ms, goodput}`.
  SV2 `build_app(model, tokenizer, max_batch_size) -> aiohttp.web.Application`: /v1/completions,
      /v1/chat/completions, /v1/models, /health.
  SV3 the same app's /metrics.
  SV4 the same app under a Poisson load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...checks import CheckFailed
from ...perf import threshold

LAB = "serving"
PUBLIC_SEED = 0
EXPECTED_PATH = Path(__file__).with_name("public_expected.json")
MODEL = "tiny"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TOL_MS = 1e-3  # "to the millisecond": a thousandth of one, so only a different definition can miss


def run_async(coroutine):
    """Run a coroutine to its end and return its result, also from a Jupyter cell (where an event loop already
    runs, so asyncio.run refuses): then on a thread of its own, with a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = asyncio.run(coroutine)
        except BaseException as err:  # noqa: BLE001 (raised again in the caller's thread)
            out["error"] = err

    thread = threading.Thread(target=run, name="run-async")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------------------------------------ SV1

def metric_cases(seed: int) -> dict[str, Any]:
    """A recorded stream trace: when each request was sent, when each chunk came, how many tokens it had.

    Chunks and tokens differ on purpose (a chunk may carry several tokens), and the gaps are tens of
    milliseconds, so a TPOT over all tokens, or over chunks, misses by far more than the tolerance."""
    rng = np.random.default_rng(seed)
    records = []
    t = 100.0 + float(rng.uniform(0, 50))
    for i in range(int(rng.integers(8, 14))):
        start = t + float(rng.uniform(0, 0.3))
        ttft = float(rng.uniform(0.02, 0.4))
        n_chunks = int(rng.integers(1, 12)) if i else 1  # one request with a single chunk and token
        chunks = list(start + ttft + np.cumsum(np.r_[0.0, rng.uniform(0.01, 0.12, n_chunks - 1)]))
        tokens = n_chunks + int(rng.integers(0, 3)) if i else 1
        records.append({"start_s": start, "chunk_s": [float(c) for c in chunks], "output_tokens": tokens,
                        "prompt_tokens": int(rng.integers(4, 200)), "ok": True})
        t = start
    records.append({"start_s": t + 0.1, "chunk_s": [], "output_tokens": 0, "prompt_tokens": 9, "ok": False})
    first = min(r["start_s"] for r in records)
    last = max(max(r["chunk_s"], default=r["start_s"]) for r in records)
    slo = {"ttft": float(rng.uniform(80, 300)), "tpot": float(rng.uniform(30, 90)), "e2el": float(rng.uniform(300, 900))}
    return {"records": records, "duration_s": last - first, "slo_ms": slo}


def _close(got: Any, want: Any, what: str) -> None:
    if want is None:
        if got is not None:
            raise CheckFailed(f"{what} must be None (undefined), got {got}")
        return
    if got is None or not isinstance(got, (int, float)) or abs(got - want) > TOL_MS:
        raise CheckFailed(f"{what} is {got}, expected {want:.6g} (to the millisecond)", got=got, expected=want)


def verify_request_metrics(request_metrics: Callable[..., dict], case: dict[str, Any],
                           expected: list[dict[str, Any]]) -> None:
    for r, want in zip([r for r in case["records"] if r["ok"]], expected):
        got = request_metrics(r["start_s"], r["chunk_s"], r["output_tokens"])
        if not isinstance(got, dict) or "returned" in got:
            raise CheckFailed("request_metrics must return a dict {ttft_ms, tpot_ms, itl_ms, e2el_ms}")
        where = f"for a request with {len(r['chunk_s'])} chunks and {r['output_tokens']} tokens"
        for key in ("ttft_ms", "e2el_ms", "tpot_ms"):
            if key not in got:
                raise CheckFailed(f"request_metrics returned no {key!r}")
            hint = ""
            if key == "tpot_ms" and want[key] is not None and isinstance(got[key], (int, float)):
                over_all = want["e2el_ms"] / r["output_tokens"]
                if abs(got[key] - over_all) < 1e-6 and r["output_tokens"] > 1:
                    hint = ": TPOT leaves out the first token, whose wait is TTFT's: (E2EL - TTFT) / (tokens - 1)"
            try:
                _close(got[key], want[key], f"{key} {where}")
            except CheckFailed as err:
                raise CheckFailed(err.message + hint) from None
        itl = list(got.get("itl_ms") or [])
        if len(itl) != len(want["itl_ms"]) or any(abs(a - b) > TOL_MS for a, b in zip(itl, want["itl_ms"])):
            raise CheckFailed(f"itl_ms {where} is {[round(x, 3) for x in itl][:6]}, expected "
                              f"{[round(x, 3) for x in want['itl_ms']][:6]}: the gaps between consecutive chunks")


SUMMARY_KEYS = ("completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
                *(f"{s}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "p50", "p90", "p99")),
                "goodput")


def verify_summary(summarize: Callable[..., dict], case: dict[str, Any], expected: dict[str, float]) -> dict:
    got = summarize(case["records"], case["duration_s"], case["slo_ms"])
    if not isinstance(got, dict) or "returned" in got:
        raise CheckFailed("summarize must return a dict of numbers")
    for key in SUMMARY_KEYS:
        if key not in got:
            raise CheckFailed(f"summarize returned no {key!r}")
        tol = TOL_MS if key.endswith("_ms") else 1e-6 * max(1.0, abs(expected[key]))
        if not isinstance(got[key], (int, float)) or abs(got[key] - expected[key]) > tol:
            hint = {"goodput": ": requests per second that meet every SLO given (a one-token request has no TPOT, "
                               "so it meets any TPOT SLO)",
                    "failed": ": a request with ok=False counts as failed, and in no latency"}.get(key, "")
            raise CheckFailed(f"summarize's {key} is {got[key]}, expected {expected[key]:.6g}{hint}")
    return {"goodput": round(got["goodput"], 3), "p99_tpot_ms": round(got["p99_tpot_ms"], 3)}


def public_expected() -> dict[str, Any]:
    return json.loads(EXPECTED_PATH.read_text())


def check_sv1(request_metrics: Callable[..., dict], summarize: Callable[..., dict]) -> dict[str, Any]:
    case, want = metric_cases(PUBLIC_SEED), public_expected()["SV1"]
    verify_request_metrics(request_metrics, case, want["requests"])
    return verify_summary(summarize, case, want["summary"])


# ------------------------------------------------------------------------------------------------ the checker's
# view of a server: an openai client, raw HTTP for the framing, and a small load generator

@dataclass
class Target:
    """How to reach a server: a Unix-domain socket (the autograder) or http://127.0.0.1:PORT (the notebook)."""

    base_url: str = "http://localhost"
    uds: str | None = None

    def client(self, timeout: float = 60.0):
        import httpx
        import openai

        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0, timeout=timeout,
                             http_client=httpx.Client(transport=transport, timeout=timeout))

    def async_client(self, timeout: float = 60.0):
        import httpx
        import openai

        transport = httpx.AsyncHTTPTransport(uds=self.uds) if self.uds else None
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0, timeout=timeout,
                                  http_client=httpx.AsyncClient(transport=transport, timeout=timeout))

    def http(self, timeout: float = 60.0):
        import httpx

        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return httpx.Client(base_url=self.base_url, transport=transport, timeout=timeout)

    def async_http(self, timeout: float = 60.0, limit: int = 256):
        import httpx

        transport = httpx.AsyncHTTPTransport(uds=self.uds, limits=httpx.Limits(max_connections=limit)) \
            if self.uds else None
        return httpx.AsyncClient(base_url=self.base_url, transport=transport, timeout=timeout,
                                 limits=httpx.Limits(max_connections=limit))


class Offline:
    """The engine's offline greedy output: what every greedy completion must say (the model runs here)."""

    def __init__(self, generate: Callable[..., list[int]] | None = None):
        """`generate(model, prompt, max_new_tokens, eos_id=...)`: the given `cached_generate` (the kv_cache lab's
        reference; the notebook passes its given cell's), or recomputing every step when none is given."""
        from inferlab import load_model, load_tokenizer, naive_generate

        self.model, self.tokenizer = load_model(MODEL), load_tokenizer(MODEL)
        self.generate = generate or naive_generate
        self.context = self.model.args.max_seq_len
        self.cache: dict[tuple, list[int]] = {}

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """New tokens, the eos included when the model stops (as the server counts them)."""
        import torch

        key = (tuple(prompt), max_tokens)
        if key not in self.cache:
            with torch.inference_mode():
                self.cache[key] = list(self._cached(prompt, max_tokens))
        return self.cache[key]

    def _cached(self, prompt: list[int], max_tokens: int) -> list[int]:
        return [int(t) for t in self.generate(self.model, list(prompt), max_tokens, eos_id=self.tokenizer.eos_id)]

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        import jinja2

        bos = self.tokenizer.decode([self.tokenizer.bos_id], skip_special=False)
        text = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True, bos_token=bos)
        return self.tokenizer.encode(text, bos=False)  # the template writes the bos, as vLLM's chat does

    @staticmethod
    def reason(tokens: list[int], max_tokens: int, eos: int) -> str:
        return "stop" if tokens[-1:] == [eos] else "length"


# ------------------------------------------------------------------------------------------------ SV2

def api_cases(offline: Offline, seed: int, n: int = 4) -> list[dict[str, Any]]:
    """Prompts (token ids or text) with their greedy completions, computed here."""
    from inferlab.workloads import prompts as held_out

    rng = np.random.default_rng(seed)
    cases = []
    for i, tokens in enumerate(held_out(offline.tokenizer, n, seed=seed, min_tokens=6, max_tokens=40)):
        max_tokens = int(rng.integers(8, 40))
        prompt: Any = tokens
        if i % 2:  # a text prompt: the server tokenizes it as the tokenizer does (bos first)
            prompt = offline.tokenizer.decode(tokens)
            tokens = offline.tokenizer.encode(prompt)
        want = offline.greedy(tokens, max_tokens)
        cases.append({"prompt": prompt, "tokens": tokens, "max_tokens": max_tokens, "greedy": want,
                      "text": offline.text(want), "reason": Offline.reason(want, max_tokens, offline.tokenizer.eos_id)})
    return cases


def _sse_events(raw: bytes) -> list[str]:
    """The data of each event of a text/event-stream body, checked for framing: `data: ...` then a blank line."""
    text = raw.decode()
    if not text.endswith("\n\n"):
        raise CheckFailed("the stream must end with a blank line after its last event (each event is "
                          "'data: <json>\\n\\n')")
    events = []
    for block in text[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if len(lines) != 1 or not lines[0].startswith("data: "):
            raise CheckFailed(f"each server-sent event must be one line 'data: <json>' followed by a blank line; got "
                              f"{block[:80]!r}")
        events.append(lines[0][len("data: "):])
    return events


def verify_stream_framing(target: Target, body: dict[str, Any], path: str = "/v1/completions") -> dict[str, Any]:
    """One streamed request read as raw bytes: framing, one finish_reason in the last choice chunk, the usage
    chunk (empty choices) last before data: [DONE]."""
    with target.http() as http:
        response = http.post(path, json=body)
    if response.status_code != 200:
        raise CheckFailed(f"a streamed request got HTTP {response.status_code}: {response.text[:200]}")
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        raise CheckFailed(f"a stream must be sent as Content-Type text/event-stream, got "
                          f"{response.headers.get('content-type')!r}")
    events = _sse_events(response.content)
    if not events or events[-1] != "[DONE]":
        raise CheckFailed("a stream must end with the event 'data: [DONE]'")
    chunks = []
    for data in events[:-1]:
        try:
            chunks.append(json.loads(data))
        except json.JSONDecodeError:
            raise CheckFailed(f"every event before [DONE] must be JSON; got {data[:80]!r}") from None
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    with_choices = [c for c in chunks if c.get("choices")]
    reasons = [c["choices"][0].get("finish_reason") for c in with_choices]
    if not reasons or reasons[-1] is None or any(r is not None for r in reasons[:-1]):
        raise CheckFailed(f"finish_reason must be null in every chunk but the last one with choices, and set there; "
                          f"got {reasons[-4:]}")
    if include_usage:
        last = chunks[-1]
        if last.get("choices") != [] or not isinstance(last.get("usage"), dict):
            raise CheckFailed("with stream_options.include_usage, the last chunk before [DONE] must have "
                              "\"choices\": [] and the usage")
        if any(c.get("usage") is not None for c in chunks[:-1]):
            raise CheckFailed("with include_usage, every chunk but the last must carry \"usage\": null")
    elif any(c.get("usage") for c in chunks):
        raise CheckFailed("usage must not be streamed unless stream_options.include_usage is true")
    return {"chunks": len(chunks), "usage": chunks[-1].get("usage") if include_usage else None}


def _expect_400(call: Callable[[], Any], what: str) -> None:
    import openai

    try:
        call()
    except openai.BadRequestError:
        return
    except openai.APIStatusError as err:
        raise CheckFailed(f"{what} must get HTTP 400 Bad Request, got {err.status_code}") from None
    raise CheckFailed(f"{what} must get HTTP 400 Bad Request with a message, but it succeeded")


def client_errors(check: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """What the openai client or httpx raise on a server's malformed answer (bad JSON in an event, a missing
    field, a dropped connection) is the server's fault: a failed check that says so, not a grader error."""
    import functools

    @functools.wraps(check)
    def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        import httpx
        import openai

        try:
            return check(*args, **kwargs)
        except CheckFailed:
            raise
        except (openai.APIError, httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            raise CheckFailed(f"the openai client could not read your server's answer: {type(err).__name__}: "
                              f"{str(err)[:200]}") from None
    return run


@client_errors
def verify_api(target: Target, offline: Offline, seed: int, max_batch_size: int) -> dict[str, Any]:
    """SV2 with the official openai client: greedy text, stream == non-stream, finish_reason, usage, chat,
    seed and stop, the 400 cases, concurrent streams, and a client that disconnects frees its lane."""
    import openai

    client = target.client()
    with target.http() as http:
        health = http.get("/health")
    if health.status_code != 200:
        raise CheckFailed(f"GET /health must answer 200 when the server is up, got {health.status_code}")
    cases = api_cases(offline, seed)
    case = cases[0]
    verify_stream_framing(target, {"model": MODEL, "prompt": case["prompt"], "max_tokens": case["max_tokens"],
                                   "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    verify_stream_framing(target, {"model": MODEL, "prompt": case["prompt"], "max_tokens": 5, "temperature": 0,
                                   "stream": True})
    for case in cases:
        common = {"model": MODEL, "prompt": case["prompt"], "max_tokens": case["max_tokens"], "temperature": 0}
        try:
            full = client.completions.create(**common)
        except openai.APIError as err:
            raise CheckFailed(f"a greedy /v1/completions request failed: {err}") from None
        text, choice = full.choices[0].text, full.choices[0]
        if text != case["text"]:
            raise CheckFailed(f"greedy completion of {str(case['prompt'])[:40]!r} (max_tokens {case['max_tokens']}) is "
                              f"{text[:60]!r}; the engine's offline greedy output is {case['text'][:60]!r}")
        if choice.finish_reason != case["reason"]:
            raise CheckFailed(f"finish_reason is {choice.finish_reason!r}, expected {case['reason']!r}: 'length' when "
                              "max_tokens ran out, 'stop' at the end-of-sequence token or a stop string")
        usage = (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) if full.usage else None
        want_usage = (len(case["tokens"]), len(case["greedy"]), len(case["tokens"]) + len(case["greedy"]))
        if usage != want_usage:
            raise CheckFailed(f"usage (prompt, completion, total) is {usage}, expected {want_usage} (completion tokens "
                              "count every token generated, the end-of-sequence token included)")
        stream = client.completions.create(**common, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        if streamed != text:
            raise CheckFailed(f"the streamed text {streamed[:60]!r} differs from the non-streamed text {text[:60]!r} "
                              "at temperature 0")
        if chunks[-1].usage is None or (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens,
                                        chunks[-1].usage.total_tokens) != want_usage:
            raise CheckFailed(f"the usage chunk says {chunks[-1].usage}, expected (prompt, completion, total) "
                              f"{want_usage}")
    case = cases[0]
    # Chat: the template of the notebook, the same rules.
    messages = [{"role": "user", "content": offline.text(cases[1]["tokens"])[:80]}]
    chat_tokens = offline.chat_prompt(messages)
    want = offline.greedy(chat_tokens, 24)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    if reply.choices[0].message.content != offline.text(want) or reply.choices[0].message.role != "assistant":
        raise CheckFailed(f"the chat reply is {reply.choices[0].message.content!r:.60}; expected the greedy "
                          f"completion of the chat template's prompt, {offline.text(want)!r:.60}")
    if reply.usage is None or reply.usage.prompt_tokens != len(chat_tokens):
        raise CheckFailed(f"chat usage.prompt_tokens must count the templated prompt ({len(chat_tokens)} tokens)")
    pieces = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    if "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) != offline.text(want):
        raise CheckFailed("the streamed chat text differs from the non-streamed one at temperature 0")
    verify_stream_framing(target, {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0,
                                   "stream": True}, path="/v1/chat/completions")
    # Stop strings and seeds.
    long = next((c for c in cases if len(c["text"]) > 12), None)
    if long is not None:
        stop = long["text"][len(long["text"]) // 2:][:3]
        cut = long["text"][:long["text"].find(stop)]
        got = client.completions.create(model=MODEL, prompt=long["prompt"], max_tokens=long["max_tokens"],
                                        temperature=0, stop=[stop])
        if got.choices[0].text != cut or got.choices[0].finish_reason != "stop":
            raise CheckFailed(f"with stop={[stop]!r} the text must end before the first occurrence of the stop string "
                              f"with finish_reason 'stop'; got {got.choices[0].text!r:.60} and "
                              f"{got.choices[0].finish_reason!r}")
    sampled = [client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=12, temperature=0.9,
                                         top_p=0.9, seed=seed % 1000 + 1).choices[0].text for _ in range(2)]
    if sampled[0] != sampled[1]:
        raise CheckFailed("two requests with the same seed (temperature 0.9) gave different texts: seed each "
                          "request's own generator")
    # The 400 cases.
    _expect_400(lambda: client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=4,
                                                  stream_options={"include_usage": True}),
                "stream_options without stream")
    _expect_400(lambda: client.completions.create(model=MODEL, prompt=[5] * (offline.context + 3), max_tokens=4),
                "a prompt longer than the context")
    _expect_400(lambda: client.completions.create(model=MODEL, prompt=case["tokens"], max_tokens=offline.context),
                "a prompt plus max_tokens beyond the context")
    _expect_400(lambda: client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=4, temperature=-1),
                "a negative temperature")
    concurrent = verify_concurrent(target, offline, seed + 1, n=max_batch_size + 2)
    freed = verify_disconnect_frees(target, offline, max_batch_size)
    return {"requests_checked": len(cases) * 2 + 6, **concurrent, **freed}


def verify_concurrent(target: Target, offline: Offline, seed: int, n: int) -> dict[str, Any]:
    """n streams at once (more than the batch holds): each gets its own greedy tokens."""
    cases = api_cases(offline, seed, n)

    async def one(client, case) -> str:
        stream = await client.completions.create(model=MODEL, prompt=case["tokens"], max_tokens=case["max_tokens"],
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        client = target.async_client()
        try:
            return await asyncio.gather(*(one(client, c) for c in cases))
        finally:
            await client.close()

    texts = run_async(all_of_them())
    for i, (case, text) in enumerate(zip(cases, texts)):
        if text != case["text"]:
            raise CheckFailed(f"with {n} concurrent streams, stream {i} got {text[:50]!r}, expected its own greedy "
                              f"text {case['text'][:50]!r}: keep each request's tokens apart")
    return {"concurrent_streams": n}


def long_prompt(offline: Offline, max_tokens: int) -> list[int]:
    """A prompt whose greedy continuation does not stop before max_tokens (so only a free lane ends it early)."""
    from inferlab.workloads import prompts as held_out

    for tokens in held_out(offline.tokenizer, 12, seed=7, min_tokens=8, max_tokens=16):
        if len(offline.greedy(tokens, max_tokens)) == max_tokens and offline.greedy(tokens, max_tokens)[-1] != \
                offline.tokenizer.eos_id:
            return tokens
    raise RuntimeError("no held-out prompt runs to max_tokens without eos")


def verify_disconnect_frees(target: Target, offline: Offline, max_batch_size: int) -> dict[str, Any]:
    """Fill every lane with long streams, read one chunk of each and hang up: a short request sent next must not
    wait for them to run to max_tokens (measured against the time one of them takes in full, same server)."""
    import httpx

    max_tokens = 64
    prompt = long_prompt(offline, max_tokens)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    with target.http(timeout=120) as http:
        started = time.perf_counter()
        chunk_s = []
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk_s.append(time.perf_counter())
        full_s = time.perf_counter() - started
        bars = threshold(LAB, "SV2")
        spread = (chunk_s[-1] - chunk_s[0]) / (chunk_s[-1] - started) if len(chunk_s) > 1 else 0.0
        if spread < bars["min_stream_spread_fraction"]:
            raise CheckFailed(f"tokens must be sent as they are made: the {len(chunk_s)} events of a {max_tokens}-token "
                              f"stream arrived within {1e3 * (chunk_s[-1] - chunk_s[0]) if chunk_s else 0:.0f} ms, at "
                              f"the end of its {1e3 * full_s:.0f} ms; is the event loop blocked while the batch runs? "
                              "(run each step off the loop, and await between steps)")
        for _ in range(max_batch_size):
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                for _line in response.iter_lines():
                    break  # one event, then the client leaves
        time.sleep(0.05)
        started = time.perf_counter()
        try:
            http.post("/v1/completions", json={**body, "max_tokens": 2}).raise_for_status()
        except httpx.HTTPError as err:
            raise CheckFailed(f"a request after clients disconnected failed: {err}") from None
        after_s = time.perf_counter() - started
    if after_s > bars["max_after_disconnect_fraction"] * full_s:
        raise CheckFailed(f"after {max_batch_size} streaming clients disconnected, a 2-token request took "
                          f"{after_s:.2f} s, about what their {max_tokens}-token generations take ({full_s:.2f} s): "
                          "a client that disconnects must leave the batch at the next step and free its lane")
    return {"after_disconnect_s": round(after_s, 3), "full_generation_s": round(full_s, 3),
            "stream_spread": round(spread, 3)}


# ------------------------------------------------------------------------------------------------ SV3

REQUIRED_METRICS = {  # family name as prometheus_client's parser gives it -> type
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:kv_cache_usage_perc": "gauge"}
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


def scrape(target: Target) -> dict[str, Any]:
    """GET /metrics, parsed: {family: {"type": ..., "samples": {(name, labels): value}}}."""
    from prometheus_client.parser import text_string_to_metric_families

    with target.http() as http:
        response = http.get("/metrics")
    if response.status_code != 200:
        raise CheckFailed(f"GET /metrics must answer 200, got {response.status_code}")
    try:
        families = list(text_string_to_metric_families(response.text))
    except Exception as err:  # noqa: BLE001 (the parser's errors are the learner's format)
        raise CheckFailed(f"/metrics is not in Prometheus' text format: {type(err).__name__}: {err}") from None
    return {f.name: {"type": f.type, "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                                 for s in f.samples}} for f in families}


def metric_sum(scraped: dict[str, Any], family: str, sample: str) -> float:
    """The sum of a family's samples named `sample` over all labels (0 when absent)."""
    return sum(v for (name, _), v in scraped.get(family, {}).get("samples", {}).items() if name == sample)


@client_errors
def verify_metrics(target: Target, offline: Offline, seed: int) -> dict[str, Any]:
    """SV3: the families exist with vLLM's names and types, the TTFT buckets are vLLM's, and the counters grow by
    exactly the traffic sent meanwhile; the gauges are back to zero when the server is idle."""
    before = scrape(target)
    for family, kind in REQUIRED_METRICS.items():
        if family not in before:
            raise CheckFailed(f"/metrics has no {family} ({kind}); name the metrics as vLLM does")
        if before[family]["type"] != kind:
            raise CheckFailed(f"{family} must be a {kind}, got a {before[family]['type']}")
    buckets = sorted({float(dict(labels)["le"]) for (name, labels), _ in before["vllm:time_to_first_token_seconds"]
                      ["samples"].items() if name.endswith("_bucket")} - {math.inf})
    if tuple(buckets) != VLLM_TTFT_BUCKETS:
        raise CheckFailed(f"the TTFT histogram's buckets are {buckets[:6]}...; use vLLM's, so that one dashboard "
                          f"reads both servers: {list(VLLM_TTFT_BUCKETS[:6])}...")
    client = target.client()
    cases = api_cases(offline, seed, 3)
    prompt_tokens = generated = requests = 0
    for i, case in enumerate(cases):
        if i % 2:  # streamed, read whole as bytes: SV3 counts requests, whatever SV2 says of the framing
            with target.http() as http:
                http.post("/v1/completions", json={"model": MODEL, "prompt": case["tokens"], "temperature": 0,
                                                   "max_tokens": case["max_tokens"], "stream": True}).read()
        else:
            client.completions.create(model=MODEL, prompt=case["tokens"], max_tokens=case["max_tokens"], temperature=0)
        prompt_tokens += len(case["tokens"])
        generated += len(case["greedy"])
        requests += 1
    time.sleep(0.05)
    after = scrape(target)
    deltas = {
        "prompt tokens (vllm:prompt_tokens_total)": (metric_sum(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total")
                                                     - metric_sum(before, "vllm:prompt_tokens", "vllm:prompt_tokens_total"),
                                                     prompt_tokens),
        "generated tokens (vllm:generation_tokens_total)": (
            metric_sum(after, "vllm:generation_tokens", "vllm:generation_tokens_total")
            - metric_sum(before, "vllm:generation_tokens", "vllm:generation_tokens_total"), generated),
        "requests in vllm:e2e_request_latency_seconds_count": (
            metric_sum(after, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count")
            - metric_sum(before, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count"),
            requests),
        "first tokens in vllm:time_to_first_token_seconds_count": (
            metric_sum(after, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count")
            - metric_sum(before, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count"),
            requests),
        "gaps in vllm:inter_token_latency_seconds_count": (
            metric_sum(after, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count")
            - metric_sum(before, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count"),
            generated - requests)}
    for what, (got, want) in deltas.items():
        if abs(got - want) > 1e-9:
            raise CheckFailed(f"/metrics counted {got:g} {what} for {requests} requests the grader sent, which had "
                              f"{want} (count each once, when it happens)")
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        if metric_sum(after, gauge, gauge) != 0:
            raise CheckFailed(f"{gauge} is {metric_sum(after, gauge, gauge):g} on an idle server; expected 0")
    usage = metric_sum(after, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc")
    if not 0 <= usage <= 1:
        raise CheckFailed(f"vllm:kv_cache_usage_perc is {usage}; vLLM reports a fraction from 0 to 1")
    return {"requests": requests, "generated_tokens": generated}


# ------------------------------------------------------------------------------------------------ SV4: the grader's
# own load generator (asyncio over httpx): one streamed request per trace entry, sent at its arrival time

async def _one_request(http, request, params: dict[str, Any], t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
    body = {"model": MODEL, "prompt": list(request.prompt), "max_tokens": request.max_new_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **params}
    record = {"id": request.id, "start_s": time.perf_counter(), "chunk_s": [], "text": "", "ids": set(),
              "usage": None, "finish": [], "ok": False, "prompt_tokens": len(request.prompt), "output_tokens": 0,
              "error": ""}
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                record["ids"].add(chunk.get("id"))
                if chunk.get("usage"):
                    record["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        record["chunk_s"].append(time.perf_counter())
                    record["text"] += choice.get("text") or ""
                    if choice.get("finish_reason"):
                        record["finish"].append(choice["finish_reason"])
                        if not record["chunk_s"] or record["chunk_s"][-1] != time.perf_counter():
                            record["chunk_s"].append(time.perf_counter())
        record["ok"] = bool(record["finish"])
        record["output_tokens"] = (record["usage"] or {}).get("completion_tokens", 0)
    except Exception as err:  # noqa: BLE001 (a failed request is counted, never raised)
        record["error"] = f"{type(err).__name__}: {err}"[:200]
    return record


def run_load(target: Target, trace: list, params: dict[str, Any] | None = None) -> tuple[list[dict], float]:
    """Send the trace; each request's record (chunk times on this clock) and the run's duration."""
    async def main() -> tuple[list[dict], float]:
        async with target.async_http(timeout=300) as http:
            t0 = time.perf_counter()
            records = await asyncio.gather(*(_one_request(http, r, params or {"temperature": 0}, t0) for r in trace))
            return list(records), time.perf_counter() - t0
    return run_async(main())


def max_overlap(records: list[dict]) -> int:
    """The most requests that were streaming at once (between their first and last chunk)."""
    events = sorted([(r["chunk_s"][0], 1) for r in records if r["chunk_s"]]
                    + [(r["chunk_s"][-1], -1) for r in records if r["chunk_s"]], key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def load_trace(offline: Offline, seed: int, n: int = 20, rate_per_s: float = 16.0):
    from inferlab.workloads import LengthDist, request_trace

    return request_trace(offline.tokenizer, n, seed=seed, rate_per_s=rate_per_s,
                         prompt_len=LengthDist(median=24, sigma=0.5, min=4, max=96),
                         output_len=LengthDist(median=24, sigma=0.5, min=8, max=64))


@client_errors
def verify_load(target: Target, offline: Offline, seed: int) -> dict[str, Any]:
    """SV4: a Poisson trace; every request answered once with its greedy tokens, served concurrently, and /metrics
    counted what the load generator saw."""
    trace = load_trace(offline, seed)
    before = scrape(target)
    records, duration = run_load(target, trace)
    failed = [r for r in records if not r["ok"]]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(records)} requests under load got no complete answer "
                          f"(first: request {failed[0]['id']}: {failed[0]['error'] or 'no finish_reason'})")
    ids = [next(iter(r["ids"])) for r in records if len(r["ids"]) == 1]
    if len(ids) != len(records) or len(set(ids)) != len(ids):
        raise CheckFailed("every response must carry one id of its own in all its chunks; under load some "
                          "responses shared an id or changed it mid-stream")
    for r, request in zip(records, trace):
        want = offline.greedy(list(request.prompt), request.max_new_tokens)
        if r["text"] != offline.text(want) or (r["usage"] or {}).get("completion_tokens") != len(want):
            raise CheckFailed(f"under load, request {request.id} got {r['text'][:40]!r} "
                              f"({(r['usage'] or {}).get('completion_tokens')} tokens); its greedy output offline is "
                              f"{offline.text(want)[:40]!r} ({len(want)} tokens): a request must get its own tokens "
                              "whoever shares its batch")
        if len(r["finish"]) != 1:
            raise CheckFailed(f"request {request.id} got finish_reason {len(r['finish'])} times; once, in the last chunk")
    overlap = max_overlap(records)
    if overlap < threshold(LAB, "SV4")["min_concurrent_streams"]:
        raise CheckFailed(f"under a load of {len(trace)} requests at {16.0:g}/s, no two requests were ever streaming "
                          "at the same time: the server serves one request at a time (a blocked event loop, or a "
                          "batch of one). Requests must join the running batch between steps")
    time.sleep(0.05)
    after = scrape(target)
    sent_prompt = sum(len(r.prompt) for r in trace)
    got_tokens = sum(r["usage"]["completion_tokens"] for r in records)
    counted = {
        "prompt tokens": (metric_sum(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total")
                          - metric_sum(before, "vllm:prompt_tokens", "vllm:prompt_tokens_total"), sent_prompt),
        "generated tokens": (metric_sum(after, "vllm:generation_tokens", "vllm:generation_tokens_total")
                             - metric_sum(before, "vllm:generation_tokens", "vllm:generation_tokens_total"), got_tokens),
        "finished requests": (metric_sum(after, "vllm:e2e_request_latency_seconds",
                                         "vllm:e2e_request_latency_seconds_count")
                              - metric_sum(before, "vllm:e2e_request_latency_seconds",
                                           "vllm:e2e_request_latency_seconds_count"), len(trace))}
    for what, (got, want) in counted.items():
        if abs(got - want) > 1e-9:
            raise CheckFailed(f"under load /metrics counted {got:g} {what}; the load generator saw {want}")
    return {"requests": len(trace), "max_concurrent_streams": overlap, "seconds": round(duration, 2),
            "output_tokens_per_s": round(got_tokens / duration, 1)}


MAX_THROUGHPUT_RUNS = 3  # runs of the learner's server, each between two of the reference's, before "don't know"


def run_fraction(yours: float, before: float, after: float) -> tuple[float, float, float]:
    """One run of the learner's server between two of the reference's: its fraction of the reference's throughput
    and the range the two reference runs allow, (low, mid, high). A machine that slows down or speeds up during
    the run widens the range instead of moving the verdict."""
    return yours / max(before, after), yours / ((before + after) / 2), yours / min(before, after)


def throughput_verdict(runs: list[tuple[float, float, float]], bar: float) -> str | None:
    """"passed" or "failed" once most runs so far are clearly on that side of the bar (their whole range) and none
    is clearly on the other; None while that is not so (run again, or, at the last run, inconclusive)."""
    above = sum(low >= bar for low, _, _ in runs)
    below = sum(high < bar for _, _, high in runs)
    if above > len(runs) / 2 and not below:
        return "passed"
    if below > len(runs) / 2 and not above:
        return "failed"
    return None


def verify_throughput(target: Target, reference: Target, offline: Offline, seed: int) -> dict[str, Any]:
    """SV4, in the autograder only: output tokens per second at a fixed Poisson rate, each run of the learner's server
    between two runs of the reference server on the same trace, in the same check (so a busy machine slows both
    alike). Passed or failed when most runs are clearly on one side of a calibrated fraction of the reference's
    (`throughput_verdict`); after MAX_THROUGHPUT_RUNS without that, inconclusive (`TooNoisy`): not a pass, not a
    fail."""
    from ...checks import TooNoisy

    bar = threshold(LAB, "SV4")["min_throughput_fraction_of_reference"]
    trace = load_trace(offline, seed + 7, n=12)

    def rate(name: str, server: Target) -> float:
        records, duration = run_load(server, trace)
        if not all(r["ok"] for r in records):
            if name == "yours":
                raise CheckFailed("under the fixed-rate load some requests got no complete answer")
            raise RuntimeError("the reference server lost requests: the grading machine is not fit to time")
        return sum(r["usage"]["completion_tokens"] for r in records) / duration

    reference_rates, your_rates, runs = [rate("reference", reference)], [], []
    verdict = None
    while verdict is None and len(runs) < MAX_THROUGHPUT_RUNS:
        your_rates.append(rate("yours", target))
        reference_rates.append(rate("reference", reference))
        runs.append(run_fraction(your_rates[-1], reference_rates[-2], reference_rates[-1]))
        verdict = throughput_verdict(runs, bar)
    fraction = float(np.median([mid for _, mid, _ in runs]))
    measured = {"throughput_tokens_per_s": round(float(np.median(your_rates)), 1),
                "reference_tokens_per_s": round(float(np.median(reference_rates)), 1),
                "fraction_of_reference": round(fraction, 2),
                "ranges": [[round(low, 2), round(high, 2)] for low, _, high in runs], "runs": len(runs)}
    said = (f"at {16.0:g} requests/s your server produced {measured['throughput_tokens_per_s']:.0f} output tokens/s, "
            f"{fraction:.0%} of the reference server's in the same check (at least {bar:.0%})")
    if verdict == "failed":
        raise CheckFailed(f"{said}: look for work repeated at every step (a prompt recomputed, a cache rebuilt)",
                          **measured)
    if verdict is None:
        raise TooNoisy(f"{said}, but too noisy to tell: over {len(runs)} runs, each between two of the reference's, "
                       f"the range of that fraction was {min(r[0] for r in runs):.0%} to {max(r[2] for r in runs):.0%}",
                       **measured)
    return measured


# ------------------------------------------------------------------------------------------------ the notebook's
# self-checks: the learner's server on 127.0.0.1, on a thread of the notebook's kernel

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(build_app: Callable[..., Any], max_batch_size: int = 4) -> Iterator[Target]:
    """The learner's app on 127.0.0.1 on a thread of its own, for the duration of the block; then stopped."""
    from aiohttp import web

    from inferlab import load_model, load_tokenizer

    app = build_app(load_model(MODEL), load_tokenizer(MODEL), max_batch_size)
    if not isinstance(app, web.Application):
        raise CheckFailed(f"build_app must return an aiohttp web.Application, got {type(app).__name__}")
    port, loop, ready, state = free_port(), asyncio.new_event_loop(), threading.Event(), {}

    async def start() -> None:
        state["runner"] = runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except Exception as err:  # noqa: BLE001
            state["error"] = err
        ready.set()
        if "error" not in state:
            loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in state:
        raise CheckFailed(f"the server could not start: {type(state['error']).__name__}: {state['error']}")
    try:
        yield Target(f"http://127.0.0.1:{port}")
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


def check_sv2(build_app: Callable[..., Any], cached_generate: Callable[..., list[int]] | None = None) -> dict[str, Any]:
    with serving(build_app) as target:
        return verify_api(target, Offline(cached_generate), PUBLIC_SEED, max_batch_size=4)


def check_sv3(build_app: Callable[..., Any], cached_generate: Callable[..., list[int]] | None = None) -> dict[str, Any]:
    with serving(build_app) as target:
        return verify_metrics(target, Offline(cached_generate), PUBLIC_SEED)


def check_sv4(build_app: Callable[..., Any], cached_generate: Callable[..., list[int]] | None = None) -> dict[str, Any]:
    with serving(build_app, max_batch_size=8) as target:
        return verify_load(target, Offline(cached_generate), PUBLIC_SEED)
