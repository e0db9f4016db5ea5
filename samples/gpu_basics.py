"""Sample submissions of the gpu_basics lab: each a known kind of learner work, with the grade a careful
human grader would give. `grader.samples.build("gpu_basics", out)` writes them as notebooks.

Each variant edits answer cells (by nbgrader grade_id) of a fully solved notebook; `from_release`
variants start from the learner release instead. Later tasks call earlier answers (G2 counts
weights with `parameter_count`, G4 predicts with G3's function), so a mistake flows into every
number computed from it; the expected points say so.
"""

G3_STUB = '''
def predict_decode_tokens_per_s(args, dtype, bandwidth_gb_s, batch_size=1):
    raise NotImplementedError("Task G3 is not implemented yet: replace this line with your code")


def measure_decode_tokens_per_s(model, steps=10):
    raise NotImplementedError("Task G3 is not implemented yet: replace this line with your code")
'''

G4_STUB = '''
def predict_on_hardware(args, dtype, hardware, context_len):
    raise NotImplementedError("Task G4 is not implemented yet: replace this line with your code")
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
    "reference": {"cells": {}, "expected": {"G1": 3, "G2": 2, "G3": 3, "G4": 2}, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"G1": 0, "G2": 0, "G3": 0, "G4": 0}, "flags": False},
    "partial": {
        # G1 and G2 done; the roofline tasks not started.
        "cells": {"g3-solution": G3_STUB, "g4-solution": G4_STUB},
        "expected": {"G1": 3, "G2": 2, "G3": 0, "G4": 0}, "flags": False},
    "wrong": {
        # K and V projections counted with n_heads (as without grouped-query attention). Every later number
        # is computed from parameter_count, so G2, G3 and G4 are wrong too.
        "replace": {"g1-solution": ("kv_out = args.n_kv_heads * args.head_dim",
                                    "kv_out = args.n_heads * args.head_dim")},
        "cells": {}, "expected": {"G1": 0, "G2": 0, "G3": 0, "G4": 0}, "flags": False},
    "wrong-bf16": {
        # Four bytes per weight whatever the dtype: bf16 weights look twice their size, so G4 says a model
        # that fits does not. G2 and G3 use bytes_per_element themselves and stay right.
        "replace": {"g1-solution": ("return parameter_count(args) * bytes_per_element(dtype)",
                                    "return parameter_count(args) * 4")},
        "cells": {}, "expected": {"G1": 0, "G2": 2, "G3": 3, "G4": 0}, "flags": False},
    "wrong-flops": {
        # One FLOP per weight per token: the multiply-add counted as one operation.
        "replace": {"g2-solution": ("return 2 * weights_read_per_forward(args) * batch_size * n_tokens",
                                    "return weights_read_per_forward(args) * batch_size * n_tokens")},
        "cells": {}, "expected": {"G1": 3, "G2": 0, "G3": 3, "G4": 2}, "flags": False},
    "prediction-off": {
        # The roofline divides by the number of weights, not their bytes: 4x too fast in fp32, 2x in bf16.
        "replace": {"g3-solution": ("return batch_size * bandwidth_gb_s * 1e9 / bytes_per_step",
                                    "return batch_size * bandwidth_gb_s * 1e9 / weights_read_per_forward(args)")},
        "cells": {}, "expected": {"G1": 3, "G2": 2, "G3": 0, "G4": 0}, "flags": False},
    "no-warmup": {
        # A stopwatch around the whole loop, no warm-up: the measurement, not the prediction, is off.
        "cells": {"g3-solution": NO_WARMUP_MEASURE}, "keep_solution": True,
        "expected": {"G1": 3, "G2": 2, "G3": 0, "G4": 2}, "flags": False},
}
