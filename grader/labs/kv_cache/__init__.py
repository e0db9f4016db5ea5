"""grader.labs.kv_cache: the kv_cache lab (book ch. 5): a KV cache, cached generation, its memory, its speed.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.
"""

from __future__ import annotations

from ...timed import TimedTask
from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="kv_cache",
    prefix="KV",
    tasks=(
        Task("KV1", "a KV cache for the model's cache interface", 3, ("kv1-solution",)),
        Task("KV2", "generation with the cache, equal to naive_generate, one position per new token", 3,
             ("kv1-solution", "kv2-solution")),
        Task("KV3", "KV memory accounting", 2, ("kv1-solution", "kv3-solution")),
        Task("KV4", "speedup over recompute at long context", 2, ("kv1-solution", "kv2-solution"), requires=("KV2",)),
    ),
    defining_cells=("setup",),
    reference_cells=("setup", "kv1-solution", "kv2-solution", "kv3-solution", "kv4-solution"),
    timed=TimedTask("KV4", gate="kv4-hidden", cells=("setup", "kv1-solution", "kv2-solution")),
)
