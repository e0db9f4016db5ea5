"""bench/perf_robustness.py: is the kv_cache KV4 perf check fair under load?

Runs the graded KV4 measure exactly as the autograder does (`grader.perf_stage.time_submission`:
two sandboxed worker processes, the submission's code interleaved with the baseline and the
reference) N times on the reference sample and N times on the 'slow' sample (correct,
recomputes), alternating, each run with a fresh grading seed, while a CPU-bound process
runs alongside on one core. A fair check passes the reference every
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
    import shutil
    import tempfile

    from grader import notebook, samples
    from grader.execute import prepare
    from grader.perf import threshold
    from grader.perf_stage import time_submission
    from grader.sandbox import Limits

    lab = "kv_cache"
    source = notebook.read(REPO / "solutions" / lab / f"{lab}.ipynb")
    built = samples.build(lab, Path(tempfile.mkdtemp(prefix="perf-robustness-")), ["reference", "slow"])
    backend = "bwrap" if shutil.which("bwrap") else "none"
    limits = Limits(threads=opts.threads)

    stop = mp.Event()
    neighbour = None if opts.no_load else mp.Process(target=burn, args=(stop,), daemon=True)
    if neighbour:
        neighbour.start()
    outcomes = {"reference": [], "slow": []}
    start = time.perf_counter()
    try:
        for i in range(opts.runs):
            for name in ("reference", "slow"):
                prepared = prepare(source, notebook.read(built[name]))
                r = time_submission(lab, prepared, source, backend, limits, seed=1000 + i)
                m = r.measured
                outcomes[name].append({"status": r.status, "speedup": m.get("speedup_vs_naive"),
                                       "reference_speedup": m.get("reference_speedup_vs_naive"),
                                       "fraction_of_reference": m.get("fraction_of_reference"),
                                       "threshold": m.get("threshold"), "rounds": m.get("rounds"),
                                       "fraction_ci95": m.get("fraction_ci95"), "seconds": round(r.seconds, 1),
                                       # why, for a run that is not a clean pass or fail: its own justification
                                       "message": r.message if r.status not in ("passed",) else ""})
                print(f"run {i + 1:>2} {name:<9} {r.status:<7} {m.get('speedup_vs_naive')}x, "
                      f"{m.get('fraction_of_reference')} of the reference's {m.get('reference_speedup_vs_naive')}x "
                      f"(bar {m.get('min_fraction_of_reference')}, {r.seconds:.0f} s)", flush=True)
    finally:
        stop.set()
        if neighbour:
            neighbour.join(timeout=5)
    summary = {
        "date": dt.date.today().isoformat(), "runs": opts.runs, "cpu_bound_neighbour": not opts.no_load,
        "torch_threads": opts.threads, "sandbox": backend,
        "min_fraction_of_reference": threshold(lab, "KV4")["min_fraction_of_reference"],
        "reference_passed": sum(o["status"] == "passed" for o in outcomes["reference"]),
        "reference_failed": sum(o["status"] == "failed" for o in outcomes["reference"]),
        "reference_inconclusive": sum(o["status"] == "inconclusive" for o in outcomes["reference"]),
        "slow_failed": sum(o["status"] == "failed" for o in outcomes["slow"]),
        "slow_passed": sum(o["status"] == "passed" for o in outcomes["slow"]),
        "slow_inconclusive": sum(o["status"] == "inconclusive" for o in outcomes["slow"]),
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
    print(f"reference: {summary['reference_passed']} passed, {summary['reference_inconclusive']} inconclusive, "
          f"{summary['reference_failed']} failed; slow: {summary['slow_failed']} failed, "
          f"{summary['slow_inconclusive']} inconclusive, {summary['slow_passed']} passed (of {opts.runs} each); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
