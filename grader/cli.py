"""grader.cli: the `inferlab` command line, a thin layer over the Python API.

Heavy imports (torch, the model) happen inside each command, so `inferlab --help` is
instant. Conventions: every command that writes files takes `--out DIR` and prints where
it wrote; every failure exits non-zero with a message that says what to fix.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


def need_extra(module: str, extra: str) -> None:
    """Fail with the install command when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise click.ClickException(f"this command needs {module}: pip install -e '.[{extra}]' (or `make install`)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inferlab")
def main() -> None:
    """inferlab: hands-on labs in LLM inference optimisation, and their grader.

    \b
    Examples:
      inferlab doctor
      inferlab generate --model tiny --prompt "def fib(n):" --max-new-tokens 64
      inferlab release --check
      inferlab calibrate kv_cache
    """


@main.command()
@click.option("--bandwidth-mb", type=click.FloatRange(min=1), default=128, show_default=True,
              help="Array size for the memory-bandwidth probe.")
def doctor(bandwidth_mb: float) -> None:
    """Check this machine: versions, CPU/GPU, memory bandwidth, sandbox, Triton, labs.

    \b
    Example:
      inferlab doctor
    """
    from .doctor import diagnose

    section = None
    findings = diagnose(bandwidth_mb=bandwidth_mb)
    for f in findings:
        if f.section != section:
            section = f.section
            click.echo(f"\n{section}")
        mark = "ok " if f.ok else "-- "
        click.echo(f"  {mark}{f.name:<28} {f.value}")
    problems = [f for f in findings if not f.ok and f.section in ("models",)]
    if problems:
        raise click.ClickException("; ".join(f"{f.name}: {f.value}" for f in problems))


@main.command()
@click.option("--model", default="tiny", show_default=True, help="Bundled name (tiny, tiny-draft) or a "
              "Hugging Face-format directory.")
@click.option("--prompt", default="def fib(n):", show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample from the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Sample from the smallest set of tokens whose probability reaches p.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler's RNG.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
def generate(model: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int, dtype: str) -> None:
    """Stream a continuation from a model with the naive baseline, then print tokens/s.

    \b
    Example:
      inferlab generate --model tiny --prompt "def fib(n):" --max-new-tokens 64
    """
    import torch

    from inferlab import ModelLoadError, load_model, load_tokenizer, naive_generate_stream

    try:
        net = load_model(model, dtype=getattr(torch, dtype))
        tok = load_tokenizer(model)
        ids = tok.encode(prompt)
        stream = naive_generate_stream(net, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, eos_id=tok.eos_id)
        click.echo(prompt, nl=False)
        new: list[int] = []
        shown = ""
        start = time.perf_counter()
        for token in stream:
            new.append(token)
            text = tok.decode(new)
            # A byte-level token can end mid-character: hold it back until the character completes.
            if not text.endswith("\ufffd"):
                click.echo(text[len(shown):], nl=False)
                shown = text
            sys.stdout.flush()
        elapsed = time.perf_counter() - start
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"\n\n[{len(new)} tokens in {elapsed:.2f} s: {len(new) / elapsed:.1f} tokens/s with naive_generate "
               f"(recomputes the whole sequence every step), prompt {len(ids)} tokens, model {model}]")


@main.command()
@click.argument("lab", required=False)
@click.option("--check", "check_only", is_flag=True,
              help="Write nothing; exit 1 if labs/ differs from what the sources in solutions/ generate.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write the release into.  [default: labs/ of this repository]")
def release(lab: str | None, check_only: bool, out: Path | None) -> None:
    """Generate the learner release of LAB (default: every lab) from its nbgrader source.

    \b
    Examples:
      inferlab release kv_cache        # regenerate labs/kv_cache/ from solutions/kv_cache/
      inferlab release --check         # CI: is every release in sync with its source?
    """
    need_extra("nbgrader", "lab")
    from . import release as rel

    labs = [lab] if lab else rel.source_labs()
    try:
        if check_only:
            problems = [p for name in labs for p in rel.check(name)]
            if problems:
                raise click.ClickException("labs/ is out of sync with solutions/; run `inferlab release` and commit:\n  "
                                           + "\n  ".join(problems))
            click.echo(f"in sync: {', '.join(labs)}")
            return
        for name in labs:
            click.echo(f"wrote {rel.release(name, out=out)}")
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None


