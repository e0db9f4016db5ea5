"""grader.labs.flash_attention: the flash_attention lab (book ch. 8-9): tiled online-softmax attention, then a Triton kernel.

The package is laid out as `grader.labs.spec` describes; this file only declares the lab.

  FA1 tiled attention in PyTorch: equal to attention, and its peak memory at N = 2048 does not grow with N^2
  FA2 the forward pass as a Triton kernel (causal or not, returns the logsumexp L), plugged into the model
  FA3 bytes a tiled kernel reads and writes, against naive attention's N^2 round trips (hardware-independent)
  FA4 extension: the backward pass from the saved logsumexp (few points)

Speed is reported, not graded (the issue: "grade memory, not speed"): the notebook times the tiled
version against SDPA on the CPU, and `bench/flash_attention.py` times the kernel on a GPU.
"""

from __future__ import annotations

from ..spec import LabSpec, Task

SPEC = LabSpec(
    name="flash_attention",
    prefix="FA",
    tasks=(
        Task("FA1", "tiled online-softmax attention in PyTorch: equal to attention, peak memory not N^2", 4,
             ("fa1-solution",)),
        Task("FA2", "the forward pass as a Triton kernel, with L, plugged into the model", 4, ("fa2-solution",)),
        Task("FA3", "bytes read and written by the tiled kernel against naive attention", 2, ("fa3-solution",)),
        Task("FA4", "extension: the backward pass from the saved logsumexp", 1, ("fa4-solution",)),
    ),
    defining_cells=("setup",),
    reference_cells=("setup", "fa1-solution", "fa2-solution", "fa3-solution", "fa4-solution"),
)
