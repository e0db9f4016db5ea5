"""bench/gpu_check.py: `make gpu-check`, everything a lent GPU must measure, as one script of at most 8 minutes.

On a CUDA machine it runs these steps, each in its own process with its own time cap, inside one
global budget (--budget-s, 480 s); a step that would not fit what is left is skipped and reported:

  <lab>    for every lab with a GPU part (grader/catalogue.py) and a calibrate() (today gpu_basics,
           kv_cache, continuous_batching): `grader.calibrate.calibrate(lab, OUT/thresholds, "cuda")`,
           the proposal annotated with the GPU, its short name (grader.perf.hardware_profile()), the
           driver, CUDA, the host CPU and where the lab's timed task actually ran (GPU or host CPU);
  triton   every path of TRITON_PATHS compiled on the GPU and compared with torch.

It writes OUT/results-gpu.json and OUT/results-gpu.md after every step (a run cut short still leaves
what it measured). With --commit-thresholds it also merges each measured profile into
grader/thresholds/<lab>.json (dropping its `"estimate": true`) and writes bench/results-gpu.{md,json}.

Without a GPU it exits with code 3 at once, unless --cpu-dry-run: the same steps on the CPU, under the
profile `cpu-dry-run`, with one round per measurement and Triton under TRITON_INTERPRET=1,
writing nothing outside OUT (--commit-thresholds then writes under OUT/commit-preview/ instead).

    python bench/gpu_check.py --commit-thresholds --out gpu-check-output    # on the GPU machine
    python bench/gpu_check.py --cpu-dry-run --out /tmp/gpu-check --budget-s 240
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NO_GPU_EXIT = 3
DRY_RUN_PROFILE = "cpu-dry-run"
DRY_RUN_MAX_ROUNDS = 1  # and so no warm-up: a dry run proves the code paths, not the numbers
# Keywords of a lab's calibrate() that set how many times it measures, and their dry-run values.
DRY_RUN_OPTIONS = {"runs": 1, "trials": 1, "rounds": 1}
RESULTS = "results-gpu"


# ---------------------------------------------------------------- Triton paths
# A Triton path: a name and a function `path(device, quick) -> dict` that runs one kernel on `device`
# ("cuda", or "cpu" under TRITON_INTERPRET=1) against its torch equivalent and returns at least
# `max_abs_error`, `tolerance` and `shape`, and on the GPU `triton_ms` and `torch_ms`. Labs that ship
# kernels (quantization, flash_attention) add theirs to TRITON_PATHS; a path imports its lab's code
# when called, so the list stays cheap to import.

try:  # optional (inferlab[triton]); TRITON_INTERPRET=1 must be set before this import to run kernels on the CPU
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

if triton is not None:
    @triton.jit
    def softmax_kernel(out_ptr, in_ptr, in_stride, out_stride, n_cols, BLOCK: tl.constexpr):
        # One program per row: the whole row in one block of BLOCK >= n_cols lanes.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(in_ptr + row * in_stride + cols, mask=mask, other=-float("inf"))
        x = x - tl.max(x, axis=0)  # subtract the row's max so exp cannot overflow
        num = tl.exp(x)
        tl.store(out_ptr + row * out_stride + cols, num / tl.sum(num, axis=0), mask=mask)


def row_softmax(device: str, quick: bool) -> dict[str, Any]:
    """softmax_kernel against torch.softmax, fp32: (64, 100) when quick, else (4096, 1000)."""
    import torch

    rows, cols = (64, 100) if quick else (4096, 1000)
    x = torch.randn(rows, cols, device=device, generator=torch.Generator(device=device).manual_seed(0))
    out = torch.empty_like(x)
    block = triton.next_power_of_2(cols)

    def launch():
        softmax_kernel[(rows,)](out, x, x.stride(0), out.stride(0), cols, BLOCK=block)

    started = time.perf_counter()
    launch()  # the first call compiles (or, under the interpreter, interprets)
    if device == "cuda":
        torch.cuda.synchronize()
    result = {"shape": [rows, cols], "dtype": "float32", "first_call_s": round(time.perf_counter() - started, 3),
              "max_abs_error": float((out - torch.softmax(x, dim=-1)).abs().max()), "tolerance": 1e-5}
    if device == "cuda":
        from triton.testing import do_bench

        result["triton_ms"] = round(do_bench(launch), 4)
        result["torch_ms"] = round(do_bench(lambda: torch.softmax(x, dim=-1)), 4)
    return result


def _bench_script(name: str):
    """bench/<name>.py as a module, by its path: bench/ is not a package, and the tests load this script without
    it on sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def flash_attention_forward_path(device: str, quick: bool) -> dict[str, Any]:
    """The flash_attention lab's reference kernel against float64 attention (bench/flash_attention.py)."""
    return _bench_script("flash_attention").gpu_check_path(device, quick)