@main.command()
@click.argument("lab")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("calibration"),
              show_default=True, help="Folder for the proposed <lab>.json thresholds file.")
@click.option("--profile", default=None, help="Hardware profile to write (default: detected: cpu, cuda, h100, ...).")
def calibrate(lab: str, out: Path, profile: str | None) -> None:
    """Measure LAB's reference and baseline here and propose thresholds for this hardware profile.

    Writes OUT/<lab>.json: the committed profiles plus this machine's, newly measured.
    Review it, then copy it to grader/thresholds/.

    \b
    Example:
      inferlab calibrate kv_cache --out calibration
    """
    from .calibrate import calibrate as run_calibration

    try:
        path = run_calibration(lab, out, profile)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {path}")


@main.command()
@click.argument("lab")
@click.option("--submissions", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="nbgrader's submitted/ folder (<student>/<lab>/<lab>.ipynb) or a folder of <student>.ipynb. "
                   "Default with --course: COURSE/submitted.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("grading-output"),
              show_default=True, help="Results, executed notebooks, gradebook.db and feedback go to OUT/LAB.")
@click.option("--course", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An nbgrader course root (as on the hub): grade COURSE/submitted into COURSE/autograded, "
                   "COURSE/feedback and COURSE/gradebook.db, which formgrader reads; results go to "
                   "COURSE/autograde-results/LAB. Replaces --out.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Submissions graded at once [local: 2; ray: as many as the cluster's resources allow].")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: one Ray task per submission.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --backend ray: the cluster (`auto` on its head node, ray://HEAD:10001 from outside); "
                   "default: start Ray on this machine, bound to 127.0.0.1.")
@click.option("--sandbox", type=click.Choice(["bwrap", "docker", "none"]), default="bwrap", show_default=True,
              help="none isolates nothing: for trusted code only.")
@click.option("--timeout", type=click.FloatRange(min=10), default=600, show_default=True,
              help="Wall-time limit per submission, in seconds.")
@click.option("--memory-mb", type=click.IntRange(min=512), default=6144, show_default=True,
              help="Address-space limit of a submission's kernel.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs per submission (bwrap binds /dev/nvidia*; docker: --gpus).")
@click.option("--force", is_flag=True, help="Regrade even submissions that are unchanged since the last run.")
@click.option("--retry-inconclusive", is_flag=True,
              help="Also regrade the submissions with an inconclusive task (a plain re-run skips them as graded).")
@click.option("--no-preflight", is_flag=True,
              help="Skip grading the lab's reference solution first (the preflight): grade even if this machine or "
                   "sandbox cannot give the reference full marks.")
@click.option("--no-timing", is_flag=True,
              help="Do not time the lab's timed task: it is left inconclusive (not awarded, not a zero), for a quick "
                   "correctness pass; time it later with --retry-inconclusive.")
@click.option("--due", default=None, metavar="TIME",
              help="The lab's due date (2026-11-23T17:00, local time unless a zone is given); default with --course: "
                   "the course's track start (`inferlab track start TRACK --course DIR`) plus the lab's due offset.")
