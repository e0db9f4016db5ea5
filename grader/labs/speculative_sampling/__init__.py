"""grader.labs.speculative_sampling: the speculative_sampling lab (book ch. 8): draft and verify, exactly.

A cache that rolls back, greedy speculative decoding with a draft model, the exact stochastic verify
step, and a drafter with no model at all (prompt lookup). The package is laid out as
`grader.labs.spec` describes; this file only declares the lab.
"""

from __future__ import annotations

from ...timed import TimedTask
from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="speculative_sampling",
    prefix="SS",
    tasks=(
        Task("SS1", "a KV cache that rolls back to what a fresh prefill holds", 2, ("ss1-solution",)),
        Task("SS2", "greedy speculative decoding with the draft model: the target's tokens, one target call per round",
             3, ("ss1-solution", "ss2-solution")),
        Task("SS3", "the exact stochastic verify step: the target's distribution, by a statistical test", 3,
             ("ss3-solution",)),
        Task("SS4", "prompt-lookup drafting, with no model cost, on code with repetition", 2,
             ("ss1-solution", "ss2-solution", "ss4-solution"), requires=("SS2",)),
        Task("SS5", "prompt-lookup speculation faster than cached target-only decoding, timed out of process", 2,
             ("ss1-solution", "ss2-solution", "ss4-solution"), requires=("SS4",)),
    ),
    defining_cells=("setup",),
    reference_cells=("setup", "ss1-solution", "ss2-solution", "ss3-solution", "ss4-solution"),
    # Prompt lookup, not the draft model: with tiny-draft the reference is below 1x on a CPU (SS2 counts its calls).
    timed=TimedTask("SS5", gate="ss5-hidden", cells=("setup", "ss1-solution", "ss2-solution", "ss4-solution")),
)