def int4_matmul_path(device: str, quick: bool) -> dict[str, Any]:
    """The quantization lab's reference INT4 kernel against dequantize-then-matmul (bench/quantization.py)."""
    return _bench_script("quantization").gpu_check_path(device, quick)


TRITON_PATHS: list[tuple[str, Callable[[str, bool], dict[str, Any]]]] = [
    ("row_softmax (bench/gpu_check.py)", row_softmax),
    ("flash_attention_forward (bench/flash_attention.py)", flash_attention_forward_path),
    ("int4_matmul (bench/quantization.py)", int4_matmul_path),
]


# ---------------------------------------------------------------- the steps

@dataclass(frozen=True)
class Step:
    name: str  # a lab's name, or "triton"
    kind: str  # "calibrate" or "triton"
    cap_s: float  # the most this step may take
    min_s: float  # skipped when less than this is left of the budget


# Caps on the GPU machine: gpu_basics decodes 10 models of 100-250M parameters on the GPU; kv_cache and
# continuous_batching time the tiny model on the host CPU for 10 to 30 interleaved rounds.
GPU_CAPS = {"gpu_basics": (150, 30), "kv_cache": (120, 30), "continuous_batching": (180, 60), "triton": (60, 10)}
DEFAULT_CAP = (120, 30)
DRY_RUN_CAP = (120, 5)


def calibrated_labs() -> tuple[list[str], list[tuple[str, str]]]:
    """The labs to calibrate here, in track order, and the labs left out with the reason."""
    from grader.catalogue import LABS

    chosen, left_out = [], []
    for lab in LABS:
        source = REPO / "grader" / "labs"
        if not ((source / f"{lab.name}.py").is_file() or (source / lab.name / "__init__.py").is_file()):
            continue  # not in this checkout yet
        if not lab.gpu_part:
            left_out.append((lab.name, "no GPU part (grader/catalogue.py): its timed task runs on the CPU, and a "
                                       "GPU host grades it with the cpu profile"))
            continue
        from grader import labs

        if labs.is_package(lab.name) and not labs.load(lab.name).calibrates:
            left_out.append((lab.name, f"nothing to calibrate: its bars are counts, not timings ({lab.gpu_part} "
                                       "is measured by the same counted check on any hardware)"))
            continue
        chosen.append(lab.name)
    return chosen, left_out


def plan(only: list[str] | None, dry_run: bool) -> tuple[list[Step], list[tuple[str, str]]]:
    labs, left_out = calibrated_labs()
    steps = [Step(lab, "calibrate", *(DRY_RUN_CAP if dry_run else GPU_CAPS.get(lab, DEFAULT_CAP))) for lab in labs]
    # gpu_basics is the one lab that measures on the GPU itself: first; Triton right after (short).
    steps.insert(1 if labs and labs[0] == "gpu_basics" else 0,
                 Step("triton", "triton", *(DRY_RUN_CAP if dry_run else GPU_CAPS["triton"])))
    if only:
        unknown = sorted(set(only) - {s.name for s in steps})
        if unknown:
            raise SystemExit(f"--only: no step named {', '.join(unknown)} (steps: {', '.join(s.name for s in steps)})")
        steps = [s for s in steps if s.name in only]
    return steps, left_out


