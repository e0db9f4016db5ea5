"""bench/flash_attention.py: attention speed and memory, naive against tiled against SDPA (reported, never graded).

On a CUDA GPU it times the flash_attention lab's reference Triton kernel, naive attention (scores and
probabilities materialised) and SDPA, causal, fp16, at several lengths: each call warmed up and
synchronised (`inferlab.bench.compare`), interleaved, median of rounds. Without a GPU that part is
skipped, saying why, and it times the tiled PyTorch reference instead (the kernel would run in Triton's
interpreter, whose speed means nothing), and measures FA1's peak tensor bytes against naive attention.

    python bench/flash_attention.py --out bench            # writes bench/flash_attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def gpu_check_path(device: str, quick: bool) -> dict:
    """A `TRITON_PATHS` entry for bench/gpu_check.py: the lab's reference kernel (causal, fp16 on a GPU, fp32 in
    the interpreter) against float64 attention; on the GPU also its time against SDPA (`triton.testing.do_bench`,
    which warms up and synchronises). Quick: [1, 2, 64, 32] (the interpreter is slow), else [1, 8, 2048, 64]
    (its float64 reference runs on the host)."""
    import time

    sys.path.insert(0, str(REPO))
    from grader import labs
    from grader.labs.flash_attention.public import attention64, random_qkv

    ns = labs.load("flash_attention").reference_namespace()
    batch, heads, n, dim = (1, 2, 64, 32) if quick else (1, 8, 2048, 64)
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (t.to(device) for t in random_qkv(np.random.default_rng(0), batch, heads, heads, n, dim, dtype))

    def launch():
        return ns["flash_attention_forward"](q, k, v, causal=True, block_m=64 if device == "cuda" else 16,
                                             block_n=64 if device == "cuda" else 16)
    started = time.perf_counter()
    o, _ = launch()  # the first call compiles (or, under the interpreter, interprets)
    if device == "cuda":
        torch.cuda.synchronize()
    want, _ = attention64(q.cpu(), k.cpu(), v.cpu(), causal=True)
    result = {"shape": [batch, heads, n, dim], "dtype": str(dtype).removeprefix("torch."),
              "first_call_s": round(time.perf_counter() - started, 3),
              "max_abs_error": float((o.cpu().double() - want).abs().max()), "tolerance": 1e-2}
    if device == "cuda":
        from triton.testing import do_bench

        result["triton_ms"] = round(do_bench(launch), 4)
        result["torch_ms"] = round(do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    opts = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # the grader package, from a checkout
    from grader import labs
    from grader.labs.flash_attention.public import (MEMORY_BLOCK, measure_peak, memory_inputs, naive_attention,
                                                    naive_memory, random_qkv)
    from inferlab.bench import compare

    ns = labs.load("flash_attention").reference_namespace()
    cuda = torch.cuda.is_available()
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": []}
    if not cuda:
        results["gpu"] = ("skipped: no CUDA GPU visible (the Triton kernel would run in the interpreter, "
                          "which times nothing)")
        print(results["gpu"])
        q, k, v = memory_inputs(0)
        tiled = measure_peak(lambda: ns["tiled_attention"](q, k, v, causal=True, block_q=MEMORY_BLOCK,
                                                           block_k=MEMORY_BLOCK))[1]["peak_bytes"]
        results["memory"] = {"tiled_peak_bytes": tiled, "naive_peak_bytes": naive_memory()["peak_bytes"],
                             "ratio": round(tiled / naive_memory()["peak_bytes"], 4)}
        print("FA1 memory at N = 2048:", results["memory"])
    heads, dim = (32, 64) if cuda else (4, 64)
    dtype, device = (torch.float16, "cuda") if cuda else (torch.float32, "cpu")
    for n in opts.lengths or ([1024, 2048, 4096, 8192] if cuda else [512, 1024]):
        q, k, v = (t.to(device) for t in random_qkv(np.random.default_rng(n), 1, heads, heads, n, dim, dtype))
        if cuda:
            label = "triton"
            ours = lambda: ns["flash_attention_forward"](q, k, v, causal=True, block_m=64, block_n=64)  # noqa: E731
        else:
            label = "tiled"
            ours = lambda: ns["tiled_attention"](q, k, v, causal=True,  # noqa: E731
                                                 block_q=MEMORY_BLOCK, block_k=MEMORY_BLOCK)
        result = compare({"naive": lambda: naive_attention(q, k, v, True), label: ours,
                          "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)},
                         baseline="naive", warmup=2, min_rounds=5, max_rounds=15, rel_ci=0.1)
        row = {"seq_len": n, "heads": heads, "head_dim": dim, "dtype": str(dtype).removeprefix("torch."),
               f"{label}_speedup_vs_naive": round(result.speedup(label), 2),
               "sdpa_speedup_vs_naive": round(result.speedup("sdpa"), 2), "rounds": result.rounds}
        results["rows"].append(row)
        print(row)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "flash_attention.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
