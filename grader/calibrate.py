"""grader.calibrate: measure a lab's reference and baseline on this machine and write a thresholds profile.

The result is a proposal: `inferlab calibrate LAB --out DIR` writes `DIR/<lab>.json`
holding every profile already committed in `grader/thresholds/<lab>.json` plus this
machine's profile, newly measured. Review it, then copy it over the committed file.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
from pathlib import Path

from .perf import THRESHOLDS_DIR, hardware_profile


def calibrate(lab: str, out_dir: Path, profile: str | None = None) -> Path:
    try:
        module = importlib.import_module(f"grader.labs.{lab}")
    except ModuleNotFoundError:
        raise ValueError(f"lab {lab!r} has no checks module grader/labs/{lab}.py") from None
    if not hasattr(module, "calibrate"):
        raise ValueError(f"lab {lab!r} has no performance checks to calibrate")
    import torch

    from .doctor import cpu_name

    profile = profile or hardware_profile()
    entry = module.calibrate()
    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
               f"{cpu_name()}, {os.cpu_count()} cores")
    for task in entry.values():
        task["calibration"].update(machine=machine, torch=torch.__version__, python=platform.python_version(),
                                   date=dt.date.today().isoformat())
    committed = THRESHOLDS_DIR / f"{lab}.json"
    data = json.loads(committed.read_text()) if committed.is_file() else {"lab": lab, "profiles": {}}
    data["profiles"][profile] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{lab}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