# ---------------------------------------------------------------- one step, in its own process

def run_calibration(lab: str, out: Path, profile: str, dry_run: bool, max_rounds: int | None,
                    machine: dict[str, Any]) -> dict[str, Any]:
    import torch

    from grader import labs
    from grader.calibrate import calibrate

    loaded = labs.load(lab)
    if not loaded.calibrates:
        return {"status": "unavailable", "reason": f"lab {lab} has no calibrate() in grader/labs/{lab}/grading.py"}
    options = {}
    if dry_run:
        accepted = loaded.calibrate_options
        options = {k: v for k, v in DRY_RUN_OPTIONS.items() if k in accepted}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    path = calibrate(lab, out / "thresholds", profile, max_rounds=max_rounds, options=options)
    seconds = time.perf_counter() - started
    used_gpu = cuda and torch.cuda.max_memory_allocated() > 0
    measured_on = ("GPU" if used_gpu else "CPU" if not cuda else
                   "host CPU (the calibration allocated no GPU memory: this lab's timed task runs on the CPU, "
                   "also on a GPU machine)")
    data = json.loads(path.read_text())
    entry = data["profiles"][profile]
    for task in entry.values():
        task["calibration"].update(
            measured_on=measured_on, host_cpu=machine["host_cpu"], torch_threads=torch.get_num_threads(),
            calibrated_by="bench/gpu_check.py" + (" --cpu-dry-run" if dry_run else ""))
        if cuda:
            task["calibration"].update(gpu=machine["gpu"], gpu_short_name=machine["gpu_short_name"],
                                       driver=machine["driver"], cuda=machine["cuda"])
    path.write_text(json.dumps(data, indent=2) + "\n")
    return {"status": "done", "seconds": round(seconds, 1), "measured_on": measured_on,
            "proposal": str(path), "options": options, "max_rounds": max_rounds, "entry": entry}


