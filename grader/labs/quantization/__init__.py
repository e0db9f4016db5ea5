"""grader.labs.quantization: the quantization lab (book ch. 7): INT8 and INT4 weights, a Triton dequant-matmul,
an INT8 KV cache, perplexity, and INT8 decode speed.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.
"""

from __future__ import annotations

from ...timed import TimedTask
from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="quantization",
    prefix="QZ",
    tasks=(
        Task("QZ1", "INT8 weight-only, symmetric per output channel, and QuantLinear", 3, ("qz1-solution",)),
        Task("QZ2", "INT4 weight-only, asymmetric group-wise, two codes per byte", 3, ("qz2-solution",)),
        Task("QZ3", "a Triton kernel that multiplies by INT4 weights, dequantizing inside", 2, ("qz3-solution",)),
        Task("QZ4", "an INT8 KV cache behind the cache protocol", 2, ("qz4-solution",)),
        Task("QZ5", "perplexity of tiny in fp32, INT8 and INT4 at two group sizes", 2,
             ("qz1-solution", "qz2-solution", "qz5-solution"), requires=("QZ1", "QZ2")),
        Task("QZ6", "INT8 decode tokens/s against fp32 on a memory-bound model", 2, ("qz1-solution",),
             requires=("QZ1",)),
    ),
    defining_cells=("setup",),
    reference_cells=("setup", "qz1-solution", "qz2-solution", "qz3-solution", "qz4-solution", "qz5-solution"),
    timed=TimedTask("QZ6", gate="qz6-hidden", cells=("setup", "qz1-solution")),
)
