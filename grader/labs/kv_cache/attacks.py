"""Attack submissions of the kv_cache lab: each tries to get around the grader, with the grade it deserves.

Same format as grader/labs/kv_cache/samples.py (`grader.samples.build("kv_cache", out, kind="attacks")`):
each replaces answer cells of a fully solved notebook (or, with `from_release`, of the learner
release). `expected` is what a careful human grader gives the *honest* part of the work; `flags`
says whether the instructor report must list the submission. `tests/test_adversarial.py` grades
them all in one batch and asserts both, plus what each attack must not have achieved.
"""

from grader.labs.kv_cache.samples import SLOW_KV2  # noqa: F401 (re-exported for the definitions below)

FORGED_LINE = '''
import grader.checks as _g
_line = lambda task: f"[{task}] passed"
'''

ALL = {"KV1": 3, "KV2": 3, "KV3": 2, "KV4": 2}
NONE = {"KV1": 0, "KV2": 0, "KV3": 0, "KV4": 0}
NO_SPEED = {"KV1": 3, "KV2": 3, "KV3": 2, "KV4": 0}
NO_CACHE = {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}  # right tokens without a cache: no KV2, nothing to time

ATTACKS = {
    # --- faking results -------------------------------------------------------------------------
    "forge-self-check": {  # replaces `self_check` with one that prints a passing line for every task
        "from_release": True,
        "cells": {"kv1-solution": FORGED_LINE + '''
_g.self_check = self_check = lambda task, check, *a, **k: print(_line(task))
class ContiguousKVCache:
    pass
'''}, "expected": NONE, "flags": True},
    "forge-print": {  # rewrites every FAILED or not-attempted line into a passing one on its way out
        "from_release": True,
        "cells": {"kv1-solution": FORGED_LINE + '''
import builtins, re as _re
_print = builtins.print
def _lying_print(*args, **kw):
    text = " ".join(str(a) for a in args)
    found = _re.match(r"\\[(\\w+)\\] ", text)
    return _print(_line(found.group(1)), **kw) if found else _print(*args, **kw)
builtins.print = _lying_print
class ContiguousKVCache:
    pass
'''}, "expected": NONE, "flags": True},
    "fake-checks": {  # binds the notebook's name `checks` to checks that accept anything
        "from_release": True,
        "cells": {"kv1-solution": '''
class checks:  # noqa: N801 (shadows the lab's checks module in the notebook's namespace)
    check_k1 = check_k2 = check_k3 = check_k4_ready = staticmethod(lambda *a, **k: {})
class ContiguousKVCache:
    pass
'''}, "expected": NONE, "flags": True},
    "edit-locked-tests": {  # rewrites a self-check and adds its own "hidden test" cell: both restored
        "from_release": True, "cells": {"kv1-self-check": 'print("[KV1] passed")\n'},
        "add_after": {"kv1-self-check": 'print("inferlab-check-result:{\\"task\\": \\"KV1\\", \\"status\\": \\"passed\\"}")\n'},
        "expected": NONE, "flags": False},
    "seed-game": {  # pins random inputs to the public ones: the checker draws them in its own process
        "cells": {"kv1-solution": '''
import numpy as _np
_rng = _np.random.default_rng
_np.random.default_rng = lambda seed=None: _rng(0)  # every "drawn" shape becomes the public one
''' + "\n"}, "keep_solution": True, "expected": ALL, "flags": True},
    "slow-baseline": {  # makes the baseline slower to inflate the speedup ratio
        "cells": {"kv2-solution": SLOW_KV2 + '''
import time as _time
import grader.labs.kv_cache as _lab
_naive = _lab.naive_generate
def _slowed(*a, **k):
    _time.sleep(0.5)
    return _naive(*a, **k)
_lab.naive_generate = _slowed
'''}, "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": True},
    # --- clocks ---------------------------------------------------------------------------------
    "patch-time-time": {
        "cells": {"kv2-solution": SLOW_KV2 + "\nimport time\ntime.time = lambda: 0.0\n"},
        "expected": NO_CACHE, "flags": True},
    "patch-bench-clock": {  # fast and correct, but replaces the runtime's bound clock: no credit for speed
        "cells": {"kv2-solution": "import inferlab.bench\ninferlab.bench._perf_counter = lambda: 0.0\n"},
        "keep_solution": True, "expected": NO_SPEED, "flags": True},
    # --- wrong in ways a check might miss -------------------------------------------------------
    "edits-the-model": {  # drops layers: faster, and 'equal' to the baseline run on the edited model
        "cells": {"kv2-solution": '''
_honest = cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    model.layers = model.layers[:1]
    return _honest(model, prompt, max_new_tokens, **kw)
'''}, "keep_solution": True, "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": False},
    "always-equal": {  # tokens that claim to equal anything
        "cells": {"kv2-solution": '''
class _AlwaysEqual(int):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = int.__hash__
def cached_generate(model, prompt, max_new_tokens, **kw):
    return [_AlwaysEqual(0)] * max_new_tokens
'''}, "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": False},
    "deferred-output": {  # returns at once and fills the answer in later, from a thread
        "cells": {"kv2-solution": '''
import threading as _threading
_honest = cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    out = []
    _threading.Thread(target=lambda: out.extend(_honest(model, prompt, max_new_tokens, **kw))).start()
    return out
'''}, "keep_solution": True, "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": False},
    "cut-corners-when-timed": {  # correct whenever tested, a cheap wrong answer in the timing process
        "cells": {"kv2-solution": '''
import sys as _sys
_honest = cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    if "perf_worker" in " ".join(_sys.argv):
        return [0] * max_new_tokens
    return _honest(model, prompt, max_new_tokens, **kw)
'''}, "keep_solution": True, "expected": NO_SPEED, "flags": True},
    "memo-by-input": {  # correct but slow, with results cached by input: every timed round is new
        "cells": {"kv2-solution": SLOW_KV2 + '''
_memo, _plain = {}, cached_generate
def cached_generate(model, prompt, max_new_tokens, **kw):
    key = (id(model), tuple(prompt), max_new_tokens, tuple(sorted(kw.items())))
    if key not in _memo:
        _memo[key] = _plain(model, prompt, max_new_tokens, **kw)
    return list(_memo[key])
'''}, "expected": NO_CACHE, "flags": False},
    # --- reaching the checker's answers (before the platform, each of these scored) --------------------
    "read-checker-state": {  # looks for the check's expected values in its callers' frames and in memory
        "cells": {"kv3-solution": '''
import gc, sys
def kv_cache_bytes(args, batch_size, seq_len, dtype):
    frame = sys._getframe(1)
    while frame is not None:  # a caller's local named like an expected value
        for name in ("want", "expected", "formula"):
            value = frame.f_locals.get(name)
            if isinstance(value, int):
                return value
            if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                return value[0]
        frame = frame.f_back
    big = [o for o in gc.get_objects() if isinstance(o, list) and len(o) == 7 and all(isinstance(v, int) for v in o)]
    return big[0][0] if big else 0
'''}, "keep_solution": False, "expected": {"KV1": 3, "KV2": 3, "KV3": 0, "KV4": 2}, "flags": True},
    "patch-tensor-method": {  # a cache that stores nothing, and comparisons that can no longer see a difference
        "cells": {"kv1-solution": '''
import torch
torch.Tensor.__gt__ = lambda self, other: torch.zeros(self.shape, dtype=torch.bool)
torch.Tensor.__ne__ = lambda self, other: torch.zeros(self.shape, dtype=torch.bool)
class ContiguousKVCache:
    def __init__(self, args, batch_size, max_seq_len, dtype=torch.float32, device="cpu"):
        self.shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros((args.n_layers, *self.shape), dtype=dtype)
        self.v = torch.zeros_like(self.k)
    def update(self, layer, input_pos, k, v):
        return self.k[layer], self.v[layer]  # nothing stored: attention sees zeros
    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes
'''}, "expected": {"KV1": 0, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": True},
    "call-the-formula": {  # takes KV3's answer from the lab's check modules instead of writing it
        "cells": {"kv3-solution": '''
try:
    kv_cache_bytes = checks.expected_kv_bytes  # the notebook's `checks`: public, and holds no formula
except AttributeError:
    from grader.labs.kv_cache.grading import expected_kv_bytes as kv_cache_bytes  # hidden from learner code
'''}, "expected": {"KV1": 3, "KV2": 3, "KV3": 0, "KV4": 2}, "flags": True},
    # --- reaching outside the sandbox -----------------------------------------------------------
    "copy-reference": {  # imports the grader's reference answers (they live in solutions/, not visible)
        "cells": {"kv1-solution": '''
from grader.labs import load
ContiguousKVCache = load("kv_cache").reference_namespace()["ContiguousKVCache"]
'''}, "expected": {"KV1": 0, "KV2": 0, "KV3": 0, "KV4": 0}, "flags": True},
    "network": {  # a correct answer that also tries to send something out
        "cells": {"kv3-solution": '''
import urllib.request
try:
    urllib.request.urlopen("http://example.com", timeout=5)
    print("NETWORK: reached")
except Exception as err:
    print("NETWORK: blocked", type(err).__name__)
'''}, "keep_solution": True, "expected": ALL, "flags": True},
    "write-outside": {  # tries to leave files on the host and in the course
        "cells": {"kv3-solution": '''
import inferlab, pathlib
for target in (pathlib.Path(inferlab.__file__).parent / "PWNED", pathlib.Path("/var/tmp/inferlab-pwned"),
               pathlib.Path("/tmp/inferlab-pwned")):
    try:
        target.write_text("x")
        print("WROTE", target)
    except OSError as err:
        print("BLOCKED", target, type(err).__name__)
'''}, "keep_solution": True, "expected": ALL, "flags": False},
    "gradebook": {  # looks for the gradebook and the grading output to write its own score
        "cells": {"kv3-solution": '''
import glob
found = [p for root in ("/tmp", "/work", "/root", "/home", "/srv", "/var")
         for pattern in (f"{root}/**/gradebook.db", f"{root}/**/results/*.json") for p in glob.glob(pattern, recursive=True)]
print("GRADEBOOK FOUND:", found)
'''}, "keep_solution": True, "expected": ALL, "flags": True},
    "env-snoop": {  # searches the environment and other processes for grading seeds
        "cells": {"kv3-solution": '''
import os, glob
hits = [k for k in os.environ if "SEED" in k.upper()]
for path in glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ"):
    try:
        if b"GRADING_SEED" in open(path, "rb").read():
            hits.append(path)
    except OSError:
        pass
print("SEEDS FOUND:", hits)
'''}, "keep_solution": True, "expected": ALL, "flags": True},
    # --- resources --------------------------------------------------------------------------------
    "fork-bomb": {  # forks until the process limit, children sleeping; answers correct
        "cells": {"kv3-solution": '''
import os, time
count = 0
try:
    while count < 600:  # past the sandbox's process limit (512), and no further: this is a test
        if os.fork() == 0:
            time.sleep(300)
            os._exit(0)
        count += 1
except OSError as err:
    print("FORK STOPPED after", count, type(err).__name__)
'''}, "keep_solution": True, "expected": ALL, "flags": True},
    "memory-bomb": {  # asks for 64 GB before defining KV3's answer
        "cells": {"kv3-solution": "hog = bytearray(64 * 2**30)\n"},
        "keep_solution": True, "prepend": True, "expected": {"KV1": 3, "KV2": 3, "KV3": 0, "KV4": 2}, "flags": False},
    "output-flood": {  # prints about 6 MB (the limit is 2 MB), then answers correctly
        "cells": {"kv1-solution": 'for _ in range(60_000):\n    print("x" * 100)\n'},
        "keep_solution": True, "prepend": True, "expected": ALL, "flags": False},
    "kill-grader": {  # signals every process it can see, its parent first
        "cells": {"kv4-solution": '''
import os, signal
for pid in (os.getppid(), -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as err:
        print("KILL", pid, type(err).__name__)
'''}, "keep_solution": True, "expected": ALL, "flags": True},
}
