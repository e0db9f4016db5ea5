"""grader.labs.serving: the serving lab (book ch. 9): an OpenAI-compatible server over the learner's continuous
batcher, its Prometheus metrics, the benchmark's metric definitions, and the server under load.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.
"""

from __future__ import annotations

from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="serving",
    prefix="SV",
    tasks=(
        Task("SV1", "TTFT, TPOT, ITL, E2EL and goodput of a recorded stream trace, by vLLM's benchmark definitions", 2,
             ("sv1-solution",)),
        Task("SV2", "an OpenAI-compatible server (completions, chat, streaming, usage, 400s) over the continuous "
                    "batcher, checked with the official openai client", 5, ("sv2-solution",)),
        Task("SV3", "/metrics in Prometheus format, named like vLLM's, whose counters match the traffic", 2,
             ("sv2-solution",)),
        # Under load only a server that answers right is worth timing: checked once SV2 passes.
        Task("SV4", "under load: no request lost or duplicated, greedy tokens equal offline, requests served "
                    "concurrently, /metrics agrees with the client", 3, ("sv2-solution",), requires=("SV2",)),
    ),
    defining_cells=("setup", "given", "given-batcher", "sampling"),
    reference_cells=("setup", "given", "given-batcher", "sampling", "sv1-solution", "sv2-solution", "load-generator"),
)
