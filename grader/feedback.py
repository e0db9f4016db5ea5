"""grader.feedback: one HTML page per learner: a task table on top, the graded notebook below.

The table gives, per task, the points, what was measured against which threshold, and
the first actionable failure message; the notebook below it is nbgrader-style feedback
(every cell with its output, the grader's verdicts under the graded cells).
"""

from __future__ import annotations

import html
from pathlib import Path

from .notebook import task_of


def task_rows(result: dict) -> list[dict]:
    checks = {c["task"]: c for c in result.get("checks", [])}
    rows = []
    for t in result.get("tasks", []):
        task = task_of(t["cell"]) or t["cell"]
        check = checks.get(task, {})
        measured = check.get("measured", {})
        perf = ""
        if "threshold" in measured:
            value = next((v for k, v in measured.items() if k.startswith("speedup")), None)
            perf = f"{value}x (bar {measured['threshold']}x, {measured.get('profile', '')})"
        status = "inconclusive" if t.get("inconclusive") else check.get("status", "passed" if t["passed"] else "failed")
        rows.append({"task": task, "points": t["points"], "max_points": t["max_points"], "status": status,
                     "performance": perf, "message": check.get("message") or ("" if t["passed"] else t["message"])})
    return rows


def render(lab: str, result: dict, executed_html: str = "") -> str:
    esc = html.escape
    head = (f"<h1>{esc(lab)}: feedback for {esc(result['student'])}</h1>"
            f"<p><b>Score: {result['points']:g} / {result['max_points']:g}</b></p>")
    if result["status"] != "graded":
        head += f"<p class='error'><b>Not graded ({esc(result['status'])}):</b> {esc(result.get('error', ''))}</p>"
    elif result.get("error"):
        head += f"<p class='error'><b>Note:</b> {esc(result['error'])}</p>"
    if result.get("inconclusive"):
        head += (f"<p class='inconclusive'><b>Not graded yet: {esc(', '.join(result['inconclusive']))}.</b> The grading "
                 "machine was too busy to time your code reliably, so these points are neither awarded nor lost: "
                 "your instructor regrades them.</p>")
    rows = "".join(
        f"<tr class='{esc(r['status'].replace(' ', '-'))}'><td>{esc(r['task'])}</td>"
        f"<td>{r['points']:g} / {r['max_points']:g}</td><td>{esc(r['status'])}</td>"
        f"<td>{esc(r['performance'])}</td><td>{esc(r['message'])}</td></tr>" for r in task_rows(result))
    table = ("<table><tr><th>task</th><th>points</th><th>status</th><th>performance</th>"
             f"<th>first thing to fix</th></tr>{rows}</table>") if rows else ""
    style = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             ".passed td{background:#eaffea}.failed td,.error td{background:#ffecec}"
             ".not-attempted td{background:#f4f4f4}.inconclusive td{background:#fff6d9}.error{color:#a00}</style>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(lab)} feedback</title>{style}</head>"
            f"<body>{head}{table}<hr>{executed_html}</body></html>")


def notebook_html(path: Path) -> str:
    """The executed notebook as an HTML fragment (nbconvert's basic template: no external assets)."""
    if not path.is_file():
        return ""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="basic").from_filename(str(path))
    return body


def write_feedback(out: Path, lab: str, result: dict) -> Path:
    path = out / "feedback" / result["student"] / lab / f"{lab}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    executed = Path(result["executed"]) if result.get("executed") else Path("/nonexistent")
    path.write_text(render(lab, result, notebook_html(executed)))
    return path
