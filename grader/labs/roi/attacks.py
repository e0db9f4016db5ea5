"""grader.labs.roi.attacks: attack submissions of the roi lab: each tries to get around the grader, with the grade it
deserves.

Same format as the samples (`grader.samples.build("roi", out, kind="attacks")`): each replaces
answer cells of a fully solved notebook (`keep_solution`: appends to the solved cell instead).
`expected` is what a careful human grader gives the *honest* part of the work; `flags` says whether
the instructor report must list the submission. tests/test_roi.py grades them through the check stage.
"""

ATTACKS = {
    # Takes ROI1's answer from the check module, which held the cost model before the platform (the formulas now
    # live only in grading.py, which the sandbox cannot import): nothing of its own, so no points anywhere
    # (ROI2's and ROI3's reference cells call the same broken cost_per_query / cost_per_million_tokens).
    "call-the-formula": {
        "cells": {"roi1-solution": '''
def cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation):
    return checks.dollars_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation)


def cost_per_query(gpu_dollars_per_hour, tokens_per_second, utilisation, tokens_per_query):
    return checks.dollars_per_query(gpu_dollars_per_hour, tokens_per_second, utilisation, tokens_per_query)
'''},
        "expected": {"ROI1": 0, "ROI2": 0, "ROI3": 0}, "flags": False},
    # Runs the batched decode for real (the work the served model counts), then reports seconds it made up, which
    # make batching look about 4x cheaper than it is: the grader's own timing of the same decode shows the number
    # is not a measurement. ROI1 and ROI2 are the reference's.
    "forged-seconds": {
        "keep_solution": True,
        "cells": {"roi3-solution": '''
_measured = time_batched_decode

def time_batched_decode(model, batch_size, prompt_tokens, new_tokens, repeats=3):
    _measured(model, batch_size, prompt_tokens, new_tokens, repeats)
    return 0.004 * batch_size ** 0.5
'''},
        "expected": {"ROI1": 4, "ROI2": 3, "ROI3": 0}, "flags": False},
}
