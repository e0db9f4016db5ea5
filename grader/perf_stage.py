"""grader.perf_stage: a lab's graded performance task, timed against the baseline and the reference in one run.

After a submission's answers were checked (`grader.check_stage`), and only if the timed task's
check passed (the code is correct on that seed's inputs), the autograder:

1. claims cores for the stage (one lock file per core, so that parallel grading workers' timers
   do not share one) and starts two worker processes (`grader.perf_worker`) pinned to them,
   each in the same sandbox with the same limits and thread count: one runs the learner's
   answer cells again, the other the reference answer cells from the lab's source. The
   learner's process never holds the reference, so it cannot call or copy it;
2. drives them from here, interleaved round by round in a shuffled order (warm-up first,
   repeats until the verdict is decided: `inferlab.bench.compare`): the grader's baseline and
   the reference in the clean process, the learner's code in its own;
3. reads every clock itself, outside the sandbox: a reply counts only once the worker has
   sent the tokens it generated, so a patched timer or a deferred result buys nothing.
   Every round feeds a different prompt, so results cached by input are useless too. It
   also reads, from /proc, the CPU time of the learner's whole process tree before and after
   each of its calls: a process that works between its calls (a thread left running) slows
   the baseline and the reference down, and fails the task;
4. checks the tokens of every timed call against the baseline's, and decides (`decide`): a
   clear verdict only when the learner's speedup as a fraction of the reference's is known to
   within +-rel_ci, or its whole 95% interval lies on one side of the bar (then the lab's
   `judge_timing` words it); otherwise, or when the time cap ran out, *inconclusive*, which is
   neither a pass nor a fail: the task is regraded later (`inferlab autograde --retry-inconclusive`).

The verdict replaces the correctness check's result for that task, and is appended to the
task's graded cell so that the learner's feedback shows the numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import labs, notebook
from .checks import ERROR, FAILED, INCONCLUSIVE, PASSED, RETRY_HINT, CheckFailed, CheckResult
from .timed import TimedTask
from .sandbox import Limits, start_sandboxed, stop_sandboxed

# The CPU-time rule. Measured on honest processes (docs/grading.md, "Timing verdicts"): between its
# calls a timing worker blocked on its next command uses 0.00-0.02 s of CPU over a whole stage, and a
# call uses at most its wall time on its pinned cores. A thread left spinning uses about the whole idle
# time. The allowances below are far above the first and far below the second.
IDLE_CPU_ALLOWANCE_S = 0.5  # CPU seconds a learner's process may use between its calls in a whole stage...
IDLE_CPU_SHARE = 0.05  # ...plus this share of the time it sat idle (Python, GC and torch housekeeping)
BUSY_CPU_FACTOR = 1.25  # during its calls: at most wall time x the cores it may use x this, plus the allowance
SLOW_FACTOR = 10.0  # a stage that ran out of time fails (not inconclusive) when the learner's calls were this much slower than the baseline's
CORE_WAIT_S = 60.0  # how long a stage waits for a core no other stage holds before it shares one
CORE_LOCKS = Path(tempfile.gettempdir()) / "inferlab-timing-cores"


class WorkerFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- process trees: pinning and CPU time, from outside

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks: its own user+system time and that of the children it has reaped)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
        # fields[1]: ppid (stat field 4); fields[11:15]: utime, stime, cutime, cstime (fields 14-17)
        table[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def process_tree(root: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """`root` and every process below it (the sandbox, the worker, anything the learner's code started:
    with a PID namespace, orphans are re-parented to the sandbox's init, which is in the tree)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by the process tree under `root`, every thread of every process included."""
    table = _proc_table()
    return sum(table[pid][1] for pid in process_tree(root, table)) / CLOCK_TICKS


def pin_tree(root: int, cores: set[int]) -> None:
    """Pin every thread of the tree to `cores` again (code inside may have moved itself)."""
    for pid in process_tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:
                pass


@contextlib.contextmanager
def claim_cores(count: int, wait_s: float = CORE_WAIT_S, lock_dir: Path | None = None):
    """Hold `count` cores of those this process may use, for one timing stage: yields (cores, shared).

    One lock file per core: a stage takes the free ones (the highest-numbered first, away from
    the interrupts core 0 often serves); if fewer are free it waits up to `wait_s` for other
    stages to finish, then shares (`shared` True). On a machine with one core, every stage
    shares it. The locks go when the process dies, so a killed worker leaves none behind."""
    lock_dir = lock_dir or CORE_LOCKS
    allowed = sorted(os.sched_getaffinity(0), reverse=True)
    count = max(1, min(count, len(allowed)))
    held: list[int] = []
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(lock_dir, 0o1777)  # shared by every grading user of this machine
    except OSError:
        lock_dir = None
    deadline = time.monotonic() + wait_s
    cores: list[int] = []
    try:
        while lock_dir is not None:
            for core in allowed:
                if len(cores) == count:
                    break
                try:
                    fd = os.open(lock_dir / f"core-{core}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                held.append(fd)
                cores.append(core)
            if len(cores) == count or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        shared = len(cores) < count
        if shared:  # add the cores others hold, fewest taken first: still pinned, no longer alone
            cores += [c for c in allowed if c not in cores][:count - len(cores)]
        yield set(cores), shared
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock


@dataclass
class CpuMeter:
    """What one timing worker's process tree used, read from /proc by the driver (never reported by the worker)."""

    root: int
    idle_cpu_s: float = 0.0  # between its own calls
    idle_s: float = 0.0
    busy_cpu_s: float = 0.0  # during its calls
    busy_s: float = 0.0
    _mark: tuple[float, float] | None = None  # (time, cpu) at the end of its last call, or when it became ready

    def read(self) -> tuple[float, float]:
        return time.perf_counter(), tree_cpu_s(self.root)

    def ready(self) -> None:
        self._mark = self.read()

    def before_call(self) -> tuple[float, float]:
        now = self.read()
        self._idle_until(now)
        return now

    def after_call(self, before: tuple[float, float]) -> None:
        now = self.read()
        self.busy_s += now[0] - before[0]
        self.busy_cpu_s += now[1] - before[1]
        self._mark = now

    def finish(self) -> None:
        """The idle time after its last call, up to now (a thread started by that call shows here)."""
        if self._mark is not None:
            self._idle_until(self.read())

    def _idle_until(self, now: tuple[float, float]) -> None:
        if self._mark is not None:
            self.idle_s += now[0] - self._mark[0]
            self.idle_cpu_s += now[1] - self._mark[1]
        self._mark = now


class Worker:
    """One sandboxed `grader.perf_worker` process, spoken to over its stdin/stdout, pinned to `cores`."""

    def __init__(self, lab: str, role: str, cells: list[str], backend: str, limits: Limits, private: Path,
                 deadline: float, cores: set[int] | None = None):
        self.role, self.deadline = role, deadline
        self.proc = start_sandboxed("grader.perf_worker", backend, limits, private, cores)
        self.cores = cores
        self.meter = CpuMeter(self.proc.pid)
        self._buffer = b""
        self.send({"lab": lab, "role": role, "cells": cells, "threads": limits.threads or os.cpu_count() or 1})

    def send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerFailed(f"the {self.role} process exited (exit code {self.proc.poll()})") from None

    def receive(self) -> dict:
        """The next reply, waiting no later than the stage's deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerFailed(f"the {self.role} process exited (exit code {self.proc.wait()}): "
                                   "it crashed, ran out of memory, or exited")
            self._buffer += chunk
            if len(self._buffer) > 16 << 20:
                raise WorkerFailed(f"the {self.role} process sent an oversized reply")
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply

    def wait_ready(self) -> None:
        self.receive()
        self.meter.ready()

    def run(self, name: str, prompt: list[int]) -> tuple[dict, float]:
        """One timed call: the reply, and its seconds by the driver's clock. The CPU reads and the re-pinning
        happen outside the timed interval."""
        if self.cores:
            pin_tree(self.proc.pid, self.cores)
        before = self.meter.before_call()
        start = time.perf_counter()
        self.send({"run": name, "prompt": prompt})
        reply = self.receive()
        seconds = time.perf_counter() - start
        self.meter.after_call(before)
        return reply, seconds

    def close(self) -> None:
        stop_sandboxed(self.proc)


# ---------------------------------------------------------------- the verdict

@dataclass
class Observed:
    """What the driver saw of one stage, whatever happened to it."""

    calls: dict[str, list[float]] = field(default_factory=lambda: {"baseline": [], "reference": [], "candidate": []})
    in_flight: tuple[str, float] | None = None  # (contender, perf_counter at its start) of the call under way
    started: float = 0.0  # perf_counter when the stage started its workers
    ready_s: dict[str, float] = field(default_factory=dict)  # seconds from the start until each worker was ready
    idle_cpu_s: float = 0.0  # the learner's process tree, between its calls
    idle_s: float = 0.0
    busy_cpu_s: float = 0.0  # during its calls
    busy_s: float = 0.0
    reference_idle_cpu_s: float = 0.0  # the clean process, for comparison: what an honest process shows
    cores: int = 1  # cores the learner's process may use (its torch threads, and the cores it is pinned to)
    shared_core: bool = False
    warmup: int = 1

    def timed(self) -> dict[str, list[float]]:
        """Seconds of the timed calls (after the warm-up), complete rounds only."""
        n = max(0, min(len(v) for v in self.calls.values()) - self.warmup)
        return {k: v[self.warmup:self.warmup + n] for k, v in self.calls.items()}


def fraction_of_reference(times: dict[str, list[float]], seed: int = 0) -> dict[str, float]:
    """The learner's speedup over the baseline as a fraction of the reference's, with its 95% interval."""
    from inferlab.bench import relative_speedup

    return relative_speedup(times, "baseline", "candidate", "reference", seed)


def is_decided(fraction: dict[str, float], bar: float, rel_ci: float) -> str:
    """'clear' when the whole 95% interval lies on one side of the bar, 'stable' when it is within +-rel_ci
    of the median, '' when neither (then a verdict now could be wrong either way)."""
    point, low, high = fraction["median"], fraction["ci_low"], fraction["ci_high"]
    if (low >= bar and point >= bar) or (high < bar and point < bar):
        return "clear"
    if high - low <= 2 * rel_ci * point:
        return "stable"
    return ""


def cpu_problem(seen: Observed) -> str:
    """Why the learner's process tree used CPU it should not have, or ''."""
    idle_allowed = IDLE_CPU_ALLOWANCE_S + IDLE_CPU_SHARE * seen.idle_s
    if seen.idle_cpu_s > idle_allowed:
        return (f"your process kept working between timed calls ({seen.idle_cpu_s:.1f} s of CPU while idle for "
                f"{seen.idle_s:.1f} s between its calls; at most {idle_allowed:.1f} s is allowed): that work slows "
                "down the baseline and the reference it is compared with. Stop any threads you start before "
                "returning, and start no background work in your answer cells")
    busy_allowed = BUSY_CPU_FACTOR * seen.busy_s * seen.cores + IDLE_CPU_ALLOWANCE_S
    if seen.busy_cpu_s > busy_allowed:
        return (f"your process used {seen.busy_cpu_s:.1f} s of CPU during calls that took {seen.busy_s:.1f} s, more "
                f"than {seen.cores} core(s) can give (the grader allows {seen.cores} thread(s) per submission): "
                "use the threads torch is given, and do not move your process to other cores")
    return ""


def cpu_measured(seen: Observed) -> dict:
    return {"cpu_between_calls_s": round(seen.idle_cpu_s, 2), "idle_between_calls_s": round(seen.idle_s, 1),
            "reference_cpu_between_calls_s": round(seen.reference_idle_cpu_s, 2),
            "cpu_during_calls_s": round(seen.busy_cpu_s, 2), "during_calls_s": round(seen.busy_s, 1),
            "cores": seen.cores, **({"shared_core": True} if seen.shared_core else {})}


def numbers(times: dict[str, list[float]], bar: float, seed: int) -> dict:
    """What a run measured, for a verdict the lab's judge did not word (inconclusive, capped)."""
    if min(len(v) for v in times.values()) < 2:
        return {"rounds": min(len(v) for v in times.values()), "min_fraction_of_reference": bar}
    fraction = fraction_of_reference(times, seed)
    base = statistics.median(times["baseline"])
    speedup = base / statistics.median(times["candidate"])
    reference = base / statistics.median(times["reference"])
    return {"speedup_vs_baseline": round(speedup, 2), "reference_speedup_vs_baseline": round(reference, 2),
            "threshold": round(bar * reference, 2), "fraction_of_reference": round(fraction["median"], 2),
            "fraction_ci95": [round(fraction["ci_low"], 2), round(fraction["ci_high"], 2)],
            "min_fraction_of_reference": bar, "rounds": len(times["baseline"])}


def capped_verdict(seen: Observed, max_seconds: float, now: float) -> tuple[str, str]:
    """The stage ran out of time: a fail when the learner's own code is what took it (its calls, or its
    cells re-run, over SLOW_FACTOR x the grader's), else inconclusive (the machine was too busy)."""
    said = f"timing did not finish within {max_seconds:.0f} s"
    if "submission" not in seen.ready_s:
        mine = now - seen.started
        theirs = seen.ready_s.get("reference")
        if theirs and mine > SLOW_FACTOR * theirs:
            return FAILED, (f"{said}: your answer cells took over {mine:.0f} s to run again in the timing process, "
                            f"more than {SLOW_FACTOR:.0f}x the reference's {theirs:.1f} s: keep heavy work out of "
                            "the answer cells")
        return INCONCLUSIVE, f"{said}: the timing processes started too slowly (the machine was busy); {RETRY_HINT}"
    base = seen.calls["baseline"]
    mine = list(seen.calls["candidate"])
    if seen.in_flight and seen.in_flight[0] == "candidate":
        mine.append(now - seen.in_flight[1])  # a lower bound of the call that never returned
    if base and mine:
        per_base, per_mine = statistics.median(base), max(statistics.median(mine), mine[-1])
        if per_mine > SLOW_FACTOR * per_base:
            return FAILED, (f"{said}: one call of your code took {per_mine:.1f} s, {per_mine / per_base:.0f}x the "
                            f"baseline's {per_base:.2f} s: make a generation call take well under a second")
    done = min(len(v) for v in seen.calls.values()) - seen.warmup
    return INCONCLUSIVE, (f"{said} (the machine was busy: {max(done, 0)} timed round(s) done, a baseline call took "
                          f"{statistics.median(base) if base else float('nan'):.2f} s); {RETRY_HINT}")


def decide(times: dict[str, list[float]] | None, seen: Observed, bar: float, rel_ci: float, seed: int = 0,
           capped: bool = False, max_seconds: float = 0.0, now: float | None = None) -> tuple[str | None, str, dict]:
    """The verdict the grader can stand by, before the lab's `judge_timing` words it.

    Returns (status, message, measured); status None means "decided: let the lab's judge say pass or
    fail". In order: CPU used outside the rules fails; a run cut off by the time cap fails when the
    learner's own calls took it, else is inconclusive; a run whose fraction of the reference is neither
    clear (its 95% interval on one side of the bar) nor stable (within +-rel_ci) is inconclusive."""
    measured = cpu_measured(seen)
    problem = cpu_problem(seen)
    if problem:
        return FAILED, problem, {**(numbers(times, bar, seed) if times else {}), **measured}
    if capped:
        status, message = capped_verdict(seen, max_seconds, time.perf_counter() if now is None else now)
        return status, message, {**(numbers(times, bar, seed) if times else {}), **measured}
    fraction = fraction_of_reference(times, seed)
    how = is_decided(fraction, bar, rel_ci)
    measured.update(fraction_ci95=[round(fraction["ci_low"], 2), round(fraction["ci_high"], 2)], decided=how)
    if how:
        return None, "", measured
    return INCONCLUSIVE, (
        f"the timing was too noisy to tell: your speedup is {fraction['median']:.0%} of the reference's (95% interval "
        f"{fraction['ci_low']:.0%} to {fraction['ci_high']:.0%}) against a bar of {bar:.0%}, after "
        f"{len(times['baseline'])} rounds; {RETRY_HINT}"), {**numbers(times, bar, seed), **measured}


def result_line(result: CheckResult) -> str:
    """`CheckResult.line()`, which also words an inconclusive result."""
    if result.status != INCONCLUSIVE:
        return result.line()
    text = f"[{result.task}] INCONCLUSIVE: {result.message}"
    shown = {k: v for k, v in result.measured.items() if k in ("fraction_of_reference", "fraction_ci95",
                                                                "min_fraction_of_reference", "rounds")}
    if shown:
        text += " (" + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")"
    return text


def cells_for(nb, cell_ids: tuple[str, ...]) -> list[str]:
    """Sources of the named cells, each followed by the cells the learner added right after it."""
    return [source for _, source in notebook.answer_cells(nb, cell_ids)]


def time_submission(lab: str, prepared, source, backend: str, limits: Limits, seed: int,
                    workdir: Path | None = None, spec: TimedTask | None = None) -> CheckResult:
    """Time the submission's code of the lab's timed task against the baseline and the reference, on cores
    of its own (`claim_cores`), and decide: passed, failed, inconclusive, or error (the grader's side failed)."""
    from .perf import threshold

    loaded = labs.load(lab)
    spec = spec or loaded.timed
    bar = float(threshold(lab, spec.task)["min_fraction_of_reference"])
    threads = limits.threads or os.cpu_count() or 1
    with claim_cores(threads) as (cores, shared):
        seen = Observed(cores=len(cores), shared_core=shared)
        return _timed_run(lab, loaded, spec, bar, prepared, source, backend, limits, seed, workdir, cores, seen)


def _timed_run(lab, loaded, spec: TimedTask, bar: float, prepared, source, backend: str, limits: Limits, seed: int,
               workdir: Path | None, cores: set[int], seen: Observed) -> CheckResult:
    from inferlab.bench import compare

    start = time.monotonic()
    seen.started = time.perf_counter()
    deadline = start + spec.max_seconds
    prompts = loaded.perf_prompts(seed, 1 + spec.rounds[1])
    # Timed results must equal the baseline's; a lab may accept a result that differs only where it
    # can show it is still right (continuous_batching: a near tie that another batch shape tipped).
    outputs_agree = loaded.timed_outputs_agree
    tokens: dict[str, list[list[int]]] = {"baseline": [], "reference": [], "candidate": []}
    tampered: set[str] = set()
    workers: list[Worker] = []
    result = None

    def verdict(status: str, message: str, measured: dict) -> CheckResult:
        return CheckResult(spec.task, status, message, measured, time.monotonic() - start)

    def observe() -> None:
        if workers:
            for w in workers:
                w.meter.finish()
            learner_meter, clean_meter = workers[0].meter, workers[-1].meter
            seen.idle_cpu_s, seen.idle_s = learner_meter.idle_cpu_s, learner_meter.idle_s
            seen.busy_cpu_s, seen.busy_s = learner_meter.busy_cpu_s, learner_meter.busy_s
            seen.reference_idle_cpu_s = clean_meter.idle_cpu_s if len(workers) > 1 else 0.0

    try:
        with tempfile.TemporaryDirectory(prefix="inferlab-timing-", dir=workdir) as tmp:
            learner = Worker(lab, "submission", cells_for(prepared, spec.cells), backend, limits,
                             Path(tmp) / "submission", deadline, cores)
            workers.append(learner)
            clean = Worker(lab, "reference", cells_for(source, spec.cells), backend, limits,
                           Path(tmp) / "reference", deadline, cores)
            workers.append(clean)
            clean.wait_ready()  # the grader's side first: its start-up time is what the learner's is compared with
            seen.ready_s["reference"] = time.perf_counter() - seen.started
            try:
                learner.wait_ready()
            except WorkerFailed as err:
                raise CheckFailed(f"your answer cells could not be run again for timing: {err}") from None
            seen.ready_s["submission"] = time.perf_counter() - seen.started

            def contender(worker: Worker, name: str):
                def call() -> float:  # the i-th call of every contender gets the i-th prompt: same work per round
                    i = len(tokens[name])
                    seen.in_flight = (name, time.perf_counter())
                    reply, seconds = worker.run(name, prompts[i])
                    seen.in_flight = None
                    seen.calls[name].append(seconds)
                    tokens[name].append(reply["tokens"])
                    tampered.update(reply.get("tampered", []))
                    # Speed counts only for correct results, checked call by call: code that is right
                    # while tested but cuts corners while timed fails here.
                    if len(tokens["candidate"]) > i and len(tokens["baseline"]) > i \
                            and tokens["candidate"][i] != tokens["baseline"][i] \
                            and not outputs_agree(prompts[i], tokens["candidate"][i], tokens["baseline"][i]):
                        raise CheckFailed(f"while being timed, your code returned tokens that differ from the "
                                          f"baseline's for prompt {i + 1} (first 5: {tokens['candidate'][i][:5]}, "
                                          f"expected {tokens['baseline'][i][:5]}): timing counts only for correct "
                                          "results", differs_when_timed=True)
                    return seconds
                return call

            def decided(times: dict[str, list[float]]) -> bool:
                return bool(is_decided(fraction_of_reference(times, seed), bar, spec.rel_ci))

            try:
                result = compare({"baseline": contender(clean, "baseline"),
                                  "reference": contender(clean, "reference"),
                                  "candidate": contender(learner, "candidate")},
                                 baseline="baseline", warmup=seen.warmup, min_rounds=spec.rounds[0],
                                 max_rounds=spec.rounds[1], rel_ci=spec.rel_ci, seed=seed,
                                 max_seconds=max(1.0, deadline - time.monotonic() - spec.slack_s),
                                 done=decided, timer=lambda call: call())
            except WorkerFailed as err:
                if seen.in_flight and seen.in_flight[0] != "candidate":
                    raise  # the grader's side failed
                raise CheckFailed(f"your code failed while being timed: {err}") from None
            observe()
    except CheckFailed as err:
        observe()
        problem = cpu_problem(seen)  # a thread left running can also be why the code failed or ran slow
        return verdict(FAILED, problem or err.message, {**dict(err.measured), **cpu_measured(seen)})
    except TimeoutError:
        now = time.perf_counter()
        observe()
        timed = seen.timed()
        status, message, measured = decide(timed if min(map(len, timed.values())) >= 2 else None, seen, bar,
                                           spec.rel_ci, seed, capped=True, max_seconds=spec.max_seconds, now=now)
        return verdict(status, message, measured)
    except WorkerFailed as err:  # the reference side failed: a grader problem, not the learner's
        return verdict(ERROR, f"the grader's reference process failed: {err}", {})
    finally:
        for w in workers:
            w.close()
    return verdict(*final_verdict(loaded.judge_timing, result, sorted(tampered), seen, bar, spec.rel_ci, seed))


def final_verdict(judge, result, tampered: list[str], seen: Observed, bar: float, rel_ci: float,
                  seed: int = 0) -> tuple[str, str, dict]:
    """A finished run's (status, message, measured): `decide` first; when it has decided (or clocks were
    replaced, which fails whatever the timing says), the lab's `judge(result, tampered)` words it."""
    status, message, extra = decide(result.times, seen, bar, rel_ci, seed)
    if status is not None and not tampered:
        return status, message, extra
    try:
        return PASSED, "", {**judge(result, tampered), **extra}
    except CheckFailed as err:
        return FAILED, err.message, {**dict(err.measured), **extra}


def apply(lab: str, result: dict, executed, source, backend: str, limits: Limits, seed: int,
          workdir: Path | None = None, timing: bool = True) -> dict:
    """Run the lab's timed task for a graded submission (if its gate passed) and fold the verdict into it.

    `timing=False`: the task is left inconclusive, not timed (a quick correctness pass over a class).
    Inconclusive: the task's points are not awarded yet, the task says so (`inconclusive: true`) and
    the result lists it (`inconclusive: [task]`); the gradebook then asks for its grade instead of
    recording a zero. A failure of the grader's own reference process makes the submission a
    `grader-error` (regraded by the next run), never a learner's zero."""
    spec: TimedTask | None = labs.load(lab).timed
    if spec is None:
        return result
    task = next((t for t in result["tasks"] if t["cell"] == spec.gate), None)
    if task is None or not task["passed"]:
        return result  # not correct (or not reached): nothing to time, the gate's message stands
    if timing:
        timing = time_submission(lab, executed, source, backend, limits, seed, workdir)
    else:  # asked not to time (autograde --no-timing): not known yet, so not a pass and not a fail
        timing = CheckResult(spec.task, INCONCLUSIVE, "not timed in this run (graded with --no-timing): regrade with "
                             "--retry-inconclusive to time it", {})
    line = result_line(timing)
    if timing.status == ERROR:
        result.update(status="grader-error", error=f"{spec.task}: {timing.message}; regrade with the same command")
    if timing.status == INCONCLUSIVE:
        task.update(points=0.0, passed=False, message=line[:500], inconclusive=True)
        result["inconclusive"] = sorted(set(result.get("inconclusive", [])) | {spec.task})
    elif not timing.passed:
        task.update(points=0.0, passed=False, message=line[:500])
    checks = [c for c in result["checks"] if c["task"] != spec.task]
    checks.append({"task": timing.task, "status": timing.status, "message": timing.message,
                   "measured": timing.measured, "seconds": round(timing.seconds, 2)})
    result["checks"] = checks
    result["points"] = sum(t["points"] for t in result["tasks"])
    import nbformat

    notebook.cell(executed, spec.gate).outputs.append(nbformat.v4.new_output("stream", name="stdout", text=(
        f"[grader] {spec.task} timed in separate processes, interleaved with the baseline and the reference:\n"
        f"{line}\n")))
    return result
