"""grader.report: the instructor's report (one self-contained HTML file) and an LMS-ready grades.csv.

Input: the `results/*.json` that `autograde` wrote (one folder per lab). Output:
* `report.html`: score distribution, per-task pass rates, performance against the
  thresholds, ranked failure reasons and flagged submissions, as plots (inline PNG) and
  tables; it opens from disk in any browser, with no network.
* `grades.csv`: one row per student with Canvas's gradebook-import columns (`Student`, `ID`,
  `SIS User ID`, `SIS Login ID`, `Section`, then one column per lab, then `Notes`); Moodle's CSV
  grade import maps the `SIS Login ID` column to the username and each lab column to a grade item.
  A grade the grader does not stand by yet (a task whose timing was inconclusive, or a grader
  error) is left blank, so an import changes nothing, and `Notes` says why.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections import Counter
from pathlib import Path

from .feedback import task_rows


def load_results(results_dir: Path) -> list[dict]:
    results_dir = Path(results_dir)
    folder = results_dir / "results" if (results_dir / "results").is_dir() else results_dir
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not results:
        raise FileNotFoundError(f"no grading results in {folder}: run `inferlab autograde` first")
    return results


def flags_of(result: dict) -> list[str]:
    """The flags grading computed once, into the result (`grader.anticheat.flags`)."""
    return list(result.get("flags", []))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"<img alt='plot' style='max-width:100%' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def brief(text: str, limit: int = 160) -> str:
    """`text` up to `limit` characters, cut after a whole clause (never mid-word or mid-number), with an ellipsis."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    for marks in ((". ", "; ", ": "), (" (", ", ")):  # the end of a sentence or clause first, then of a phrase
        cut = max(head.rfind(mark) for mark in marks)
        if cut > limit // 3:
            return head[:cut].rstrip(" ,;:(") + " …"
    return head[:head.rfind(" ")].rstrip(" ,;:(") + " …"


def feedback_link(result: dict, page_dir: Path | None) -> str:
    """The learner's name, linked to their feedback page (relative to the report) when there is one."""
    page = result.get("feedback")
    if page_dir is None or not page or not Path(page).is_file():
        return result["student"]
    href = os.path.relpath(page, page_dir)
    return Html(f"<a href='{html.escape(href)}'>{html.escape(result['student'])}</a>")


def not_final(result: dict) -> str:
    """Why this result's score is not a final grade yet ('' when it is)."""
    if result["status"] == "grader-error":
        return "grader error: not graded (the grader failed, not the learner); regrade"
    if result.get("inconclusive"):
        return f"{', '.join(result['inconclusive'])} inconclusive: not graded yet; regrade with --retry-inconclusive"
    return ""


class Html(str):
    """A table cell that is already HTML (a link), not text to escape."""


def _table(headers: list[str], rows: list[list]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{v if isinstance(v, Html) else esc(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build(results: list[dict], page_dir: Path | None = None) -> tuple[str, list[dict]]:
    """The report page and the grades rows; `page_dir`: where the page will be written (its links are relative)."""
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
                f"{sum(r['status'] == 'grader-error' for r in results)} grader errors, "
                f"{sum(bool(r.get('inconclusive')) for r in results)} with an inconclusive timing (not graded "
                "yet).</p>"]

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.hist([r["points"] for r in results], bins=[x - 0.5 for x in range(int(max_points) + 2)], color="#4a7ab5")
    ax.set(xlabel=f"score (of {max_points:g})", ylabel="submissions", title="Score distribution")
    sections += ["<h2>Scores</h2>", _png(fig)]

    pass_rate = {t: sum(any(x["task"] == t and x["points"] == x["max_points"] for x in rs) for rs in rows.values())
                 / len(rows) for t in tasks}
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(list(pass_rate), [100 * v for v in pass_rate.values()], color="#5aa469")
    ax.set(ylabel="% passed", ylim=(0, 100), title="Per-task pass rate")
    sections += ["<h2>Tasks</h2>", _png(fig),
                 _table(["task", "passed", "pass rate"],
                        [[t, round(pass_rate[t] * len(rows)), f"{100 * pass_rate[t]:.0f}%"] for t in tasks])]

    perf = [(r["student"], c["task"], c["measured"]) for r in results for c in r.get("checks", [])
            if "threshold" in c.get("measured", {})]
    if perf:
        fig, ax = plt.subplots(figsize=(9, 4))
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
        status = {(r["student"], c["task"]): c.get("status", "") for r in results for c in r.get("checks", [])}
        sections += ["<h2>Performance</h2>", _png(fig),
                     _table(["student", "task", "speedup", "threshold", "profile", "verdict"],
                            [[s, t, next((v for k, v in m.items() if k.startswith("speedup")), ""), m["threshold"],
                              m.get("profile", ""), status.get((s, t), "")] for s, t, m in sorted(perf)])]

    unknown = [(r["student"], c) for r in results for c in r.get("checks", []) if c.get("status") == "inconclusive"]
    sections.append("<h2>Inconclusive timings</h2>")
    if unknown:
        sections += ["<p>The grading machine could not time these reliably (the 95% interval straddled the bar, or "
                     "the time cap ran out): their points are neither awarded nor lost, and the gradebook marks them "
                     "as needing a grade. Regrade them with <code>inferlab autograde LAB --retry-inconclusive</code>, "
                     "on a quieter machine if need be.</p>",
                     _table(["student", "task", "fraction of reference", "95% interval", "bar", "rounds", "why"],
                            [[s, c["task"], c["measured"].get("fraction_of_reference", "-"),
                              c["measured"].get("fraction_ci95", "-"), c["measured"].get("min_fraction_of_reference", "-"),
                              c["measured"].get("rounds", "-"), brief(c["message"], 240)] for s, c in sorted(
                                  unknown, key=lambda x: (x[0], x[1]["task"]))])]
    else:
        sections.append("<p>None: every timed task got a clear verdict.</p>")

    reasons = Counter()
    for r in results:
        if r["status"] != "graded":
            reasons[f"{r['status']}: {brief(r.get('error', ''))}"] += 1
        for t in rows[r["student"]]:
            if t["points"] < t["max_points"] and t["message"] and t["status"] != "inconclusive":
                said = t["message"].removeprefix(f"[{t['task']}] ")
                reasons[f"{t['task']}: {brief(said)}"] += 1
    sections += ["<h2>Failure reasons (most common first)</h2>",
                 _table(["reason", "submissions"], reasons.most_common()) if reasons else "<p>None.</p>"]

    flagged = [[r["student"], "; ".join(f)] for r in results if (f := flags_of(r))]
    sections += ["<h2>Flagged by anti-cheat checks</h2>",
                 _table(["student", "flags"], flagged) if flagged else "<p>No submission was flagged.</p>"]

    sections += time_on_task_section(lab, results)

    grades = [{"Student": r["student"], "ID": r["student"], "SIS User ID": r["student"], "SIS Login ID": r["student"],
               "Section": "", lab: "" if not_final(r) else f"{r['points']:g}", "Notes": not_final(r)}
              for r in sorted(results, key=lambda r: r["student"])]

    def task_cell(student: str, task: str) -> str:
        row = next((t for t in rows[student] if t["task"] == task), None)
        if row is None:
            return "-"
        return "inconclusive" if row["status"] == "inconclusive" else f"{row['points']:g}"

    sections += ["<h2>Grades</h2>", _table(["student", "status", "score"] + tasks + ["not final because"],
                                           [[feedback_link(r, page_dir), r["status"],
                                             f"{r['points']:g} / {r['max_points']:g}"]
                                            + [task_cell(r["student"], task) for task in tasks] + [not_final(r)]
                                            for r in sorted(results, key=lambda r: r["student"])])]
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>inferlab report: {html.escape(lab)}</title>"
            f"{style}</head><body>{''.join(sections)}</body></html>")
    return page, grades


def lab_budget(lab: str) -> int | None:
    """The lab's time budget in minutes (the first track that has it), or None."""
    from .tracks import TrackError, load_tracks

    try:
        return next((e.minutes for t in load_tracks().values() for e in t.labs if e.lab == lab), None)
    except TrackError:
        return None


def time_on_task_section(lab: str, results: list[dict]) -> list[str]:
    """Time on task against the lab's budget, and lateness against its due date, when known."""
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.get("time_on_task_s") is not None]
    late = [r for r in results if r.get("late_by_s")]
    if not timed and not any("due" in r for r in results):
        return ["<h2>Time on task</h2><p>Not recorded: no submission carried an inferlab-progress.json "
                "(a track's time-left cell writes it) and no due date was given.</p>"]
    out = ["<h2>Time on task and lateness</h2>"]
    budget = lab_budget(lab)
    if timed:
        minutes = [r["time_on_task_s"] / 60 for r in timed]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.hist(minutes, bins=12, color="#b58a4a")
        if budget:
            ax.axvline(budget, color="red", label=f"budget {budget} min")
            ax.legend()
        ax.set(xlabel="minutes from opening the lab to submitting", ylabel="submissions", title="Time on task")
        out.append(_png(fig))
    due = next((r["due"] for r in results if r.get("due")), None)
    out.append(f"<p>{len(timed)} of {len(results)} submissions say when the lab was opened"
               + (f"; budget {budget} min" if budget else "") + (f"; due {html.escape(due)}" if due else "")
               + f"; {len(late)} submitted late.</p>")
    rows = [[r["student"], f"{r['time_on_task_s'] / 60:.0f}" if r.get("time_on_task_s") is not None else "-",
             f"{r['late_by_s'] / 60:.0f}" if r.get("late_by_s") else ("0" if "late_by_s" in r else "-")]
            for r in sorted(results, key=lambda r: r["student"])]
    out.append(_table(["student", "minutes on task", "minutes late"], rows))
    return out


def build_track(track_name: str, by_lab: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    """The per-track view: every lab of the track in order, side by side, and one grades row per learner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tracks import get_track

    track = get_track(track_name)
    labs = [e for e in track.labs if e.lab in by_lab]
    students = sorted({r["student"] for rs in by_lab.values() for r in rs})
    rows = []
    for entry in labs:
        rs = by_lab[entry.lab]
        graded = [r for r in rs if r["status"] == "graded"]
        timed = sorted(r["time_on_task_s"] / 60 for r in rs if r.get("time_on_task_s") is not None)
        full = sum(r["points"] == r["max_points"] and r["max_points"] > 0 for r in graded)
        mean = sum(r["points"] / r["max_points"] for r in graded if r["max_points"]) / len(graded) if graded else 0
        rows.append([entry.lab, entry.minutes, len(rs), len(graded), f"{100 * mean:.0f}%", f"{full}",
                     f"{timed[len(timed) // 2]:.0f}" if timed else "-", sum(bool(r.get("late_by_s")) for r in rs)])
    sections = [f"<h1>inferlab report: track {html.escape(track.name)}</h1>",
                f"<p>{html.escape(track.title)}. {len(students)} learners; labs in track order, with the time "
                "budget each learner was given.</p>",
                _table(["lab", "budget min", "submissions", "graded", "mean score", "full marks",
                        "median min on task", "late"], rows)]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([r[0] for r in rows], [float(r[4].rstrip("%")) for r in rows], color="#4a7ab5")
    ax.set(ylabel="mean score (%)", ylim=(0, 100), title=f"Track {track.name}: mean score per lab")
    sections += ["<h2>Scores</h2>", _png(fig)]
    timed = {e.lab: [r["time_on_task_s"] / 60 for r in by_lab[e.lab] if r.get("time_on_task_s") is not None]
             for e in labs}
    if any(timed.values()):
        fig, ax = plt.subplots(figsize=(10, 4))
        for i, entry in enumerate(labs):
            ax.scatter([i] * len(timed[entry.lab]), timed[entry.lab], alpha=0.7, color="#b58a4a")
            ax.hlines(entry.minutes, i - 0.3, i + 0.3, colors="red", label="budget" if i == 0 else None)
        ax.set_xticks(range(len(labs)), [e.lab for e in labs])
        ax.set(ylabel="minutes on task", title="Time on task against each lab's budget")
        ax.legend()
        sections += ["<h2>Time on task against each lab's budget</h2>", _png(fig)]
    else:
        sections.append("<p>No time on task recorded (no submission carried an inferlab-progress.json).</p>")
    by_student = {s: {} for s in students}
    for entry in labs:
        for r in by_lab[entry.lab]:
            by_student[r["student"]][entry.lab] = r
    table = [[s] + [(f"{r['points']:g}/{r['max_points']:g}" + (" late" if r.get("late_by_s") else "")
                     + (f" ({not_final(r).split(':')[0]})" if not_final(r) else "")
                     if (r := by_student[s].get(e.lab)) else "-") for e in labs] for s in students]
    sections += ["<h2>Learners</h2>", _table(["student"] + [e.lab for e in labs], table)]
    grades = [{"Student": s, "ID": s, "SIS User ID": s, "SIS Login ID": s, "Section": "",
               **{e.lab: (f"{by_student[s][e.lab]['points']:g}" if e.lab in by_student[s]
                          and not not_final(by_student[s][e.lab]) else "") for e in labs},
               "Notes": "; ".join(f"{e.lab}: {why}" for e in labs if e.lab in by_student[s]
                                  and (why := not_final(by_student[s][e.lab])))}
              for s in students]
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>inferlab report: track {html.escape(track.name)}"
            f"</title>{style}</head><body>{''.join(sections)}</body></html>")
    return page, grades


def write_track_report(grading_root: Path, track_name: str, out: Path) -> tuple[Path, Path]:
    """`grading_root/<lab>/results` for each lab of the track that was graded -> out/report.html, grades.csv."""
    from .tracks import get_track

    track = get_track(track_name)
    by_lab = {}
    for entry in track.labs:
        folder = Path(grading_root) / entry.lab
        if (folder / "results").is_dir() and any((folder / "results").glob("*.json")):
            by_lab[entry.lab] = load_results(folder)
    if not by_lab:
        raise FileNotFoundError(f"no graded lab of track {track_name!r} under {grading_root}: expected "
                                f"{grading_root}/<lab>/results/ for one of {', '.join(e.lab for e in track.labs)}")
    page, grades = build_track(track_name, by_lab)
    return _write(out, page, grades)


def _write(out: Path, page: str, grades: list[dict]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(page)
    with open(out / "grades.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(grades[0]))
        writer.writeheader()
        writer.writerows(grades)
    return out / "report.html", out / "grades.csv"


def write_report(results_dir: Path, out: Path) -> tuple[Path, Path]:
    results = load_results(results_dir)
    page, grades = build(results, Path(out).resolve())
    return _write(out, page, grades)
