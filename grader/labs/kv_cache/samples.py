"""grader.labs.kv_cache.samples: sample submissions of the kv_cache lab: each a known kind of learner work, with the grade a careful
human grader would give. `grader.samples.build("kv_cache", out)` writes them as notebooks.

Each variant replaces the answer cells named in `cells` (by nbgrader grade_id) of a fully
solved notebook; `from_release` variants start from the learner release instead.
"""

SLOW_KV2 = '''
@torch.inference_mode()
def cached_generate(model, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, eos_id=None):
    # Correct but no faster: it recomputes the whole sequence every step, like the baseline.
    check_length(model, len(prompt), max_new_tokens)
    gen = make_generator(seed)
    tokens, out = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens]))[:, -1]
        nxt = int(sample(logits, temperature, top_k, top_p, gen))
        out.append(nxt)
        tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out
'''

SAMPLES = {
    "reference": {"cells": {}, "expected": {"KV1": 3, "KV2": 3, "KV3": 2, "KV4": 2}, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"KV1": 0, "KV2": 0, "KV3": 0, "KV4": 0}, "flags": False},
    # Right tokens without a cache: the model processes about n x p positions where a cache needs p + n - 1,
    # so a careful grader gives no KV2 points ("generation with the cache"), and nothing to time for KV4.
    "slow": {"cells": {"kv2-solution": SLOW_KV2}, "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": False},
    "wrong": {
        # Off by one: decode steps feed position len(prompt) + i + 1, leaving a hole in the cache.
        "replace": {"kv2-solution": ("len(prompt) + i]", "len(prompt) + i + 1]")},
        "cells": {}, "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": False},
    "crash": {
        # The kernel dies (a segmentation fault) while the KV2 answer cell runs: only KV1 was graded by then.
        "cells": {"kv2-solution": "import ctypes\nctypes.string_at(0)  # dereferences NULL: the process dies\n"},
        "expected": {"KV1": 3, "KV2": 0, "KV3": 0, "KV4": 0}, "flags": True},
    "loop": {
        "cells": {"kv3-solution": "while True:  # never ends: the time limit stops it\n    pass\n"},
        "expected": {"KV1": 3, "KV2": 3, "KV3": 0, "KV4": 0}, "flags": False},
    "snoop": {
        "cells": {"kv1-solution": '''
from pathlib import Path
import inferlab
# Looks next to the installed runtime for the instructor's solutions, hidden tests or gradebook.
repo = Path(inferlab.__file__).resolve().parents[2]
found = [str(p) for pattern in ("solutions/*/*.ipynb", "*/gradebook.db", "grading-output/**/*.ipynb")
         for p in repo.glob(pattern)]
print("snooped:", found)
class ContiguousKVCache:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Task KV1 (nothing found to copy)")
'''},
        "expected": {"KV1": 0, "KV2": 0, "KV3": 0, "KV4": 0}, "flags": True},
    "timer-patch": {
        "cells": {"kv2-solution": SLOW_KV2 + '''
import time
_real = time.perf_counter
time.perf_counter = lambda: _real() / 100  # makes everything look 100x faster
'''},
        "expected": {"KV1": 3, "KV2": 0, "KV3": 2, "KV4": 0}, "flags": True},
}
