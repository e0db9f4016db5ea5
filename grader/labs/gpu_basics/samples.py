"""grader.labs.gpu_basics.samples: sample submissions of the gpu_basics lab: each a known kind of learner work, with the
grade a careful human grader would give. `grader.samples.build("gpu_basics", out)` writes them as notebooks.

Each variant edits answer cells (by nbgrader grade_id) of a fully solved notebook; `from_release`
variants start from the learner release instead. Later tasks call earlier answers (GB2 counts
weights with `parameter_count`, GB3 predicts from `weights_read_per_forward`, GB4 with GB3's
prediction and GB1's `memory_needed`), so a mistake flows into every number computed from it: the
expected points say so, and the later tasks' messages name the earlier function to fix.

The grades did not change when the lab moved onto the platform (G1-G4 became GB1-GB4): the checks
judge the same functions on the same kinds of inputs, now from the grader's own process, and GB3's
stopwatch is now also judged against the grader's own measurement of the same model, which every
honest sample here agrees with.
"""

GB3_STUB = '''
def predict_decode_tokens_per_s(args, dtype, bandwidth_gb_s, batch_size=1):
    raise NotImplementedError("Task GB3 is not implemented yet: replace this line with your code")


def measure_decode_tokens_per_s(model, steps=10):
    raise NotImplementedError("Task GB3 is not implemented yet: replace this line with your code")
'''

GB4_STUB = '''
def predict_on_hardware(args, dtype, hardware, context_len):
    raise NotImplementedError("Task GB4 is not implemented yet: replace this line with your code")
'''

# Times the whole loop, first call included, and divides: the cold first step and any hiccup count in full.
NO_WARMUP_MEASURE = '''
import time


@torch.inference_mode()
def measure_decode_tokens_per_s(model, steps: int = 10) -> float:
    token = torch.zeros(1, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(steps):
        model(token, torch.tensor([0]))
    return steps / (time.perf_counter() - start)
'''

SAMPLES = {
    "reference": {"cells": {}, "expected": {"GB1": 3, "GB2": 2, "GB3": 3, "GB4": 2}, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"GB1": 0, "GB2": 0, "GB3": 0, "GB4": 0}, "flags": False},
    "partial": {
        # GB1 and GB2 done; the roofline tasks not started.
        "cells": {"gb3-solution": GB3_STUB, "gb4-solution": GB4_STUB},
        "expected": {"GB1": 3, "GB2": 2, "GB3": 0, "GB4": 0}, "flags": False},
    "wrong": {
        # K and V projections counted with n_heads (as without grouped-query attention). Every later number
        # is computed from parameter_count, so GB2, GB3 and GB4 are wrong too; their messages point back
        # (GB2 at parameter_count, GB3 at weights_read_per_forward, GB4 at the GB3 prediction).
        "replace": {"gb1-solution": ("kv_out = args.n_kv_heads * args.head_dim",
                                     "kv_out = args.n_heads * args.head_dim")},
        "cells": {}, "expected": {"GB1": 0, "GB2": 0, "GB3": 0, "GB4": 0}, "flags": False},
    "wrong-bf16": {
        # Four bytes per weight whatever the dtype: bf16 weights look twice their size, so GB4 says a model
        # that fits does not. GB2 and GB3 use bytes_per_element themselves and stay right.
        "replace": {"gb1-solution": ("return parameter_count(args) * bytes_per_element(dtype)",
                                     "return parameter_count(args) * 4")},
        "cells": {}, "expected": {"GB1": 0, "GB2": 2, "GB3": 3, "GB4": 0}, "flags": False},
    "wrong-flops": {
        # One FLOP per weight per token: the multiply-add counted as one operation.
        "replace": {"gb2-solution": ("return 2 * weights_read_per_forward(args) * batch_size * n_tokens",
                                     "return weights_read_per_forward(args) * batch_size * n_tokens")},
        "cells": {}, "expected": {"GB1": 3, "GB2": 0, "GB3": 3, "GB4": 2}, "flags": False},
    "prediction-off": {
        # The roofline divides by the number of weights, not their bytes: 4x too fast in fp32, 2x in bf16.
        "replace": {"gb3-solution": ("return batch_size * bandwidth_gb_s * 1e9 / bytes_per_step",
                                     "return batch_size * bandwidth_gb_s * 1e9 / weights_read_per_forward(args)")},
        "cells": {}, "expected": {"GB1": 3, "GB2": 2, "GB3": 0, "GB4": 0}, "flags": False},
    "no-warmup": {
        # A stopwatch around the whole loop, no warm-up: the measurement, not the prediction, is off. The
        # stand-in (a first call six steps long, hiccups) catches it; GB4 does not use the stopwatch.
        "cells": {"gb3-solution": NO_WARMUP_MEASURE}, "keep_solution": True,
        "expected": {"GB1": 3, "GB2": 2, "GB3": 0, "GB4": 2}, "flags": False},
}
