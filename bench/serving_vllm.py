"""bench/serving_vllm.py: vLLM side by side with the serving lab's servers (`make bench-vllm`); writes
results-vllm.json and results-vllm.md to --out.

On one machine, in one run, one server at a time (so they do not share the CPU):
  * `vllm serve` (the CPU build, in .venv-vllm; fp32, the bundled `tiny`, enforce-eager, the lab's chat template),
  * the serving lab's reference server (the solution notebook's cells),
  * a learner's server (the `rewritten` sample of grader/labs/serving/samples.py: a correct server written
    differently stands in for one),
each on 127.0.0.1, each sent the same seeded Poisson trace by the lab's load generator (the grader's, over httpx),
with fixed output lengths (`ignore_eos`), and summarized by the reference's definitions (TTFT, TPOT, ITL, E2EL,
throughput, goodput under the same SLOs). Then vLLM's own `vllm bench serve` against vLLM and the reference
server (random prompts of the same median lengths), to show the two tools agree.

    python bench/serving_vllm.py --out bench [--rate 8] [--requests 48] [--slo-ttft-ms 500] [--slo-tpot-ms 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
LAUNCH = ROOT / "infra" / "vllm" / "launch.py"
MODEL_DIR = ROOT / "labs" / "inferlab" / "models" / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def vllm_env(scratch: Path) -> dict[str, str]:
    """vLLM's caches and temp files in the run's own folder, not ~/.cache."""
    for sub in ("cache", "tmp", "xdg"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CACHE_ROOT": str(scratch / "cache"),
            "TMPDIR": str(scratch / "tmp"), "XDG_CACHE_HOME": str(scratch / "xdg"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def start_vllm(port: int, scratch: Path, log: Path) -> subprocess.Popen:
    from grader.labs.serving.public import CHAT_TEMPLATE

    template = scratch / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    cmd = [str(VLLM_PY), str(LAUNCH), "serve", str(MODEL_DIR), "--dtype", "float32", "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512", "--enforce-eager", "--gpu-memory-utilization", "0.1",
           "--chat-template", str(template)]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=vllm_env(scratch),
                            start_new_session=True, cwd=ROOT)


def start_lab_server(which: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", which, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def serve_notebook(which: str, port: int) -> None:
    """In a child process: run the solution notebook's cells (the `rewritten` sample's answers for "learner") and
    serve build_app on 127.0.0.1:port until interrupted."""
    from aiohttp import web

    from grader import labs, notebook
    from grader.labs.serving import samples

    lab = labs.load("serving")
    nb = notebook.read(ROOT / "solutions" / "serving" / "serving.ipynb")
    if which == "learner":
        for gid, source in samples.SAMPLES["rewritten"]["cells"].items():
            notebook.cell(nb, gid).source = source
    ns = notebook.exec_cells(nb, list(lab.spec.reference_cells))
    app = ns["build_app"](ns["model"], ns["tokenizer"], 8)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def load_run(url: str, trace: list, slo_ms: dict, summarize) -> dict:
    from grader.labs.serving.public import Target, run_load

    records, duration = run_load(Target(url), trace, {"temperature": 0, "ignore_eos": True})
    plain = [{"start_s": r["start_s"], "chunk_s": r["chunk_s"], "output_tokens": r["output_tokens"],
              "prompt_tokens": r["prompt_tokens"], "ok": r["ok"] and bool(r["chunk_s"])} for r in records]
    return summarize(plain, duration, slo_ms)


def vllm_bench(url: str, scratch: Path, args, name: str) -> dict | None:
    """vLLM's own `vllm bench serve` against a server; its JSON result, or None (with the reason printed)."""
    out_dir = scratch / f"bench-{name}"
    out_dir.mkdir(exist_ok=True)
    cmd = [str(VLLM_PY), str(LAUNCH), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", "tiny", "--tokenizer", str(MODEL_DIR),
           "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "24",
           "--num-prompts", str(args.requests), "--request-rate", str(args.rate), "--seed", str(args.seed),
           "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", "result.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(scratch), cwd=ROOT, timeout=900)
    (scratch / f"bench-{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out_dir / "result.json").is_file():
        print(f"vllm bench serve against {name} failed (exit {proc.returncode}); see {scratch}/bench-{name}.log: "
              + (proc.stderr or proc.stdout).strip().splitlines()[-1:][0] if (proc.stderr or proc.stdout).strip() else "")
        return None
    raw = json.loads((out_dir / "result.json").read_text())
    keys = ("completed", "request_throughput", "output_throughput", "request_goodput", "p50_ttft_ms", "p99_ttft_ms",
            "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms")
    return {k: raw.get(k.replace("p50_", "median_") if k.startswith("p50_") and k not in raw else k) for k in keys}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson), > 0")
    parser.add_argument("--requests", type=int, default=48, help="requests in the trace, >= 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--skip-vllm-bench", action="store_true", help="do not run `vllm bench serve`")
    parser.add_argument("--serve", choices=("reference", "learner"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.requests < 2 or args.slo_ttft_ms <= 0 or args.slo_tpot_ms <= 0:
        parser.error("--rate, --slo-ttft-ms and --slo-tpot-ms must be positive and --requests at least 2")
    return args


def install_facts() -> dict:
    summary = ROOT / ".venv-vllm" / "install-summary.txt"
    return {"install_summary": summary.read_text().strip() if summary.is_file() else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_notebook(args.serve, args.port)
        return 0
    if not VLLM_PY.is_file() or not (ROOT / ".venv-vllm" / ".installed-stamp").is_file():
        print("vLLM is not installed in .venv-vllm: run `make vllm-venv` first", file=sys.stderr)
        return 3
    from grader import labs

    lab = labs.load("serving")
    summarize = lab.reference_namespace()["summarize"]
    from inferlab import load_tokenizer
    from inferlab.workloads import LengthDist, request_trace

    trace = request_trace(load_tokenizer("tiny"), args.requests, seed=args.seed, rate_per_s=args.rate,
                          prompt_len=LengthDist(median=24, sigma=0.5, min=8, max=128),
                          output_len=LengthDist(median=24, sigma=0.4, min=8, max=64))
    slo = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}
    results: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rate_per_s": args.rate,
                     "requests": args.requests, "seed": args.seed, "slo_ms": slo, "servers": {}, "vllm_bench": {},
                     **install_facts(), "cores": os.cpu_count()}
    scratch = Path(tempfile.mkdtemp(prefix="inferlab-bench-vllm-"))
    try:
        for name in ("vllm", "reference", "learner"):
            port = free_port()
            log = scratch / f"{name}.log"
            started = time.perf_counter()
            proc = start_vllm(port, scratch, log) if name == "vllm" else start_lab_server(name, port, log)
            url = f"http://127.0.0.1:{port}"
            try:
                ready_s = wait_healthy(url, proc, 600 if name == "vllm" else 180)
                load_run(url, trace[:4], slo, summarize)  # warm-up
                summary = load_run(url, trace, slo, summarize)
                summary["ready_s"] = round(ready_s, 1)
                results["servers"][name] = summary
                print(f"{name}: ready in {ready_s:.0f} s; {summary['output_throughput']:.1f} tok/s, TTFT p50 "
                      f"{summary['p50_ttft_ms']:.1f} ms, TPOT p50 {summary['p50_tpot_ms']:.1f} ms", flush=True)
                if name in ("vllm", "reference") and not args.skip_vllm_bench:
                    got = vllm_bench(url, scratch, args, name)
                    if got is not None:
                        results["vllm_bench"][name] = got
            except RuntimeError as err:
                print(f"{name}: {err}; its log: {log}", file=sys.stderr)
                results["servers"][name] = {"error": str(err), "log_tail": log.read_text(errors="replace")[-1500:]}
            finally:
                stop(proc)
                results.setdefault("wall_s", {})[name] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(scratch / "cache", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-vllm.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results-vllm.md").write_text(markdown(results))
    print(f"wrote {args.out / 'results-vllm.md'} and results-vllm.json (logs in {scratch})")
    return 0 if all("error" not in s for s in results["servers"].values()) else 1


def markdown(results: dict) -> str:
    lines = [f"## vLLM side by side (`make bench-vllm`, {results['date']})", "",
             f"Same machine ({results['cores']} cores), one server at a time; the same Poisson trace of "
             f"{results['requests']} requests at {results['rate_per_s']:g}/s (fixed output lengths, `ignore_eos`), "
             f"sent by the lab's load generator; SLOs TTFT <= {results['slo_ms']['ttft']:g} ms, TPOT <= "
             f"{results['slo_ms']['tpot']:g} ms. vLLM: the CPU build, fp32, `tiny`, `--enforce-eager`.", "",
             "| server | ready (s) | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 (ms) | E2EL p50 (ms) | "
             "output tok/s | req/s | goodput (req/s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in results["servers"].items():
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} | | | | | | | |")
            continue
        lines.append(f"| {name} | {s['ready_s']:.0f} | {s['p50_ttft_ms']:.1f} / {s['p99_ttft_ms']:.1f} | "
                     f"{s['p50_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f} | {s['p50_itl_ms']:.1f} | {s['p50_e2el_ms']:.1f} | "
                     f"{s['output_throughput']:.1f} | {s['request_throughput']:.2f} | {s['goodput']:.2f} |")
    if results["vllm_bench"]:
        lines += ["", "`vllm bench serve` (random prompts and outputs of 24 tokens, same rate and count):", "",
                  "| server | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | output tok/s | goodput (req/s) |",
                  "| --- | --- | --- | --- | --- |"]
        for name, b in results["vllm_bench"].items():
            fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
            lines.append(f"| {name} | {fmt(b['p50_ttft_ms'])} / {fmt(b['p99_ttft_ms'])} | {fmt(b['p50_tpot_ms'])} / "
                         f"{fmt(b['p99_tpot_ms'])} | {fmt(b['output_throughput'])} | {fmt(b['request_goodput'])} |")
    if results.get("install_summary"):
        lines += ["", f"vLLM install: {results['install_summary']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
