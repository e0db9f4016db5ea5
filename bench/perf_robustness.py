"""bench/perf_robustness.py: is the kv_cache K4 perf check fair under load?

Runs the graded K4 check (`grader.labs.kv_cache.check_k4_speed`) N times on the reference
answer and N times on the 'slow' sample (correct, recomputes), alternating, while a
CPU-bound process runs alongside on one core. A fair check passes the reference every
time and fails the slow answer every time. Writes the counts and every measured ratio
into results.json under "perf_robustness".

    python bench/perf_robustness.py --runs 20 --out bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x * 31 + i) % 1_000_003


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--no-load", action="store_true", help="run without the CPU-bound neighbour")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, as a grading worker gets (cores // workers); default 1")
    opts = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(opts.threads)
    from grader.checks import run_check
    from grader.labs import kv_cache
    from inferlab import load_model

    reference_ns = kv_cache.reference_namespace()
    reference = reference_ns["cached_generate"]
    slow_ns = dict(reference_ns)
    from samples.kv_cache import SLOW_K2  # the same slow answer the sample submission uses

    exec(SLOW_K2, slow_ns)
    slow = slow_ns["cached_generate"]
    model = load_model("tiny")

    stop = mp.Event()
    neighbour = None if opts.no_load else mp.Process(target=burn, args=(stop,), daemon=True)
    if neighbour:
        neighbour.start()
    outcomes = {"reference": [], "slow": []}
    start = time.perf_counter()
    try:
        for i in range(opts.runs):
            for name, fn in (("reference", reference), ("slow", slow)):
                r = run_check("K4", kv_cache.check_k4_speed, fn, seed=1000 + i, model=model)
                outcomes[name].append({"status": r.status, "speedup": r.measured.get("speedup_vs_naive"),
                                       "threshold": r.measured.get("threshold"), "seconds": round(r.seconds, 1)})
                print(f"run {i + 1:>2} {name:<9} {r.status:<7} {r.measured.get('speedup_vs_naive')}x "
                      f"(bar {r.measured.get('threshold')}x, {r.seconds:.0f} s)", flush=True)
    finally:
        stop.set()
        if neighbour:
            neighbour.join(timeout=5)
    summary = {
        "date": dt.date.today().isoformat(), "runs": opts.runs, "cpu_bound_neighbour": not opts.no_load,
        "torch_threads": opts.threads,
        "reference_passed": sum(o["status"] == "passed" for o in outcomes["reference"]),
        "slow_failed": sum(o["status"] == "failed" for o in outcomes["slow"]),
        "seconds": round(time.perf_counter() - start, 1), "outcomes": outcomes,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["perf_robustness"] = summary
    path.write_text(json.dumps(results, indent=2) + "\n")
    sys.path.insert(0, str(REPO / "bench"))
    from run import markdown

    (opts.out / "results.md").write_text(markdown(results))
    print(f"reference passed {summary['reference_passed']}/{opts.runs}, slow failed {summary['slow_failed']}/{opts.runs}; "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
