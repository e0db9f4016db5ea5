"""grader.labs.continuous_batching.samples: sample submissions of the continuous_batching lab, each a known kind of
learner work, with the grade a careful human grader would give. `grader.samples.build("continuous_batching", out)`
writes them as notebooks.

Each variant edits answer cells of a fully solved notebook (`replace`: one textual edit of the
reference answer, a learner's typical mistake; `cells`: a whole answer cell); `from_release`
variants start from the learner release instead. The edits below are also the known mistakes
that tests/test_continuous_batching.py shows each check catches.
"""

from grader import notebook
from grader.catalogue import REPO_ROOT


def edited(cell_id: str, edits: list[tuple[str, str]]) -> str:
    """A reference answer cell as a learner would submit it (no nbgrader markers), after textual edits."""
    source = notebook.cell(notebook.read(REPO_ROOT / "solutions" / "continuous_batching" / "continuous_batching.ipynb"),
                           cell_id).source
    for old, new in edits:
        if old not in source:
            raise ValueError(f"sample edit of {cell_id} no longer applies: {old!r} is not in the reference")
        source = source.replace(old, new)
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (notebook.SOLUTION_BEGIN, notebook.SOLUTION_END)) + "\n"


# ---------------------------------------------------------------- mistakes in CB1 (static batching)

# Forgets the attention mask: real tokens attend to the padding on their left.
C1_NO_MASK = [(", cache,\n                   attention_mask=attention_mask[:, :width])", ", cache)"),
              (", cache,\n                       attention_mask=attention_mask[:, :position + 1])", ", cache)")]
# Pads on the right and takes logits[:, -1]: a short row's next token is read after its padding.
C1_RIGHT_PADDING = [("tokens[b, width - len(prompt):]", "tokens[b, :len(prompt)]"),
                    ("attention_mask[b, width - len(prompt):] = True", "attention_mask[b, :len(prompt)] = True\n"
                     "        attention_mask[b, width:] = True")]
# Stops the whole batch at the first eos.
C1_EOS_STOPS_ALL = [("        if all(done):\n", "        if any(done):\n")]

# ---------------------------------------------------------------- mistakes in CB2 (the scheduler)

# Static batching behind the same interface: a new group is admitted only once the last one is done.
# Right tokens, within every limit, but waiting requests are left out of free lanes: not iteration-level
# scheduling (CB2's admission rule), and no faster than static batching (CB4).
C2_ADMITS_ONLY_WHEN_EMPTY = [(
    "        while self.waiting and self.free_lanes and len(self.waiting[0][1].prompt) <= budget:",
    "        filling = not self.running  # static: a new group only once the last one is done\n"
    "        while filling and self.waiting and self.free_lanes and len(self.waiting[0][1].prompt) <= budget:")]
# Carries CB1's habit over: every running request decodes at one shared position (the largest).
C2_SHARED_POSITION = [(
    "positions = torch.tensor([[seq.last_position] for seq in running], device=self.device)  # [B, 1]",
    "positions = torch.tensor([max(seq.last_position for seq in running)], device=self.device)  # [1]")]
# Packs the budget greedily: a smaller request behind one that does not fit overtakes it.
C2_OVERTAKES = [(
    "        while self.waiting and self.free_lanes and len(self.waiting[0][1].prompt) <= budget:\n"
    "            _, seq = heapq.heappop(self.waiting)\n",
    "        for order, seq in sorted(self.waiting, key=lambda item: item[0]):\n"
    "            if not self.free_lanes or len(seq.prompt) > budget:\n"
    "                continue\n"
    "            self.waiting.remove((order, seq))\n"
    "            heapq.heapify(self.waiting)\n")]
# Orders the queue by arrival only: priorities are ignored.
C2_IGNORES_PRIORITY = [("order = (priority if self.priority else 0, self.num_added)", "order = (0, self.num_added)")]
# Admits whatever has a free lane: the token budget is never checked.
C2_IGNORES_BUDGET = [("self.free_lanes and len(self.waiting[0][1].prompt) <= budget:", "self.free_lanes:")]
# One lane too many: max_batch_size + 1 requests may run.
C2_EXTRA_LANE = [("self.free_lanes = list(range(max_batch_size))", "self.free_lanes = list(range(max_batch_size + 1))"),
                 ("self.cache = LaneKVCache(model.args, max_batch_size,", "self.cache = LaneKVCache(model.args, "
                                                                          "max_batch_size + 1,")]
# Takes the first token from the prefill but does not return it: every request loses its first token.
C2_DROPS_FIRST_TOKEN = [("            emit(seq, int(logits[0, -1].argmax()))",
                         "            seq.tokens.append(int(logits[0, -1].argmax()))  # forgot to report it")]

# ---------------------------------------------------------------- mistakes in CB3 (the measurement)

# Serves the whole trace at once, ignoring when requests arrive.
C3_IGNORES_ARRIVALS = [("            time.sleep(max(0.0, waiting[0].arrival_s - now()))  # idle until the next arrival\n"
                        "            batch = [r for r in waiting[:max_batch_size] if r.arrival_s <= now()]",
                        "            batch = waiting[:max_batch_size]"),
                       ("            while waiting and waiting[0].arrival_s <= now():", "            while waiting:")]
# Reports the worst latency as p99 and the mean as p50.
C3_WRONG_PERCENTILES = [('"p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99))',
                         '"p50_s": float(np.mean(latencies) * 1.5), "p99_s": float(max(latencies) * 1.2)')]

ALL = {"CB1": 3, "CB2": 4, "CB3": 1, "CB4": 2}
NONE = {"CB1": 0, "CB2": 0, "CB3": 0, "CB4": 0}

# The grades a careful human grader gives, under the rule that work counts as well as tokens (issue 11) and that
# a task building on another counts only once that one is right (CB3 on CB1 and CB2, CB4 on CB2):
SAMPLES = {
    "reference": {"cells": {}, "expected": ALL, "flags": False},
    "stub": {"from_release": True, "cells": {}, "expected": NONE, "flags": False},
    # Right tokens, but admits requests only into an empty batch: static batching behind the scheduler's interface.
    # CB2 asks for an iteration-level scheduler ("requests join and leave every step"): a careful grader gives it no
    # CB2 points (it was 4 when only the tokens and the limits counted), and so no CB3 (its "continuous" numbers
    # measure static batching) and no CB4 (nothing continuous to time; it was 0 already, on speed).
    "slow": {"cells": {"cb2-solution": edited("cb2-solution", C2_ADMITS_ONLY_WHEN_EMPTY)},
             "expected": {"CB1": 3, "CB2": 0, "CB3": 0, "CB4": 0}, "flags": False},
    # CB1 without the attention mask: padded rows differ. CB3 measures static batching with these wrong tokens, so
    # it gets nothing either (it was 1: issue 12, item 6). CB2 and CB4 do not use CB1's code.
    "wrong": {"cells": {"cb1-solution": edited("cb1-solution", C1_NO_MASK)},
              "expected": {"CB1": 0, "CB2": 4, "CB3": 0, "CB4": 2}, "flags": False},
    # CB2 decodes at one shared position: wrong tokens, so neither CB3 (it was 1) nor CB4 counts.
    "shared-position": {"cells": {"cb2-solution": edited("cb2-solution", C2_SHARED_POSITION)},
                        "expected": {"CB1": 3, "CB2": 0, "CB3": 0, "CB4": 0}, "flags": False},
}
