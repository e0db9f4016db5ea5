"""grader.labs.continuous_batching: the continuous_batching lab (book ch. 6): static batching, an iteration-level
scheduler, its throughput and latency, its speed over static batching.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.
"""

from __future__ import annotations

from ...timed import TimedTask
from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="continuous_batching",
    prefix="CB",
    tasks=(
        Task("CB1", "static batching with left padding and an attention mask, equal to one-at-a-time generation, "
                    "one batched call per step", 3, ("cb1-solution",)),
        Task("CB2", "an iteration-level scheduler: requests join and leave every step, under a batch size and a "
                    "token budget, with priorities", 4, ("cb2-solution",)),
        # CB3 measures both ways of batching: numbers about wrong tokens (or a scheduler that is not one) are worth
        # nothing, so it is checked only once CB1 and CB2 pass.
        Task("CB3", "throughput and p50/p99 latency of static and continuous batching on a request trace", 1,
             ("cb1-solution", "cb2-solution", "cb3-solution"), requires=("CB1", "CB2")),
        Task("CB4", "throughput over static batching on a mixed-length workload", 2, ("cb1-solution", "cb2-solution"),
             requires=("CB2",)),
    ),
    defining_cells=("setup", "given", "lanes"),
    reference_cells=("setup", "given", "cb1-solution", "lanes", "cb2-solution", "cb3-solution"),
    # A round (static batching, the reference and the learner's scheduler each serving 32 requests) takes
    # about 7 s on one free core: keep room for a slow one before the stage's deadline.
    timed=TimedTask("CB4", gate="cb4-hidden", cells=("setup", "given", "cb1-solution", "lanes", "cb2-solution"),
                    rounds=(5, 12), slack_s=30.0),
)
