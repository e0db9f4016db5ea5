"""bench/grading_throughput.py: how fast the autograder grades a class (`make bench-throughput`).

Grades the same class of kv_cache submissions (four bundled samples: reference, slow, wrong and
stub, the common kinds of work) from scratch with each backend and number of workers, in
the bubblewrap sandbox, and records submissions per minute, the wall time, and each
submission's own grading time (what one grading slot is busy for). From the per-submission
cost it sizes a class of 500 on N nodes. Writes the `grading_throughput` section of
results.json / results.md in --out (other sections are kept).

    python bench/grading_throughput.py --out bench
    python bench/grading_throughput.py --out bench --configs local:1 local:2 ray:2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

LAB = "kv_cache"
CLASS = ["reference", "slow", "wrong", "stub"]  # right, correct-but-slow, wrong, untouched: the common kinds
CLASS_OF = 500


def grade(backend: str, workers: int, submissions: Path, out: Path) -> dict:
    """One from-scratch `inferlab autograde` run; the Ray one in a loopback-only network namespace."""
    cmd = [sys.executable, "-c", "from grader.cli import main; main()", "autograde", LAB, "--submissions",
           str(submissions), "--out", str(out), "--workers", str(workers), "--backend", backend]
    if backend == "ray" and shutil.which("unshare"):
        cmd = ["unshare", "--map-root-user", "--net", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh"] + cmd
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    results = [json.loads(p.read_text()) for p in (out / LAB / "results").glob("*.json")]
    if proc.returncode != 0 or len(results) != len(CLASS):
        raise RuntimeError(f"{backend}:{workers} failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    per_submission = {r["student"]: r["seconds"] for r in results}
    return {"backend": backend, "workers": workers, "submissions": len(results), "wall_s": round(wall, 1),
            "per_minute": round(60 * len(results) / wall, 2),
            "submission_s": {"mean": round(statistics.mean(per_submission.values()), 1),
                             "max": round(max(per_submission.values()), 1), "each": per_submission}}


def sizing(runs: list[dict]) -> dict:
    """A class of 500 on N nodes, from the measured cost of one submission in one grading slot."""
    solo = next((r for r in runs if r["backend"] == "local" and r["workers"] == 1), runs[0])
    cost = solo["submission_s"]["mean"]  # seconds one slot is busy per submission, the class's mix
    slowest = max(r["submission_s"]["max"] for r in runs)
    rows = []
    for nodes in (1, 2, 4, 8, 16):
        for slots, what in ((4, "CPU node, 4 cores (4 slots of 1 core)"), (1, "GPU node, 1 GPU (1 slot)")):
            waves = math.ceil(CLASS_OF / (nodes * slots))
            rows.append({"nodes": nodes, "node": what, "slots": nodes * slots,
                         "minutes": round(waves * cost / 60, 1)})
    return {"class_size": CLASS_OF, "seconds_per_submission": cost, "slowest_submission_s": slowest, "rows": rows}


def markdown(section: dict) -> list[str]:
    s = section
    lines = [f"## Grading throughput ({s['date']})", "",
             f"`bench/grading_throughput.py`: the kv_cache class of {len(CLASS)} samples ({', '.join(CLASS)}), "
             f"graded from scratch by `inferlab autograde` in bubblewrap sandboxes on {s['machine']['cores']} cores "
             f"({s['machine']['cpu']}). Per submission: the grading worker's own time (notebook, clean re-run, "
             "timing stage).", "",
             "| backend | workers | wall s | submissions / min | mean s per submission | slowest s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["runs"]:
        lines.append(f"| {r['backend']} | {r['workers']} | {r['wall_s']} | {r['per_minute']} | "
                     f"{r['submission_s']['mean']} | {r['submission_s']['max']} |")
    z = s["sizing"]
    lines += ["", f"### Sizing a class of {z['class_size']}", "",
              f"One submission of this mix keeps one grading slot busy for **{z['seconds_per_submission']} s** on "
              "average (measured above with 1 worker). Slots: a CPU slot is one core (kv_cache's CPU profile asks "
              "Ray for 1 CPU); a GPU slot is one GPU (the GPU profile asks for a whole GPU, since a shared GPU makes "
              "timings meaningless). Minutes = ceil(500 / slots) x seconds per submission / 60, assuming a GPU "
              "grades a submission no slower than a CPU core (its timing stage is shorter; kernel start and model "
              "load are the same). Measure on the real node with this script before relying on the GPU rows.", "",
              "| nodes | node | slots | minutes for 500 |", "| ---: | --- | ---: | ---: |"]
    for row in z["rows"]:
        lines.append(f"| {row['nodes']} | {row['node']} | {row['slots']} | {row['minutes']} |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--configs", nargs="+", default=["local:1", "local:2", "ray:2"],
                        help="backend:workers pairs to measure")
    opts = parser.parse_args(argv)
    from grader import samples
    from run import machine
    from run import markdown as all_markdown

    runs = []
    with tempfile.TemporaryDirectory(prefix="inferlab-throughput-") as tmp:
        subs = Path(tmp) / "class"
        samples.build(LAB, subs, CLASS)
        for config in opts.configs:
            backend, workers = config.split(":")
            print(f"grading {len(CLASS)} submissions with {backend}, {workers} worker(s) ...", flush=True)
            runs.append(grade(backend, int(workers), subs, Path(tmp) / f"out-{backend}-{workers}"))
            print(f"  {runs[-1]['wall_s']} s, {runs[-1]['per_minute']} submissions/min", flush=True)
    section = {"runs": runs, "sizing": sizing(runs), "machine": machine(), "date": dt.date.today().isoformat()}
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["grading_throughput"] = section
    path.write_text(json.dumps(results, indent=2) + "\n")
    (opts.out / "results.md").write_text(all_markdown(results))
    print("\n".join(markdown(section)))
    print(f"wrote {path} and {opts.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
