"""grader.calibrate: measure a lab's reference and baseline on this machine and write a thresholds profile.

The result is a proposal: `inferlab calibrate LAB --out DIR` writes `DIR/<lab>.json`
holding every profile already committed in `grader/thresholds/<lab>.json` plus this
machine's profile, newly measured. Review it, then copy it over the committed file.
`max_rounds` caps the interleaved rounds of every timing comparison (a quick dry run, not a bar
to commit: the entry then records `rounds_capped_at`); `options` go to the lab's own `calibrate()`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .perf import THRESHOLDS_DIR, hardware_profile


@contextmanager
def _rounds_capped(max_rounds: int | None):
    """While active, `inferlab.bench.compare` (which the labs' calibrate() import when called) runs at most
    `max_rounds` rounds, after at most `max_rounds - 1` warm-up rounds."""
    import inferlab.bench

    original = inferlab.bench.compare
    if max_rounds is not None:
        def capped(*args: Any, **kwargs: Any):
            kwargs.update(warmup=min(kwargs.get("warmup", 2), max_rounds - 1), max_rounds=max_rounds,
                          min_rounds=min(kwargs.get("min_rounds", 5), max_rounds))
            return original(*args, **kwargs)
        inferlab.bench.compare = capped
    try:
        yield
    finally:
        inferlab.bench.compare = original


def calibrate(lab: str, out_dir: Path, profile: str | None = None, *, max_rounds: int | None = None,
              options: dict[str, Any] | None = None) -> Path:
    from . import labs

    try:
        loaded = labs.load(lab)
    except labs.LabSpecError as err:
        raise ValueError(str(err)) from None
    if not loaded.calibrates:
        raise ValueError(f"lab {lab!r} has no performance checks to calibrate")
    import torch

    from .doctor import cpu_name

    profile = profile or hardware_profile()
    with _rounds_capped(max_rounds):
        entry = loaded.calibrate(**(options or {}))
    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
               f"{cpu_name()}, {os.cpu_count()} cores")
    for task in entry.values():
        task["calibration"].update(machine=machine, torch=torch.__version__, python=platform.python_version(),
                                   date=dt.date.today().isoformat())
        if max_rounds is not None:
            task["calibration"]["rounds_capped_at"] = max_rounds
    committed = THRESHOLDS_DIR / f"{lab}.json"
    data = json.loads(committed.read_text()) if committed.is_file() else {"lab": lab, "profiles": {}}
    data["profiles"][profile] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{lab}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
