"""Sample submissions of the roi lab: each a known kind of learner work, with the grade a careful
human grader would give. `grader.samples.build("roi", out)` writes them as notebooks.

Each variant replaces the answer cells named in `cells` (by nbgrader grade_id) of a fully
solved notebook; `from_release` variants start from the learner release instead. A mistake
costs points once: R2 and R3 accept numbers that follow from the learner's own (wrong) R1.
"""

from grader import notebook
from grader.catalogue import REPO_ROOT


def solved_answer(cell_id: str) -> str:
    """A reference answer cell as a learner would submit it: the solution, without nbgrader's markers."""
    source = notebook.cell(notebook.read(REPO_ROOT / "solutions" / "roi" / "roi.ipynb"), cell_id).source
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (notebook.SOLUTION_BEGIN, notebook.SOLUTION_END))


UNCHECKED_R1 = '''
def cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation):
    # Right formula, no input checks: utilisation=70 (meant as 70%) silently gives a cost 100x too small.
    return gpu_dollars_per_hour / (tokens_per_second * SECONDS_PER_HOUR * utilisation) * TOKENS_PER_MILLION


def cost_per_query(gpu_dollars_per_hour, tokens_per_second, utilisation, tokens_per_query):
    return cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation) \\
        * tokens_per_query / TOKENS_PER_MILLION
'''

UNBATCHED_R3 = '''
@torch.inference_mode()
def time_batched_decode(model, batch_size, prompt_tokens, new_tokens, repeats=3):
    # Generates the sequences one after another: every forward pass sees a single sequence.
    prompts = torch.randint(0, model.args.vocab_size, (batch_size, prompt_tokens))

    def generate():
        for prompt in prompts:
            tokens = prompt[None]  # [1, P]
            for _ in range(new_tokens):
                nxt = model(tokens)[:, -1].argmax(dim=-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], dim=1)

    generate()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_by_batch_size(batch_sizes, seconds, new_tokens, gpu_dollars_per_hour, utilisation):
    return [cost_per_million_tokens(gpu_dollars_per_hour, b * new_tokens / s, utilisation)
            for b, s in zip(batch_sizes, seconds)]
'''

SAMPLES = {
    "reference": {"cells": {}, "expected": {"R1": 4, "R2": 3, "R3": 3}, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"R1": 0, "R2": 0, "R3": 0}, "flags": False},
    "wrong": {
        # Per hour vs per second: the hourly price divided by tokens per *second* (the x 3600 is missing).
        # R2 and R3 use that formula correctly, so they keep their points.
        "replace": {"r1-solution": ("tokens_per_second * SECONDS_PER_HOUR * utilisation",
                                    "tokens_per_second * utilisation")},
        "cells": {}, "expected": {"R1": 0, "R2": 3, "R3": 3}, "flags": False},
    "partial": {
        # R1 done, R2 and R3 not started: the release with only the R1 answer filled in.
        "from_release": True, "cells": {"r1-solution": solved_answer("r1-solution")},
        "expected": {"R1": 4, "R2": 0, "R3": 0}, "flags": False},
    "mix": {
        # R1 without input checks, R2 right, R3 "batched" by looping over the sequences.
        "cells": {"r1-solution": UNCHECKED_R1, "r3-solution": UNBATCHED_R3},
        "expected": {"R1": 0, "R2": 3, "R3": 0}, "flags": False},
}
