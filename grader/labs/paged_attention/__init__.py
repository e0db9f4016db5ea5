"""grader.labs.paged_attention: the paged_attention lab (book ch. 5-6): a block allocator, a paged KV cache behind
the model's cache interface, prefix sharing, and a continuous batcher that admits requests while blocks remain.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.
"""

from __future__ import annotations

from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="paged_attention",
    prefix="PA",
    tasks=(
        Task("PA1", "a block allocator: free list, reference counts, allocate/append/fork/free, copy on write", 3,
             ("pa1-solution",)),
        Task("PA2", "a paged KV cache: block tables, attention through them equal to contiguous, bytes held", 3,
             ("pa2-solution",)),
        Task("PA3", "prefix sharing: chained block hashes, reuse with a token check, eviction order", 3,
             ("pa1-solution", "pa3-solution")),
        Task("PA4", "a paged continuous batcher: admission while blocks remain, preemption by recompute, greedy "
                    "outputs, concurrency over max-length reservation", 3,
             ("pa1-solution", "pa2-solution", "pa4-solution")),
    ),
    defining_cells=("setup",),
    reference_cells=("setup", "pa1-solution", "pa2-solution", "pa3-solution", "pa4-solution"),
)
