"""grader.labs.paged_attention.samples: sample submissions of the paged_attention lab, each a known kind of learner
work, with the grade a careful human grader would give. `grader.samples.build("paged_attention", out)` writes them
as notebooks.

Each variant edits answer cells of a fully solved notebook (`cells`: whole answer cells, here textual edits of
the reference answer: a learner's typical mistake); `from_release` variants start from the learner release.
The edits are also the known mistakes that tests/test_paged_attention.py shows each check catches.
"""

from grader import notebook
from grader.catalogue import REPO_ROOT


def edited(cell_id: str, edits: list[tuple[str, str]]) -> str:
    """A reference answer cell as a learner would submit it (no nbgrader markers), after textual edits."""
    source = notebook.cell(notebook.read(REPO_ROOT / "solutions" / "paged_attention" / "paged_attention.ipynb"),
                           cell_id).source
    for old, new in edits:
        if old not in source:
            raise ValueError(f"sample edit of {cell_id} no longer applies: {old!r} is not in the reference")
        source = source.replace(old, new)
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (notebook.SOLUTION_BEGIN, notebook.SOLUTION_END)) + "\n"


# ---------------------------------------------------------------- mistakes in PA1 (the allocator)

# Copy on write without giving the shared block's reference back: the block is never freed (a leak).
FORGETS_DECREF = [("            self.ref_counts[shared] -= 1\n", "")]
# Appends into a shared last block: the fork's token overwrites the original's slot.
NO_COPY_ON_WRITE = [("        elif self.ref_counts[table[-1]] > 1:", "        elif False:  # shared blocks are written in place")]
# Frees blocks to the front of the free list: they are reused at once, against the convention (and the cache).
FREES_TO_FRONT = [("                self.free_block_ids.append(block)", "                self.free_block_ids.appendleft(block)")]

# ---------------------------------------------------------------- mistakes in PA2 (the paged cache)

# Off by one in the block index: position p is written to (and read from) the table's entry p // size + 1.
OFF_BY_ONE_BLOCK = [("blocks = self.tables.gather(1, positions // size)",
                     "blocks = self.tables.gather(1, (positions + 1) // size)")]
# Copies only the first layer's block on write.
COPIES_ONE_LAYER = [("        self.k[:, dst] = self.k[:, src]\n        self.v[:, dst] = self.v[:, src]",
                     "        self.k[0, dst] = self.k[0, src]\n        self.v[0, dst] = self.v[0, src]")]

# ---------------------------------------------------------------- mistakes in PA3 (prefix sharing)

# Trusts the hash: a collision hands a request somebody else's block.
NO_TOKEN_CHECK = [("if block is not None and self.block_token_ids[block] == chunk:", "if block is not None:")]
# Lets the block of the last token hit: a prompt fully cached on a block boundary has nothing left to compute.
CACHES_LAST_BLOCK = [("cacheable = (len(token_ids) - 1) // size", "cacheable = len(token_ids) // size")]

# ---------------------------------------------------------------- mistakes in PA4 (the batcher)

# Reserves the blocks of len(prompt) + max_new_tokens at admission, as a contiguous cache would.
RESERVES_UP_FRONT = [("and self.allocator.can_allocate(len(self.waiting[0].context))):",
                      "and self.allocator.can_allocate(len(self.waiting[0].prompt) + self.waiting[0].max_new_tokens)):"),
                     ("table = self.allocator.allocate(seq.request_id, context)",
                      "table = self.allocator.allocate(seq.request_id, context + [0] * (seq.max_new_tokens - len(seq.tokens)))\n"
                      "            self.allocator.seq_tokens[seq.request_id] = list(context)  # tokens so far; the rest is reserved")]
# Readmits a preempted request with its prompt only: the tokens it had generated are lost and generated again.
PREEMPT_FORGETS_TOKENS = [("            self.waiting.appendleft(seq)\n",
                           "            seq.tokens = []\n            self.waiting.appendleft(seq)\n")]

ALL = {"PA1": 3, "PA2": 3, "PA3": 3, "PA4": 3}
NONE = {"PA1": 0, "PA2": 0, "PA3": 0, "PA4": 0}

# The grades a careful human grader gives. PA3 builds on PA1's class but its scripts use no fork, so a copy-on-write
# mistake costs PA1's points once; PA4 uses PA1's allocator and PA2's cache, so a mistake there that changes the
# tokens costs PA4 too (its tokens are wrong), one that does not (a leaked reference never freed in a batcher that
# never forks) does not.
SAMPLES = {
    "reference": {"cells": {}, "expected": ALL, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": NONE, "flags": False},
    "forgets-decref": {"cells": {"pa1-solution": edited("pa1-solution", FORGETS_DECREF)},
                       "expected": {**ALL, "PA1": 0}, "flags": False},
    "no-copy-on-write": {"cells": {"pa1-solution": edited("pa1-solution", NO_COPY_ON_WRITE)},
                         "expected": {**ALL, "PA1": 0}, "flags": False},
    # Wrong slots: PA2's logits differ, and the batcher built on the cache gives wrong tokens.
    "off-by-one-block": {"cells": {"pa2-solution": edited("pa2-solution", OFF_BY_ONE_BLOCK)},
                         "expected": {**ALL, "PA2": 0, "PA4": 0}, "flags": False},
    "no-token-check": {"cells": {"pa3-solution": edited("pa3-solution", NO_TOKEN_CHECK)},
                       "expected": {**ALL, "PA3": 0}, "flags": False},
    # Right tokens, but a contiguous reservation behind the paged interface: no PA4 points.
    "reserves-up-front": {"cells": {"pa4-solution": edited("pa4-solution", RESERVES_UP_FRONT)},
                          "expected": {**ALL, "PA4": 0}, "flags": False},
}
