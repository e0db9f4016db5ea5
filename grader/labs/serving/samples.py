"""grader.labs.serving.samples: sample submissions of the serving lab, each a known kind of learner work, with the
grade a careful human grader would give. `grader.samples.build("serving", out)` writes them as notebooks.

Each variant edits answer cells of the fully solved notebook (`replace`-style textual edits of the reference
answer: a learner's typical mistake); `from_release` variants start from the learner release instead.
"""

from grader import notebook
from grader.catalogue import REPO_ROOT


def edited(cell_id: str, edits: list[tuple[str, str]]) -> str:
    """A reference answer cell as a learner would submit it (no nbgrader markers), after textual edits."""
    source = notebook.cell(notebook.read(REPO_ROOT / "solutions" / "serving" / "serving.ipynb"), cell_id).source
    for old, new in edits:
        if old not in source:
            raise ValueError(f"sample edit of {cell_id} no longer applies: {old!r} is not in the reference")
        source = source.replace(old, new)
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (notebook.SOLUTION_BEGIN, notebook.SOLUTION_END)) + "\n"


# A correct SV1 written another way: numpy differences, TPOT from the ITLs' sum.
S1_REWRITTEN = [("    itl = [b - a for a, b in zip(chunk_s, chunk_s[1:])]\n",
                 "    itl = np.diff(np.asarray(chunk_s, dtype=np.float64)).tolist()\n"),
                ("    tpot = (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None\n",
                 "    tpot = None if output_tokens < 2 else (chunk_s[-1] - chunk_s[0]) / (output_tokens - 1)\n")]
# TPOT averaged over every output token, the first one's wait (TTFT's) included.
S1_TPOT_ALL_TOKENS = [("    tpot = (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None\n",
                       "    tpot = e2el / output_tokens if output_tokens > 1 else None\n")]
# A correct server written another way: the step runs in a dedicated single-thread executor, and stop strings
# are cut by rfind over the new text only (the same result).
S2_REWRITTEN = [("        self.task = None\n",
                 "        self.task = None\n        from concurrent.futures import ThreadPoolExecutor\n"
                 "        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=\"engine-step\")\n"),
                ("await loop.run_in_executor(None, self.batcher.step)", "await loop.run_in_executor(self.pool, self.batcher.step)")]
# Blocks the event loop during generation: the step runs on the loop itself, and the loop keeps stepping until
# the batch is empty, so nothing is sent, and no request read, while anything runs.
S2_BLOCKS_LOOP = [("            produced = await loop.run_in_executor(None, self.batcher.step)  # the model computes off the loop\n",
                   "            produced = self.batcher.step()  # on the loop: nothing else runs meanwhile\n"),
                  ("            self.update_gauges()\n        ### END SOLUTION\n\n    def admit_and_drop",
                   "            self.update_gauges()\n            if self.batcher.has_unfinished:\n"
                   "                continue  # keep going until the batch is empty\n        ### END SOLUTION\n\n"
                   "    def admit_and_drop")]
# SSE framing: one newline after each event instead of a blank line.
S2_WRONG_SSE = [('            await response.write(f"data: {json.dumps(payload)}\\n\\n".encode())',
                 '            await response.write(f"data: {json.dumps(payload)}\\n".encode())')]
# A batcher of one: every request waits for the one before it.
S2_ONE_AT_A_TIME = [("    engine = AsyncEngine(model, tokenizer.eos_id, metrics, max_batch_size,",
                     "    engine = AsyncEngine(model, tokenizer.eos_id, metrics, 1,")]

ALL = {"SV1": 2, "SV2": 5, "SV3": 2, "SV4": 3}
NONE = {"SV1": 0, "SV2": 0, "SV3": 0, "SV4": 0}

SAMPLES = {
    "reference": {"cells": {}, "expected": ALL, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": NONE, "flags": False},
    "rewritten": {"cells": {"sv1-solution": edited("sv1-solution", S1_REWRITTEN),
                            "sv2-solution": edited("sv2-solution", S2_REWRITTEN)}, "expected": ALL, "flags": False},
    # The metric definitions are wrong; the server is right.
    "tpot-all-tokens": {"cells": {"sv1-solution": edited("sv1-solution", S1_TPOT_ALL_TOKENS)},
                        "expected": {**ALL, "SV1": 0}, "flags": False},
    # Right tokens, right metrics, but nothing streams while a batch runs and a client that leaves keeps its lane
    # until the batch drains: not the server SV2 asks for, and one request at a time under load (SV4).
    "blocks-loop": {"cells": {"sv2-solution": edited("sv2-solution", S2_BLOCKS_LOOP)},
                    "expected": {**ALL, "SV2": 0, "SV4": 0}, "flags": False},
    # Events not separated by a blank line: no SSE client can read them (SV2; SV4 builds on SV2).
    "wrong-sse": {"cells": {"sv2-solution": edited("sv2-solution", S2_WRONG_SSE)},
                  "expected": {**ALL, "SV2": 0, "SV4": 0}, "flags": False},
    # The API is right request by request, but under load requests are served one after the other.
    "one-at-a-time": {"cells": {"sv2-solution": edited("sv2-solution", S2_ONE_AT_A_TIME)},
                      "expected": {**ALL, "SV4": 0}, "flags": False},
}
