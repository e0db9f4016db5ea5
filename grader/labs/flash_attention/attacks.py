"""grader.labs.flash_attention.attacks: attack submissions of the flash_attention lab: each tries to get around the
grader, with the grade it deserves.

Same format as the samples (`grader.samples.build("flash_attention", out, kind="attacks")`): each replaces
answer cells of a fully solved notebook (`keep_solution`: appends to the solved cell instead). `expected` is
what a careful human grader gives the *honest* part of the work; `flags` says whether the instructor report
must list the submission. tests/test_flash_attention.py grades them through the check stage.
"""

from __future__ import annotations

from .samples import MATERIALISES_FA1

ATTACKS = {
    # Materialises the N x N scores, then blinds the tensor meter that runs in its own process (the probe's
    # measure_peak now measures nothing). The meter reports almost no memory; the resident memory the checker
    # reads from outside shows the 64 MiB matrix, and the replaced probe attribute is reported as tampering.
    "forged-meter": {
        "cells": {"fa1-solution": MATERIALISES_FA1 + '''

import grader.labs.flash_attention.probes as _probes

_measure = _probes.measure_peak


def _blind(fn, *args):
    _, quiet = _measure(lambda: None)  # a meter that saw nothing
    return fn(*args), quiet


_probes.measure_peak = _blind
'''},
        "expected": {"FA1": 0, "FA2": 4, "FA3": 2, "FA4": 1}, "flags": True},
}

