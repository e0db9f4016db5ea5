"""grader.labs.roi: the roi lab (book appendix C): what a token costs, a what-if table, and cost against batch size.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab. It
imports no torch: the notebook's setup cell imports `public`, and ROI1 and ROI2 are arithmetic.
"""

from __future__ import annotations

from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="roi",
    prefix="ROI",
    tasks=(
        Task("ROI1", "cost per 1M tokens and per query from GPU price, throughput and utilisation", 4,
             ("roi1-solution",)),
        # ROI2 and ROI3 use the learner's ROI1 but do not require it to pass: they accept numbers that follow
        # from the learner's own ROI1 formula, so one mistake costs points once.
        Task("ROI2", "the customer-service what-if table", 3, ("roi1-solution", "roi2-solution")),
        Task("ROI3", "cost against batch size, from your own measurement", 3, ("roi1-solution", "roi3-solution")),
    ),
    # `customer-service-data` is plain data an answer may name (a default argument, say); `measure-setup` imports
    # torch and loads the model, which ROI3's answer cell needs at definition time (@torch.inference_mode()).
    defining_cells=("setup", "customer-service-data", "measure-setup"),
    reference_cells=("setup", "customer-service-data", "measure-setup", "roi1-solution", "roi2-solution",
                     "roi3-solution"),
)