def autograde(lab: str, submissions: Path | None, out: Path, course: Path | None, workers: int | None,
              backend: str, ray_address: str | None, sandbox: str, timeout: float, memory_mb: int, gpus: int,
              force: bool, retry_inconclusive: bool, no_preflight: bool, no_timing: bool, due: str | None) -> None:
    """Grade every submission of LAB in a sandbox, in parallel; scores go to nbgrader's gradebook.

    First the lab's reference solution is graded here, in the same sandbox (the preflight); unless
    it gets full marks, nothing is graded (cached per output folder, lab source, grader and machine).
    A timed task that could not be timed reliably is inconclusive: not awarded, not a zero, marked
    in the gradebook as needing a grade; regrade with --retry-inconclusive.

    \b
    Exit status:
      0  every submission graded (or rejected with a reason)
      1  bad input, or a grader error (named; the next run regrades those)
      3  some task is inconclusive (named; regrade with --retry-inconclusive)
      4  the preflight failed: the reference did not get full marks; nothing was written

    \b
    Examples:
      inferlab autograde kv_cache --submissions course/submitted --workers 2 --out grading-output
      inferlab autograde kv_cache --course .    # on the hub, in the course directory
      inferlab autograde kv_cache --course . --retry-inconclusive   # regrade timings that were inconclusive
      inferlab autograde kv_cache --course . --no-timing   # correctness first; time later with --retry-inconclusive
      inferlab autograde kv_cache --course /srv/course --backend ray --ray-address auto   # on a Ray cluster
    """
    need_extra("nbgrader", "lab")
    from .autograde import PreflightFailed, source_path
    from .autograde import autograde as run_autograde
    from .sandbox import Limits
    from .submissions import discover

    if course is not None:
        if not (course / "nbgrader_config.py").is_file():
            raise click.ClickException(f"{course} is not an nbgrader course (no nbgrader_config.py): "
                                       "pass the course root, or use --submissions and --out")
        submissions = submissions or course / "submitted"
        target, results_dir = course, course / "autograde-results" / lab
    elif submissions is None:
        raise click.ClickException("say where the submissions are: --submissions DIR, or --course COURSE_ROOT")
    else:
        target, results_dir = out / lab, None
    if not submissions.is_dir():
        raise click.ClickException(f"no submissions folder at {submissions}: collect first (`nbgrader collect {lab}`)")
    try:
        source_path(lab)
        discover(lab, submissions)
        if ray_address and backend != "ray":
            raise ValueError("--ray-address needs --backend ray")
        from .tracks import due_date, parse_time

        due_at = parse_time(due) if due else due_date(course, lab)
        if backend == "ray":
            need_extra("ray", "cluster")
        outcomes = run_autograde(lab, submissions, target, workers=workers, sandbox=sandbox,
                                 limits=Limits(wall_s=timeout, memory_mb=memory_mb, gpus=gpus), force=force,
                                 results_dir=results_dir, backend=backend, ray_address=ray_address, due=due_at,
                                 preflight=not no_preflight, retry_inconclusive=retry_inconclusive,
                                 timing=not no_timing)
    except PreflightFailed as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(4)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    width = max((len(o.student) for o in outcomes), default=0)
    for o in outcomes:
        if o.status == "grader-error":
            click.echo(f"  {o.student:<{width}}      - / {o.max_points:<5g} grader-error: {o.error.splitlines()[0][:160]}"
                       if o.error else f"  {o.student:<{width}}      - / {o.max_points:<5g} grader-error")
            continue
        note = f" (inconclusive: {', '.join(o.inconclusive)}; not graded yet)" if o.inconclusive else ""
        click.echo(f"  {o.student:<{width}}  {o.points:>5g} / {o.max_points:<5g} {o.status}{note}")
    if course is not None:
        click.echo(f"wrote {course}/autograded, {course}/feedback, {course / 'gradebook.db'} and {results_dir}")
    else:
        click.echo(f"wrote {target} (results/, autograded/, feedback/, gradebook.db)")
    errors = [o for o in outcomes if o.status == "grader-error"]
    if errors:
        named = "; ".join(f"{o.student} ({o.error.splitlines()[0][:200] if o.error else 'no reason recorded'})"
                          for o in errors)
        raise click.ClickException(f"grading failed for {named}. A grader error is not the learner's: nothing was "
                                   "recorded for them; see the results JSON of each, then rerun")
    unknown = [o for o in outcomes if o.inconclusive]
    if unknown:
        names = "; ".join(f"{o.student} ({', '.join(o.inconclusive)})" for o in unknown)
        click.echo(f"Inconclusive timings, not graded yet (marked as needing a grade in the gradebook): {names}; "
                   f"regrade them with `inferlab autograde {lab} ... --retry-inconclusive`", err=True)
        sys.exit(3)


@main.command()
@click.option("--results", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A lab's autograde output folder (the one holding results/); with --track, the folder holding "
                   "one such folder per lab.")
