"""grader.labs.roi.samples: sample submissions of the roi lab, each a known kind of learner work, with the grade a
careful human grader would give. `grader.samples.build("roi", out)` writes them as notebooks.

Each variant replaces the answer cells named in `cells` (by nbgrader grade_id) of a fully
solved notebook; `from_release` variants start from the learner release instead. A mistake
costs points once: ROI2 and ROI3 accept numbers that follow from the learner's own (wrong) ROI1.

The grades are those of the lab's single-module days, re-derived for the checks made out of the
learner's process, and unchanged: `wrong`'s tables and conversions follow its own ROI1 (the checker
asks the learner's process for them); `mix`'s one-sequence-at-a-time timing is now caught by the
served model's count of rows per forward pass, where it was caught by a hook in the same process.
"""

from grader import notebook
from grader.catalogue import REPO_ROOT


def solved_answer(cell_id: str) -> str:
    """A reference answer cell as a learner would submit it: the solution, without nbgrader's markers."""
    source = notebook.cell(notebook.read(REPO_ROOT / "solutions" / "roi" / "roi.ipynb"), cell_id).source
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (notebook.SOLUTION_BEGIN, notebook.SOLUTION_END))


UNCHECKED_ROI1 = '''
def cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation):
    # Right formula, no input checks: utilisation=70 (meant as 70%) silently gives a cost 100x too small.
    return gpu_dollars_per_hour / (tokens_per_second * SECONDS_PER_HOUR * utilisation) * TOKENS_PER_MILLION


def cost_per_query(gpu_dollars_per_hour, tokens_per_second, utilisation, tokens_per_query):
    return cost_per_million_tokens(gpu_dollars_per_hour, tokens_per_second, utilisation) \\
        * tokens_per_query / TOKENS_PER_MILLION
'''

UNBATCHED_ROI3 = '''
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
    "reference": {"cells": {}, "expected": {"ROI1": 4, "ROI2": 3, "ROI3": 3}, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": {"ROI1": 0, "ROI2": 0, "ROI3": 0}, "flags": False},
    "wrong": {
        # Per hour vs per second: the hourly price divided by tokens per *second* (the x 3600 is missing).
        # ROI2 and ROI3 use that formula correctly, so they keep their points.
        "replace": {"roi1-solution": ("tokens_per_second * SECONDS_PER_HOUR * utilisation",
                                      "tokens_per_second * utilisation")},
        "cells": {}, "expected": {"ROI1": 0, "ROI2": 3, "ROI3": 3}, "flags": False},
    "partial": {
        # ROI1 done, ROI2 and ROI3 not started: the release with only the ROI1 answer filled in.
        "from_release": True, "cells": {"roi1-solution": solved_answer("roi1-solution")},
        "expected": {"ROI1": 4, "ROI2": 0, "ROI3": 0}, "flags": False},
    "mix": {
        # ROI1 without input checks, ROI2 right, ROI3 "batched" by looping over the sequences: the model the
        # grader serves sees one row per forward pass, so no ROI3 points, whatever the seconds say.
        "cells": {"roi1-solution": UNCHECKED_ROI1, "roi3-solution": UNBATCHED_ROI3},
        "expected": {"ROI1": 0, "ROI2": 3, "ROI3": 0}, "flags": False},
}