def run_triton(dry_run: bool) -> dict[str, Any]:
    if triton is None:
        return {"status": "unavailable",
                "reason": "triton is not importable: pip install 'inferlab[triton]' (or inferlab[dev])"}
    device = "cpu" if dry_run else "cuda"
    paths = []
    for name, path in TRITON_PATHS:
        started = time.perf_counter()
        try:
            result = path(device, dry_run)
            ok = result["max_abs_error"] <= result["tolerance"]
            status = "done" if ok else "failed"
            reason = "" if ok else f"max abs error {result['max_abs_error']:.3g} > tolerance {result['tolerance']:.3g}"
        except Exception as err:  # one broken path must not hide the others
            result, status, reason = {}, "failed", f"{type(err).__name__}: {err}"
        paths.append({"name": name, "status": status, "reason": reason, "device": device,
                      "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                      "seconds": round(time.perf_counter() - started, 2), **result})
    failed = [p["name"] for p in paths if p["status"] != "done"]
    return {"status": "failed" if failed else "done", "reason": f"failed: {', '.join(failed)}" if failed else "",
            "triton": triton.__version__, "paths": paths}


def step_main(name: str, out: Path, profile: str, dry_run: bool, max_rounds: int | None) -> int:
    """The child process: run one step and write OUT/steps/<name>.json."""
    machine = json.loads((out / "steps" / "machine.json").read_text())
    if name == "triton":
        result = run_triton(dry_run)
    else:
        result = run_calibration(name, out, profile, dry_run, max_rounds, machine)
    (out / "steps" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------- the driver

def nvidia_smi() -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        res = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (subprocess.TimeoutExpired, OSError):
        return {}
    fields = [f.strip() for f in res.stdout.strip().splitlines()[0].split(",")] if res.stdout.strip() else []
    return dict(zip(("name", "driver", "memory"), fields)) if len(fields) == 3 else {}


def describe_machine(cuda: bool) -> dict[str, Any]:
    import torch

    from grader.doctor import cpu_name
    from grader.perf import hardware_profile

    triton_version = triton.__version__ if triton is not None else None
    info: dict[str, Any] = {
        "gpu": None, "gpu_short_name": hardware_profile(), "driver": None, "cuda": torch.version.cuda,
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "host_cpu": f"{cpu_name()}, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads()}
    if cuda:
        smi = nvidia_smi()
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), driver=smi.get("driver"),
                    gpu_memory=f"{props.total_memory / 2**30:.0f} GiB", gpu_count=torch.cuda.device_count())
    return info


def run_step(step: Step, opts: argparse.Namespace, profile: str, timeout: float) -> dict[str, Any]:
    out = opts.out
    log = out / "logs" / f"{step.name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--out", str(out),
           "--profile", profile]
    if opts.cpu_dry_run:
        cmd.append("--cpu-dry-run")
    if opts.max_rounds is not None:
        cmd += ["--max-rounds", str(opts.max_rounds)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # compiled on a GPU, whatever the caller's shell says
    if step.kind == "triton" and opts.cpu_dry_run:
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported: the kernel runs in the CPU interpreter
    result_file = out / "steps" / f"{step.name}.json"
    result_file.unlink(missing_ok=True)
    started = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and anything it started
            proc.wait()
            return {"status": "timed out", "seconds": round(time.monotonic() - started, 1),
                    "reason": f"stopped at its cap of {timeout:.0f} s (log: {log})"}
    seconds = round(time.monotonic() - started, 1)
    if rc != 0 or not result_file.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        return {"status": "failed", "seconds": seconds, "reason": f"exit code {rc} (log: {log})", "log_tail": tail}
    return {**json.loads(result_file.read_text()), "seconds": seconds}


def commit_root(opts: argparse.Namespace) -> Path:
    """Where --commit-thresholds writes: the repository, or OUT/commit-preview in a dry run."""
    return opts.out / "commit-preview" if opts.cpu_dry_run else REPO


def commit_thresholds(lab: str, profile: str, entry: dict[str, Any], root: Path) -> Path:
    """Merge one lab's measured profile into its committed thresholds file (read fresh, other profiles kept)."""
    source = REPO / "grader" / "thresholds" / f"{lab}.json"
    target = root / "grader" / "thresholds" / f"{lab}.json"
    existing = target if target.is_file() else source
    data = json.loads(existing.read_text()) if existing.is_file() else {"lab": lab, "profiles": {}}
    profile_entry = data["profiles"].setdefault(profile, {})
    for task, measured in entry.items():
        profile_entry[task] = measured  # replaces the estimate whole, its "estimate": true included
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


def estimates(directories: list[Path]) -> list[dict[str, str]]:
    """Every threshold of a GPU profile still marked `"estimate": true` (later directories override earlier)."""
    files: dict[str, Path] = {}
    for directory in directories:
        for path in sorted(directory.glob("*.json")):
            files[path.name] = path
    found = []
    for name, path in sorted(files.items()):
        data = json.loads(path.read_text())
        for profile, tasks in data.get("profiles", {}).items():
            for task, entry in tasks.items():
                if entry.get("estimate"):
                    found.append({"lab": data.get("lab", path.stem), "profile": profile, "task": task,
                                  "note": entry.get("calibration", {}).get("note", "")})
    return found


def write_results(results: dict[str, Any], opts: argparse.Namespace) -> None:
    targets = [opts.out]
    if opts.commit_thresholds:
        targets.append(commit_root(opts) / "bench")
    overlay = [REPO / "grader" / "thresholds"]
    overlay.append(commit_root(opts) / "grader" / "thresholds" if opts.commit_thresholds else opts.out / "thresholds")
    results["estimates"] = estimates(overlay)
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{RESULTS}.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / f"{RESULTS}.md").write_text(markdown(results))


# ---------------------------------------------------------------- the report

def _numbers(calibration: dict[str, Any]) -> str:
    """The measured numbers of a calibration entry, short: scalars and lists of up to 3 numbers."""
    skip = {"rounds_capped_at", "torch_threads", "threads", "cpu_threads"}
    parts = []
    for key, value in calibration.items():
        if key in skip or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value}")
        elif (isinstance(value, list) and 0 < len(value) <= 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            parts.append(f"{key} {'-'.join(str(v) for v in value)}")
    return "; ".join(parts)


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    dry = results["mode"] == "cpu-dry-run"
    title = "# GPU check (`make gpu-check`)" + (": CPU dry run" if dry else "")
    if dry:
        status = ("**CPU dry run: not a GPU measurement.** The same code paths as on a GPU, on this CPU, with one "
                  f"round per measurement, under the profile `{results['profile']}`: nothing here is a threshold "
                  "to commit.")
    elif results["state"] == "running":
        status = f"**In progress** (or cut short): {results['state_detail']}."
    else:
        status = f"**{results['state_detail']}**"
    lines = [title, "", status, "",
             "| | |", "| --- | --- |",
             f"| GPU | {m.get('gpu') or 'none'}" + (f", {m['gpu_memory']}" if m.get("gpu_memory") else "")
             + f" (short name `{m['gpu_short_name']}`; thresholds written to the `{results['profile']}` profile) |",
             f"| driver / CUDA | {m.get('driver') or '-'} / {m.get('cuda') or '-'} |",
             f"| torch / Triton / Python | {m['torch']} / {m.get('triton') or 'not installed'} / {m['python']} |",
             f"| host CPU | {m['host_cpu']}, torch threads {m['torch_threads']} |",
             f"| date | {results['date']} |",
             f"| budget | {results['budget_s']:.0f} s; used {results['elapsed_s']:.0f} s |", ""]

    lines += [f"## Calibrated thresholds (profile `{results['profile']}`)", "",
              "| lab | task | status | measured on | measured | proposed bar | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for step in results["steps"]:
        if step["kind"] != "calibrate":
            continue
        entry = step.get("entry") or {}
        measured_on = (step.get("measured_on") or "").split(" (")[0]
        if not entry:
            lines.append(f"| {step['name']} | - | {step['status']} | {measured_on or '-'} | "
                         f"{step.get('reason', '') or '-'} | - | {step.get('seconds', '-')} |")
        for task, bar in entry.items():
            bars = ", ".join(f"{k} {v}" for k, v in bar.items() if k not in ("calibration", "estimate"))
            lines.append(f"| {step['name']} | {task} | {step['status']} | {measured_on} | "
                         f"{_numbers(bar.get('calibration', {}))} | {bars} | {step.get('seconds', '-')} |")
    lines.append("")

    triton_steps = [s for s in results["steps"] if s["kind"] == "triton"]
    if triton_steps:
        lines += ["## Triton paths", "", "| path | status | device | shape | max abs error (tolerance) | Triton ms | "
                  "torch ms | first call s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for step in triton_steps:
            if not step.get("paths"):
                lines.append(f"| - | {step['status']} | - | - | {step.get('reason') or '-'} | - | - | - |")
            for p in step.get("paths", []):
                device = p["device"] + (" (TRITON_INTERPRET=1)" if p.get("interpreter") else "")
                error = (f"{p['max_abs_error']:.2g} ({p['tolerance']:.0g})" if "max_abs_error" in p
                         else p.get("reason", "-"))
                shape = "x".join(str(d) for d in p.get("shape", [])) or "-"
                lines.append(f"| {p['name']} | {p['status']} | {device} | {shape} | {error} | "
                             f"{p.get('triton_ms', '-')} | {p.get('torch_ms', '-')} | {p.get('first_call_s', '-')} |")
        lines.append("")

    skipped = [(s["name"], f"{s['status']}: {s.get('reason', '')}") for s in results["steps"]
               if s["status"] not in ("done", "pending")]
    skipped += [(name, f"left out: {why}") for name, why in results["left_out"]]
    lines += ["## Skipped, failed or left out, and why", ""]
    lines += [f"* {name}: {why}" for name, why in skipped] or ["* nothing"]
    lines.append("")
    lines += ["## GPU thresholds still marked as estimates", ""]
    lines += [f"* {e['lab']} {e['task']} (`{e['profile']}`): {_short(e['note'])}" for e in results["estimates"]]
    lines = lines if results["estimates"] else lines + ["* none"]
    lines += ["", "Written by `bench/gpu_check.py` (see docs/gpu-check.md); the full numbers and every calibration "
              f"note are in {RESULTS}.json and the proposals in the output folder's thresholds/.", ""]
    return "\n".join(lines)


def placeholder_markdown() -> str:
    """bench/results-gpu.md before the script has run on a GPU."""
    directory = REPO / "grader" / "thresholds"
    cpu_only = [lab for lab in calibrated_labs()[0] if (directory / f"{lab}.json").is_file()
                and set(json.loads((directory / f"{lab}.json").read_text())["profiles"]) <= {"cpu"}]
    lines = ["# GPU check (`make gpu-check`)", "",
             "**Not yet run on a GPU: every GPU threshold is an estimate.**", "",
             "No GPU was available where this repository was developed and tested. Every GPU profile in "
             "`grader/thresholds/` is a guess from first principles, marked `\"estimate\": true`, until "
             "`make gpu-check` (docs/gpu-check.md) measures it on a GPU, commits the measured profiles and "
             "replaces this page with the numbers."]
    if cpu_only:
        lines.append("")
        lines.append(f"Labs with a GPU part but no GPU profile yet ({', '.join(cpu_only)}) are graded with their "
                     "cpu profile on a GPU machine.")
    lines += ["", "## GPU thresholds marked as estimates", ""]
    lines += [f"* {e['lab']} {e['task']} (`{e['profile']}`): {_short(e['note'])}"
              for e in estimates([directory])] or ["* none"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

NO_GPU_MESSAGE = """no CUDA GPU visible: make gpu-check needs one; it calibrates the cuda profile of {labs}
and compiles the Triton paths on the GPU. Run it on a GPU machine:
  make gpu-check                       (installs .venv first; needs the network)
  PYTHONPATH=labs:. python3 bench/gpu_check.py --commit-thresholds --out gpu-check-output
                                       (with the machine's own CUDA torch; see docs/gpu-check.md)
To check the script itself on this machine: python bench/gpu_check.py --cpu-dry-run --out /tmp/gpu-check"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-output"),
                        help="folder for the proposals (thresholds/), logs/ and results-gpu.{md,json}")
    parser.add_argument("--commit-thresholds", action="store_true",
                        help="merge each measured profile into grader/thresholds/<lab>.json and write "
                             "bench/results-gpu.{md,json} (in a dry run: under OUT/commit-preview/)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPU needed: the same steps on the CPU with tiny budgets, profile cpu-dry-run")
    parser.add_argument("--budget-s", type=float, default=480.0, help="global time budget in seconds")
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                        help="comma-separated steps to run (lab names, triton); default: all")
    parser.add_argument("--max-rounds", type=int, default=None,
                        help=f"cap every timing comparison at this many rounds (dry run: {DRY_RUN_MAX_ROUNDS}); "
                             "a capped bar records rounds_capped_at")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    opts = parse(argv)
    opts.out = opts.out.resolve()
    if opts.step:
        return step_main(opts.step, opts.out, opts.profile, opts.cpu_dry_run, opts.max_rounds)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not opts.cpu_dry_run:
        labs = ", ".join(calibrated_labs()[0]) or "every lab with a GPU part"
        print(NO_GPU_MESSAGE.format(labs=labs), file=sys.stderr)
        return NO_GPU_EXIT
    if opts.cpu_dry_run and opts.max_rounds is None:
        opts.max_rounds = DRY_RUN_MAX_ROUNDS
    profile = DRY_RUN_PROFILE if opts.cpu_dry_run else "cuda"
    steps, left_out = plan(opts.only, opts.cpu_dry_run)
    for folder in ("steps", "logs", "thresholds"):
        (opts.out / folder).mkdir(parents=True, exist_ok=True)
    machine = describe_machine(cuda)
    (opts.out / "steps" / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    results: dict[str, Any] = {
        "mode": "cpu-dry-run" if opts.cpu_dry_run else "gpu", "profile": profile, "state": "running",
        "state_detail": "", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": opts.budget_s, "elapsed_s": 0.0, "machine": machine, "left_out": left_out,
        "committed": opts.commit_thresholds,
        "steps": [{"name": s.name, "kind": s.kind, "status": "pending", "cap_s": s.cap_s} for s in steps]}
    where = f"{machine['gpu']} (profile cuda, short name {machine['gpu_short_name']})" if cuda else "the CPU (dry run)"
    print(f"gpu-check on {where}: {len(steps)} steps, budget {opts.budget_s:.0f} s, output {opts.out}", flush=True)

    for i, step in enumerate(steps):
        record = results["steps"][i]
        left = opts.budget_s - (time.monotonic() - started)
        if left < step.min_s:
            record.update(status="skipped", reason=f"would exceed the budget: needs at least {step.min_s:.0f} s, "
                                                   f"{max(left, 0):.0f} s left of {opts.budget_s:.0f} s")
        else:
            timeout = min(step.cap_s, left)
            record["status"] = "running"
            results.update(elapsed_s=time.monotonic() - started,
                           state_detail=f"step {i + 1} of {len(steps)} ({step.name}) running")
            write_results(results, opts)
            print(f"[{i + 1}/{len(steps)}] {step.name}: up to {timeout:.0f} s ...", flush=True)
            record.update(run_step(step, opts, profile, timeout))
            if record["status"] == "done" and step.kind == "calibrate" and opts.commit_thresholds:
                try:
                    record["committed_to"] = str(commit_thresholds(step.name, profile, record["entry"],
                                                                   commit_root(opts)))
                except (OSError, ValueError, KeyError) as err:
                    record.update(status="failed", reason=f"measured, but not committed: {type(err).__name__}: {err} "
                                                          f"(the proposal is in {record['proposal']})")
        print(f"[{i + 1}/{len(steps)}] {step.name}: {record['status']}"
              + (f" in {record['seconds']} s" if "seconds" in record else "")
              + (f": {record['reason']}" if record.get("reason") else ""), flush=True)
        for line in record.get("log_tail", []):
            print(f"    {line}", flush=True)
        results["elapsed_s"] = time.monotonic() - started
        write_results(results, opts)

    bad = [s["name"] for s in results["steps"] if s["status"] in ("failed", "timed out", "skipped")
           or (s["status"] == "unavailable" and not opts.cpu_dry_run)]
    done = sum(s["status"] == "done" for s in results["steps"])
    results.update(state="finished", elapsed_s=time.monotonic() - started,
                   state_detail=(f"Run on {machine['gpu'] or 'the CPU'}: {done} of {len(steps)} steps done"
                                 + (f"; not done: {', '.join(bad)}" if bad else "")))
    write_results(results, opts)
    written = [str(opts.out / f"{RESULTS}.md")]
    if opts.commit_thresholds:
        written.append(str(commit_root(opts) / "bench" / f"{RESULTS}.md"))
    print(f"{results['state_detail']} in {results['elapsed_s']:.0f} s; wrote {' and '.join(written)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