@click.option("--track", "track_name", default=None, help="Report a whole track: its labs side by side, in order.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("report"), show_default=True)
def report(results: Path, track_name: str | None, out: Path) -> None:
    """Write the instructor report (report.html) and an LMS-ready grades.csv.

    \b
    Examples:
      inferlab report --results grading-output/kv_cache --out report
      inferlab report --results grading-output --track quick --out report-quick
    """
    need_extra("matplotlib", "lab")
    from .report import write_report, write_track_report
    from .tracks import TrackError

    try:
        page, grades = write_track_report(results, track_name, out) if track_name else write_report(results, out)
    except (FileNotFoundError, TrackError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {page} and {grades}")


@main.command()
@click.option("--track", "track_name", default="quick", show_default=True,
              help="Grade this track's bundled sample class (samples/<track>_class.py), lab by lab.")
@click.option("--lab", default=None, help="Instead: grade one lab's bundled samples (grader/labs/<lab>/samples.py).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True, help="The course, its submissions, grading output, reports and grades.csv go here.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--timeout", type=click.FloatRange(min=10), default=150, show_default=True,
              help="Wall-time limit per submission, in seconds (kv_cache's 'loop' sample uses all of it).")
@click.option("--no-preflight", is_flag=True, help="Do not grade each lab's reference first (see autograde --help).")
def demo(track_name: str, lab: str | None, out: Path, workers: int, timeout: float, no_preflight: bool) -> None:
    """Autograde a bundled sample class and write the instructor reports (what `make demo` runs).

    By default the quick track's class: six learners' hand-ins of gpu_basics, kv_cache,
    continuous_batching and roi (right, slow, wrong, partial, missing, a patched timer), graded
    in the bubblewrap sandbox as `inferlab autograde --course` grades a class, with due dates
    from the track. Prints awarded against expected points per learner and lab; exits non-zero
    if any grade or anti-cheat flag differs from what a careful human grader would give (1), or if a
    timing stayed inconclusive after one regrade (3), or if a lab's reference did not get full
    marks first (4: the preflight, as in autograde). A re-run regrades only what changed.

    \b
    Examples:
      inferlab demo --out demo-output
      inferlab demo --lab kv_cache --out demo-kv-cache
    """
    need_extra("nbgrader", "lab")
    import shutil

    from .autograde import PreflightFailed
    from .demo import run_demo, run_track_demo, table, track_table
    from .tracks import TrackError

    if shutil.which("bwrap") is None:
        click.echo("bubblewrap is not installed: grading the bundled samples without a sandbox (they are "
                   "trusted code; install it with `apt-get install bubblewrap` before grading learners)", err=True)
    try:
        if lab:
            rows, page, grades = run_demo(out, lab, workers=workers, timeout_s=timeout, preflight=not no_preflight)
            click.echo(table(rows))
            click.echo(f"wrote {page}, {grades} and {out / 'grading' / lab} (results, feedback, gradebook.db)")
            wrong = [r.sample for r in rows if not r.agrees]
            unknown = [f"{r.sample} ({', '.join(r.inconclusive)})" for r in rows if r.inconclusive]
        else:
            hands, page, grades = run_track_demo(out, track_name, workers=workers, timeout_s=timeout,
                                                 preflight=not no_preflight)
            click.echo(track_table(hands))
            click.echo(f"wrote {page} (track report), {grades}, {out / 'reports'} (one report per lab) and "
                       f"{out / 'course'} (the nbgrader course: submitted/, autograded/, feedback/, gradebook.db)")
            wrong = [f"{h.learner}/{h.lab}" for h in hands if not h.agrees]
            unknown = [f"{h.learner}/{h.lab} ({', '.join(h.inconclusive)})" for h in hands if h.inconclusive]
    except PreflightFailed as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(4)
    except (ValueError, FileNotFoundError, RuntimeError, TrackError) as err:
        raise click.ClickException(str(err)) from None
    if wrong:
        raise click.ClickException(f"not graded as expected: {', '.join(wrong)}; see the results under {out}")
    if unknown:
        click.echo(f"inconclusive after one regrade (this machine was too busy to time them reliably): "
                   f"{', '.join(unknown)}; run the demo again on a quieter machine", err=True)
        sys.exit(3)


@main.group()
def track() -> None:
    """Timed tracks (quick, deep, production): start one, see the time left and your self-checks.

    \b
    Examples:
      inferlab track list
      inferlab track start quick                  # a learner, self-paced
      inferlab track status
      inferlab track start quick --course . --at 2026-11-23T13:00   # an instructor: the class's due dates
    """


@track.command("list")
def track_list() -> None:
    """The tracks, with their labs, time budgets and due offsets."""
    from .tracks import format_duration, load_tracks

    for t in load_tracks().values():
        click.echo(f"{t.name}: {t.title} ({format_duration(t.budget)})")
        for entry in t.labs:
            click.echo(f"  {entry.lab:<22} {entry.minutes:>4} min   due {format_duration(entry.due)} after the start")


@track.command("start")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for track.json [default: $INFERLAB_HOME or ~/.inferlab].")
@click.option("--course", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An nbgrader course root: start the track for the whole class (writes COURSE/inferlab-track.json; "
                   "autograde --course then records due dates and lateness).")
@click.option("--at", "at", default=None, metavar="TIME", help="When it starts [default: now], e.g. 2026-11-23T13:00.")
@click.option("--restart", is_flag=True, help="Start again; the previous record is kept next to the new one.")
def track_start(name: str, out: Path | None, course: Path | None, at: str | None, restart: bool) -> None:
    """Start track NAME now (or --at a time) and show its labs' due times.

    \b
    Examples:
      inferlab track start quick
      inferlab track start quick --course /srv/inferlab/course --at 2026-11-23T13:00
    """
    from .tracks import TrackError, parse_time, start, status_rows

    if course is not None and not (course / "nbgrader_config.py").is_file():
        raise click.ClickException(f"{course} is not an nbgrader course (no nbgrader_config.py): pass the course root")
    try:
        path = start(name, parse_time(at) if at else None, course or out, restart=restart, course=course is not None)
        click.echo(f"wrote {path}")
        if course is None:
            head, rows = status_rows(out)
            click.echo(head)
            for row in rows:
                click.echo(f"  {row[0]:<22} {row[1]:>8}  due {row[2]}")
    except TrackError as err:
        raise click.ClickException(str(err)) from None


@track.command("status")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The folder track start wrote to [default: $INFERLAB_HOME or ~/.inferlab].")
def track_status(out: Path | None) -> None:
    """The started track's labs: budget, due time, time left before it is due, and self-check results.

    Self-checks count from the copy of each lab's notebook the track follows (the first one opened);
    a scratch copy's checks are listed as not counted.

    \b
    Example:
      inferlab track status
    """
    from .tracks import STATUS_COLUMNS, TrackError, status_rows

    try:
        head, rows = status_rows(out)
    except TrackError as err:
        raise click.ClickException(str(err)) from None
    click.echo(head)
    table = [list(STATUS_COLUMNS), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for row in table:
        click.echo("  " + "  ".join(v.ljust(w) for v, w in zip(row[:4], widths)) + "  " + row[4])


@main.command("hub-account")
@click.argument("name")
@click.option("--role", type=click.Choice(["learner", "instructor"]), default="learner", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("infra/hub"),
              show_default=True, help="Folder of the hub's accounts.txt (created if missing).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
def hub_account(name: str, role: str, out: Path, password_stdin: bool) -> None:
    """Add a person to the classroom hub's accounts file, or change their role or password.

    Only a salted pbkdf2 hash of the password is stored; every other entry is kept.

    \b
    Example:
      inferlab hub-account ada --role instructor --out infra/hub
    """
    from .hub import write_account

    if password_stdin:
        password = click.get_text_stream("stdin").readline().rstrip("\n")
    else:
        password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    path = out / "accounts.txt"
    try:
        new = write_account(path, name, role, password)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{'added' if new else 'updated'} {name} ({role}) in {path}")


if __name__ == "__main__":
    main()
