"""grader.labs.gpu_basics: the gpu_basics lab (book ch. 3): weight and KV memory, arithmetic intensity, the roofline.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.

No task `requires` an earlier one as a whole: each builds on single functions of earlier tasks
(GB2's weights_read_per_forward on GB1's parameter_count, GB3's prediction on GB2's
weights_read_per_forward, GB4 on GB3's prediction and GB1's memory_needed), and a whole-task
requirement would take points a careful grader gives (a wrong weight_bytes says nothing about
GB2). Instead each check, when an answer is wrong, asks the earlier function it builds on and,
when that function explains the mistake, says so: "fix GB1's parameter_count first".
"""

from __future__ import annotations

from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="gpu_basics",
    prefix="GB",
    tasks=(
        Task("GB1", "parameter count, weight bytes and memory needed", 3, ("gb1-solution",)),
        Task("GB2", "FLOPs, bytes and arithmetic intensity of prefill and decode", 2,
             ("gb1-solution", "gb2-solution")),
        Task("GB3", "roofline prediction of decode tokens/s, and a measurement of it", 3,
             ("gb1-solution", "gb2-solution", "gb3-solution")),
        Task("GB4", "datasheet predictions: tokens/s and fit in memory", 2,
             ("gb1-solution", "gb2-solution", "gb3-solution", "gb4-solution")),
    ),
    defining_cells=("setup",),
    reference_cells=("setup", "gb1-solution", "gb2-solution", "gb3-solution", "gb4-solution"),
)
