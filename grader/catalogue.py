"""grader.catalogue: the course's labs, in track order, and what each needs from the hardware.

One name per lab: the same string names its folder under `labs/`, its notebook, its task
IDs' prefix, its thresholds and its report rows. Labs land one issue at a time;
`available` says whether a lab's folder exists in this checkout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Lab:
    name: str
    chapter: str
    tracks: tuple[str, ...]
    gpu_part: str  # what only a GPU can check ("" when the whole lab is CPU-complete)
    needs_triton: bool = False

    @property
    def available(self) -> bool:
        return (REPO_ROOT / "labs" / self.name).is_dir()


QUICK, DEEP, PROD = ("quick", "deep", "production"), ("deep", "production"), ("production",)
LABS: tuple[Lab, ...] = (
    Lab("gpu_basics", "ch. 3", QUICK, "bandwidth and roofline on the GPU"),
    Lab("kv_cache", "ch. 5", QUICK, "speedup thresholds on the GPU profile"),
    Lab("continuous_batching", "ch. 6", QUICK, "throughput thresholds on the GPU profile"),
    Lab("roi", "appendix C", QUICK, ""),
    Lab("paged_attention", "ch. 5", DEEP, "memory waste at GPU batch sizes"),
    Lab("quantization", "ch. 7", DEEP, "Triton dequant-matmul speed", needs_triton=True),
    Lab("speculative_sampling", "ch. 8", DEEP, "wall-clock speedup on the GPU profile"),
    Lab("flash_attention", "ch. 8", DEEP, "kernel traffic and speed", needs_triton=True),
    Lab("serving", "ch. 9", DEEP, "server under GPU load"),
    Lab("parallelism", "ch. 9", PROD, "NCCL tensor parallel across GPUs"),
    Lab("production", "ch. 9", PROD, "comparison with vLLM"),
)
