"""grader.report: the instructor's report (one self-contained HTML file) and an LMS-ready grades.csv.

Input: the `results/*.json` that `autograde` wrote (one folder per lab). Output:
* `report.html`: score distribution, per-task pass rates, performance against the
  thresholds, ranked failure reasons and flagged submissions, as plots (inline PNG) and
  tables; it opens from disk in any browser, with no network.
* `grades.csv`: one row per student with Canvas's gradebook-import columns (`Student`, `ID`,
  `SIS User ID`, `SIS Login ID`, `Section`, then one column per lab); Moodle's CSV grade
  import maps the `SIS Login ID` column to the username and each lab column to a grade item.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from pathlib import Path

from . import notebook
from .anticheat import runtime_flags, scan
from .feedback import task_rows


def load_results(results_dir: Path) -> list[dict]:
    results_dir = Path(results_dir)
    folder = results_dir / "results" if (results_dir / "results").is_dir() else results_dir
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not results:
        raise FileNotFoundError(f"no grading results in {folder}: run `inferlab autograde` first")
    return results


def flags_of(result: dict) -> list[str]:
    flags = runtime_flags(result)
    path = Path(result.get("submission", ""))
    if path.is_file():
        try:
            flags += [f"code {reason}" for reason in scan(notebook.read(path))]
        except Exception:
            pass  # an unreadable notebook was already rejected with its reason
    return flags


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _table(headers: list[str], rows: list[list]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build(results: list[dict]) -> tuple[str, list[dict]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lab = results[0]["lab"]
    max_points = max(r["max_points"] for r in results) or 1.0
    rows = {r["student"]: task_rows(r) for r in results}
    tasks = sorted({t["task"] for rs in rows.values() for t in rs})
    sections = [f"<h1>inferlab report: {html.escape(lab)}</h1>",
                f"<p>{len(results)} submissions; {sum(r['status'] == 'graded' for r in results)} graded, "
                f"{sum(r['status'] == 'rejected' for r in results)} rejected, "
                f"{sum(r['status'] == 'grader-error' for r in results)} grader errors.</p>"]

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([r["points"] for r in results], bins=[x - 0.5 for x in range(int(max_points) + 2)], color="#4a7ab5")
    ax.set(xlabel=f"score (of {max_points:g})", ylabel="submissions", title="Score distribution")
    sections += ["<h2>Scores</h2>", _png(fig)]

    pass_rate = {t: sum(any(x["task"] == t and x["points"] == x["max_points"] for x in rs) for rs in rows.values())
                 / len(rows) for t in tasks}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(pass_rate), [100 * v for v in pass_rate.values()], color="#5aa469")
    ax.set(ylabel="% passed", ylim=(0, 100), title="Per-task pass rate")
    sections += ["<h2>Tasks</h2>", _png(fig),
                 _table(["task", "passed", "pass rate"],
                        [[t, round(pass_rate[t] * len(rows)), f"{100 * pass_rate[t]:.0f}%"] for t in tasks])]

    perf = [(r["student"], c["task"], c["measured"]) for r in results for c in r.get("checks", [])
            if "threshold" in c.get("measured", {})]
    if perf:
        fig, ax = plt.subplots(figsize=(6, 3))
        by_task: dict[str, list[float]] = {}
        for _, task, m in perf:
            speed = next((v for k, v in m.items() if k.startswith("speedup")), None)
            if speed is not None:
                by_task.setdefault(task, []).append(speed)
        for i, (task, values) in enumerate(sorted(by_task.items())):
            ax.scatter([i] * len(values), values, alpha=0.7)
            bar = next(m["threshold"] for _, t, m in perf if t == task)
            ax.hlines(bar, i - 0.3, i + 0.3, colors="red", label="threshold" if i == 0 else None)
        ax.set_xticks(range(len(by_task)), sorted(by_task))
        ax.set(ylabel="speedup over baseline (x)", title="Performance against thresholds")
        ax.legend()
        sections += ["<h2>Performance</h2>", _png(fig),
                     _table(["student", "task", "speedup", "threshold", "profile"],
                            [[s, t, next((v for k, v in m.items() if k.startswith("speedup")), ""), m["threshold"],
                              m.get("profile", "")] for s, t, m in sorted(perf)])]

    reasons = Counter()
    for r in results:
        if r["status"] != "graded":
            reasons[f"{r['status']}: {r.get('error', '')[:100]}"] += 1
        for t in rows[r["student"]]:
            if t["points"] < t["max_points"] and t["message"]:
                reasons[f"{t['task']}: {t['message'].split(':')[0][:100]}"] += 1
    sections += ["<h2>Failure reasons (most common first)</h2>",
                 _table(["reason", "submissions"], reasons.most_common()) if reasons else "<p>None.</p>"]

    flagged = [[r["student"], "; ".join(f)] for r in results if (f := flags_of(r))]
    sections += ["<h2>Flagged by anti-cheat checks</h2>",
                 _table(["student", "flags"], flagged) if flagged else "<p>No submission was flagged.</p>"]

    grades = [{"Student": r["student"], "ID": r["student"], "SIS User ID": r["student"], "SIS Login ID": r["student"],
               "Section": "", lab: f"{r['points']:g}"} for r in sorted(results, key=lambda r: r["student"])]
    sections += ["<h2>Grades</h2>", _table(["student", "status", "score"] + tasks,
                                           [[r["student"], r["status"], f"{r['points']:g} / {r['max_points']:g}"]
                                            + [next((f"{t['points']:g}" for t in rows[r['student']]
                                                     if t['task'] == task), "-") for task in tasks]
                                            for r in sorted(results, key=lambda r: r["student"])])]
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>inferlab report: {html.escape(lab)}</title>"
            f"{style}</head><body>{''.join(sections)}</body></html>")
    return page, grades


def write_report(results_dir: Path, out: Path) -> tuple[Path, Path]:
    results = load_results(results_dir)
    page, grades = build(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(page)
    with open(out / "grades.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(grades[0]))
        writer.writeheader()
        writer.writerows(grades)
    return out / "report.html", out / "grades.csv"
